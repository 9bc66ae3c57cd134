"""The retrievers' value types and input rules: light (numpy only), so codecs and the verifier load no index."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.common.bounds import Bound
from services.common.errors import InvalidRequest

QueryKey = Any  # what a retriever scores a query by: a float32 [d] vector (dense) or the query text (sparse)
NO_DOC = -1  # a query the retriever found nothing for (BM25 with only stop words)
KNN_INDEXES = ("exact", "approx")  # KNN-LM datastore indexes: FAISS flat L2 | IVF
KNN_K = Bound(1, 4096)  # neighbours per KNN query
PASSAGE_K = Bound(1, 1000)  # passages per query a search returns (also the depth of RaLMSpec's prefetch)


@dataclass(frozen=True, order=True)
class Hit:
    """One retrieved passage: its id in the passage store and the retriever's score (higher = better)."""

    score: float
    pid: int


@dataclass(frozen=True)
class Neighbours:
    """One query's nearest datastore entries, as KNN-LM consumes them (search, cache lookup and the wire)."""

    dists: np.ndarray  # [m] float32 squared L2 distances, ascending (ties by entry id)
    ids: np.ndarray  # [m] int64 entry ids (-1: padding, fewer than k entries)
    tokens: np.ndarray  # [m] int64 the token that followed each entry's context (its value; -1 for padding)


def top_k(pids: Sequence[int], scores: Sequence[float], k: int) -> list[Hit]:
    """The ranking rule every retriever and the speculation cache share: score descending, then passage id."""
    order = sorted(range(len(pids)), key=lambda i: (-scores[i], pids[i]))[:k]
    return [Hit(float(scores[i]), int(pids[i])) for i in order]


def top1(hits: Sequence[Sequence[Hit]]) -> list[int]:
    """The top passage id of each query's hits (NO_DOC where none)."""
    return [row[0].pid if row else NO_DOC for row in hits]


def check_search(queries: Sequence[str], k: int) -> None:
    """The input rules every retriever enforces, with messages written for a person."""
    if k <= 0:
        raise InvalidRequest(f"k must be a positive number of passages, got {k}")
    if not queries:
        raise InvalidRequest("no queries given")
    for i, q in enumerate(queries):
        if not isinstance(q, str) or not q.strip():
            raise InvalidRequest(f"query {i} is empty: a retrieval query needs some text")


def check_knn_k(k: int) -> None:
    """The rule on k of a KNN-LM datastore search (the retriever's, the caches' and KnnLmConfig's)."""
    KNN_K.check("k (neighbours per token)", k)


def check_knn_index(index: str) -> None:
    if index not in KNN_INDEXES:
        raise InvalidRequest(f"unknown KNN index {index!r}; choose {' or '.join(KNN_INDEXES)}")
