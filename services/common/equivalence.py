"""The equivalence rule every speculative path is held to: the same tokens as the baseline, except where
float noise flipped a certified near-tie at the first differing position. Near-ties are counted and
reported, never silently allowed.

A near-tie is certified only when BOTH runs' top-2 logit gaps at the first differing position are below
`NEAR_TIE`: both runs saw the same tokens up to there, so noise can flip the argmax only where each of them
was itself undecided; a tie on one side and a clear gap on the other is a real difference.

Prefix case (one run's tokens are a strict prefix of the other's): nothing is certified. Stop tokens are part
of the emitted tokens, so both runs applied the same stop rule to the same tokens; a stop token flipped by
noise shows as a differing token (with both gaps), and a different length alone is a real difference.
A sampled position (gap NaN) certifies nothing either: a flip there is not float noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

NEAR_TIE = 1e-4


@dataclass(frozen=True)
class Verdict:
    identical: bool
    near_tie: bool = False  # tokens differ, and the first difference is a certified near-tie
    position: int | None = None  # first differing position
    gap: float | None = None  # larger of the two runs' top-2 gaps there (None: one run had ended)

    @property
    def ok(self) -> bool:
        return self.identical or self.near_tie


def compare(ref: Sequence[int], ref_gaps: Sequence[float], other: Sequence[int],
            other_gaps: Sequence[float], tol: float = NEAR_TIE) -> Verdict:
    if list(ref) == list(other):
        return Verdict(True)
    i = next((j for j, (a, b) in enumerate(zip(ref, other)) if a != b), min(len(ref), len(other)))
    if i >= min(len(ref), len(other), len(ref_gaps), len(other_gaps)):
        return Verdict(False, False, i, None)  # prefix case, or a run without its gaps: certifies nothing
    gaps = (ref_gaps[i], other_gaps[i])
    if any(math.isnan(g) for g in gaps):  # a sampled position certifies nothing
        return Verdict(False, False, i, math.nan)
    gap = max(gaps)  # both below tol <=> the larger is
    return Verdict(False, gap < tol, i, gap)
