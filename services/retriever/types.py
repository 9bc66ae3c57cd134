from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.common.errors import InvalidRequest


@dataclass(frozen=True, order=True)
class Hit:
    """One retrieved passage: its id in the passage store and the retriever's score (higher = better)."""

    score: float
    pid: int


def top_k(pids: Sequence[int], scores: Sequence[float], k: int) -> list[Hit]:
    """The ranking rule every retriever and the speculation cache share: score descending, then passage id."""
    order = sorted(range(len(pids)), key=lambda i: (-scores[i], pids[i]))[:k]
    return [Hit(float(scores[i]), int(pids[i])) for i in order]


def check_search(queries: Sequence[str], k: int) -> None:
    """The input rules every retriever enforces, with messages written for a person."""
    if k <= 0:
        raise InvalidRequest(f"k must be a positive number of passages, got {k}")
    if not queries:
        raise InvalidRequest("no queries given")
    for i, q in enumerate(queries):
        if not isinstance(q, str) or not q.strip():
            raise InvalidRequest(f"query {i} is empty: a retrieval query needs some text")
