"""The three retrievers behind one batched interface: `search(queries, k) -> hits per query`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from services.common.errors import InvalidRequest, Unavailable
from services.common.layout import Layout
from services.retriever.dense import DenseIndex, DenseParams, configure, exact_scores, load_index
from services.retriever.encoder import Encoder
from services.retriever.types import Hit, QueryKey, check_search

RETRIEVERS = ("exact", "approx", "sparse")


class Retriever(Protocol):
    """`search` is `search_embedded(embed(...))`, so the baseline, speculation and verification share one
    scoring path: speculation embeds a query once, scores it against its cache with `score`, and
    verification searches the index with that same key."""

    name: str
    dim: int | None  # dense vector size; None for BM25, whose key is the query text
    size: int  # passages indexed (ids 0..size-1)

    def embed(self, queries: Sequence[str]) -> list[QueryKey]:
        """One key per query, each independent of the others in the batch."""
        ...

    def search_embedded(self, keys: Sequence[QueryKey], k: int) -> list[list[Hit]]:
        """Top-k passages per key, best first; ties by ascending passage id."""
        ...

    def score(self, key: QueryKey, pids: Sequence[int]) -> list[float]:
        """This retriever's exact score of each given passage: what `search_embedded` ranks by."""
        ...

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]: ...


class DenseRetriever:
    def __init__(self, name: str, encoder: Encoder, index: DenseIndex) -> None:
        self.name, self.encoder, self.index = name, encoder, index
        self.dim: int | None = int(index.index.d)
        self.size = index.size

    def embed(self, queries: Sequence[str]) -> list[QueryKey]:
        check_search(queries, 1)
        return list(self.encoder.encode_queries(queries))

    def search_embedded(self, keys: Sequence[QueryKey], k: int) -> list[list[Hit]]:
        if not len(keys):
            raise InvalidRequest("no queries given")
        return self.index.search_vectors(np.stack(keys), k)

    def score(self, key: QueryKey, pids: Sequence[int]) -> list[float]:
        return exact_scores(self.index.vectors, key, np.asarray(pids, dtype=np.int64)).tolist()

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        check_search(queries, k)
        return self.search_embedded(self.embed(queries), k)


def pick(retrievers: Mapping[str, Retriever], name: str) -> Retriever:
    """The retriever `name` among those this process opened."""
    if name not in retrievers:
        raise Unavailable(f"this replica does not serve the {name} retriever (it serves {', '.join(retrievers)})")
    return retrievers[name]


def check_pids(ret: Retriever, pids: Sequence[int]) -> list[int]:
    bad = [p for p in pids if not 0 <= p < ret.size]
    if bad:
        raise InvalidRequest(f"passage ids must be in 0..{ret.size - 1}; got {bad[:5]}")
    return list(pids)


@dataclass(frozen=True)
class RetrieverSettings:
    approx_kind: str = "hnsw"  # the approximate dense index: hnsw (as in the paper) or ivf
    dense: DenseParams = DenseParams()
    bm25_k1: float = 0.9  # Anserini defaults
    bm25_b: float = 0.4


def open_retriever(name: str, layout: Layout, encoder: Encoder | None = None,
                   settings: RetrieverSettings = RetrieverSettings()) -> Retriever:
    if name not in RETRIEVERS:
        raise InvalidRequest(f"unknown retriever {name!r}; choose one of: {', '.join(RETRIEVERS)}")
    if name == "sparse":
        from services.retriever.sparse import SparseRetriever

        return SparseRetriever(layout.lucene_index, k1=settings.bm25_k1, b=settings.bm25_b)
    configure(settings.dense)
    kind = "flat" if name == "exact" else settings.approx_kind
    vectors = np.load(layout.embeddings, mmap_mode="r")  # [N, d] float32, shared with the OS page cache
    index = DenseIndex(load_index(layout.faiss_index(kind), settings.dense), kind, vectors)
    return DenseRetriever(name, encoder or Encoder(), index)
