"""The three retrievers behind one batched interface: `search(queries, k) -> hits per query`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from services.common.errors import InvalidRequest
from services.common.layout import Layout
from services.retriever.dense import DenseIndex, DenseParams, configure, load_index
from services.retriever.encoder import Encoder
from services.retriever.types import Hit, check_search

RETRIEVERS = ("exact", "approx", "sparse")


class Retriever(Protocol):
    name: str

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """Top-k passages per query, best first; ties by ascending passage id."""
        ...


class DenseRetriever:
    def __init__(self, name: str, encoder: Encoder, index: DenseIndex) -> None:
        self.name, self.encoder, self.index = name, encoder, index

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        check_search(queries, k)
        return self.index.search_vectors(self.encoder.encode_queries(queries), k)


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
