"""The equivalence rule every speculative path is held to: the same tokens as the baseline, except where
float noise flipped a certified near-tie (top-2 logit gap below `NEAR_TIE`) at the first differing position.
Near-ties are counted and reported, never silently allowed."""

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
    gap: float | None = None  # smaller of the two runs' top-2 gaps there

    @property
    def ok(self) -> bool:
        return self.identical or self.near_tie


def compare(ref: Sequence[int], ref_gaps: Sequence[float], other: Sequence[int],
            other_gaps: Sequence[float], tol: float = NEAR_TIE) -> Verdict:
    if list(ref) == list(other):
        return Verdict(True)
    i = next((j for j, (a, b) in enumerate(zip(ref, other)) if a != b), min(len(ref), len(other)))
    gaps = [g[i] for g in (ref_gaps, other_gaps) if i < len(g)]
    if any(math.isnan(g) for g in gaps):  # a sampled position certifies nothing: a flip there is not float noise
        return Verdict(False, False, i, math.nan)
    gap = min(gaps) if gaps else None
    return Verdict(False, gap is not None and gap < tol, i, gap)
