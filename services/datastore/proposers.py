"""Draft proposers: each maps a context to draft continuations (token lists); a DraftTree merges them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from services.common.errors import InvalidRequest
from services.datastore.draft_tree import DraftTree
from services.datastore.rest_datastore import RestDatastore

DRAFTS = ("none", "rest", "prompt", "both")  # a request's draft source ("none": plain greedy)


class Proposer(Protocol):
    def propose(self, context: Sequence[int]) -> list[Sequence[int]]:
        """Continuations of `context` (each non-empty); [] when nothing matches."""
        ...


class RestProposer:
    """REST: what followed the context's longest matching suffix in the datastore's corpus."""

    def __init__(self, datastore: RestDatastore, *, max_suffix: int = 16, min_suffix: int = 2,
                 max_matches: int = 5000, continuation: int = 10) -> None:
        self.datastore = datastore
        self.max_suffix = max_suffix
        self.min_suffix = min_suffix
        self.max_matches = max_matches
        self.continuation = continuation

    def propose(self, context: Sequence[int]) -> list[Sequence[int]]:
        found = self.datastore.lookup(context, max_suffix=self.max_suffix, min_suffix=self.min_suffix,
                                      max_matches=self.max_matches, continuation=self.continuation)
        return list(found.continuations)


class PromptLookup:
    """Prompt lookup: the context's longest suffix (max_suffix..min_suffix tokens) that also ends earlier in
    the context, and the tokens that followed each such earlier occurrence (they may run into the suffix
    itself). Occurrences are taken in position order, the first `max_matches`."""

    def __init__(self, *, max_suffix: int = 16, min_suffix: int = 2, continuation: int = 10,
                 max_matches: int = 64) -> None:
        self.max_suffix = max_suffix
        self.min_suffix = min_suffix
        self.continuation = continuation
        self.max_matches = max_matches

    def propose(self, context: Sequence[int]) -> list[Sequence[int]]:
        a = np.asarray(context, dtype=np.int64)  # [n]
        n = len(a)
        k_max = min(self.max_suffix, n - 1)
        if k_max < self.min_suffix or self.continuation <= 0 or self.max_matches <= 0:
            return []
        # run[e]: how many tokens ending at e equal the context's last tokens (e <= n-2: one token follows)
        run = np.zeros(n - 1, dtype=np.int64)  # [n-1]
        still = np.ones(n - 1, dtype=bool)  # [n-1] matched all k tokens so far
        for k in range(k_max):
            eq = np.zeros(n - 1, dtype=bool)
            eq[k:] = a[: n - 1 - k] == a[n - 1 - k]  # a[e-k] == a[n-1-k]
            still &= eq
            if not still.any():
                break
            run += still
        best = int(run.max())
        if best < self.min_suffix:
            return []
        ends = np.flatnonzero(run >= best)[: self.max_matches]
        return [a[e + 1: e + 1 + self.continuation].tolist() for e in ends.tolist()]


class Merged:
    """All proposers' continuations, concatenated (one DraftTree then merges and counts them together)."""

    def __init__(self, proposers: Sequence[Proposer]) -> None:
        self.proposers = list(proposers)

    def propose(self, context: Sequence[int]) -> list[Sequence[int]]:
        out: list[Sequence[int]] = []
        for p in self.proposers:
            out.extend(p.propose(context))
        return out




class LocalDrafts:
    """Proposers on this process: REST's datastore (memory-mapped), prompt lookup over the context itself."""

    def __init__(self, datastore: RestDatastore | None) -> None:
        prompt = PromptLookup()
        self.proposers: dict[str, Proposer] = {"prompt": prompt}
        if datastore is not None:
            rest = RestProposer(datastore)
            self.proposers |= {"rest": rest, "both": Merged([rest, prompt])}

    def propose(self, kind: str, context: Sequence[int], budget: int) -> DraftTree:
        if kind not in self.proposers:
            raise InvalidRequest(f"draft source {kind!r} is not available here (have: {', '.join(self.proposers)})")
        return DraftTree.from_continuations(self.proposers[kind].propose(context), budget)
