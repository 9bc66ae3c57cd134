"""RaLMSpec's per-request speculation cache: the passages retrieved so far, scored for a new query with the
real retriever's own scoring function, so its top-1 is the real top-1 whenever that passage is cached.

Dense retrievers score by float64 inner product with the index's own stored rows; BM25 by Lucene's formula
with the index's corpus statistics (df, N, average length, k1, b). Ties: score descending, then passage id,
as every retriever ranks. Entries are deduplicated and never evicted (a request's cache stays small).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from services.retriever.types import Hit, top_k

Scorer = Callable[[Any, Sequence[int]], list[float]]  # (query key, passage ids) -> exact scores


class SpeculationCache:
    def __init__(self, score: Scorer) -> None:
        self._score = score
        self._pids: list[int] = []
        self._seen: set[int] = set()

    def __len__(self) -> int:
        return len(self._pids)

    def __contains__(self, pid: object) -> bool:
        return pid in self._seen

    def insert(self, pids: Iterable[int]) -> int:
        """Add passages not yet cached; returns how many were new."""
        added = 0
        for pid in pids:
            if pid >= 0 and pid not in self._seen:
                self._seen.add(pid)
                self._pids.append(pid)
                added += 1
        return added

    def lookup(self, key: Any, k: int = 1) -> list[Hit]:
        """The cache's top-k for a query key, best first ([] when empty)."""
        if not self._pids:
            return []
        return top_k(self._pids, self._score(key, self._pids), k)
