"""Dense retrieval over FAISS: exact (IndexFlatIP) and approximate (HNSW, IVF) inner-product indexes.

The vectors are the L2-normalised passage embeddings, row i = passage id i, so inner product = cosine.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from services.common.errors import InvalidRequest, Unavailable
from services.retriever.types import Hit, top_k

log = logging.getLogger(__name__)

KINDS = ("flat", "hnsw", "ivf")


@dataclass(frozen=True)
class DenseParams:
    hnsw_m: int = 32  # graph degree (assets.md: M 32 is a good CPU trade-off; the paper used 64)
    hnsw_ef_construction: int = 40  # the paper's efC
    hnsw_ef_search: int = 128
    ivf_nprobe: int = 16
    omp_threads: int = 1  # on 2 cores, 1 OpenMP thread searched faster than 2


def configure(params: DenseParams) -> None:
    faiss.omp_set_num_threads(params.omp_threads)
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD


# FAISS scans the rows once per query below `nq * d` = this, and runs one BLAS product for the whole batch at or
# above it. Measured on this 2-core CPU, 1 thread: a scan costs c·nq, a product F + small·nq with a fixed cost F
# of ~4 scans (one-row product: 49k x 384 k=20, 37 vs 9 ms; 600k x 576 k=1024, 295-324 vs 50 ms). Crossover:
# 4 queries (49k x 384), 5 (40k x 576), 7 (600k x 576: 4 queries 258 vs 274 ms, 8: 475 vs 294 ms). So up to 6
# queries of 576 dims (10 of 384) scan, more multiply. Results never depend on it: every search re-scores its
# candidates exactly (`rescore` here, `knn_datastore.search`). Process-wide: one policy for all indexes.
BLAS_THRESHOLD = 7 * 576


def ivf_nlist(n: int) -> int:
    """~4 sqrt(n) lists, at least 39 training points per list (FAISS warns below that)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def build_index(kind: str, vectors: np.ndarray, params: DenseParams = DenseParams()) -> faiss.Index:
    n, d = vectors.shape
    index: faiss.Index
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(d, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = params.hnsw_ef_construction
        index = hnsw
    elif kind == "ivf":
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, ivf_nlist(n), faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
    else:
        raise InvalidRequest(f"unknown dense index kind {kind!r}; choose one of {KINDS}")
    from tqdm import tqdm

    step = 2048  # add in chunks so a long HNSW build shows progress
    for i in tqdm(range(0, n, step), desc=f"faiss {kind}", unit="chunk", disable=n <= step):
        index.add(vectors[i : i + step])
    return index


def load_index(path: Path, params: DenseParams = DenseParams()) -> faiss.Index:
    if not path.exists():
        raise Unavailable(f"{path} is missing: run `ralmspec assets --profile {path.parent.name}`")
    index = faiss.read_index(str(path))
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = params.hnsw_ef_search
    elif isinstance(index, faiss.IndexIVF):
        index.nprobe = params.ivf_nprobe
    return index


RESCORE_MARGIN = 8  # extra FAISS candidates re-scored exactly, so float32 noise never decides the top k


def rescore(vectors: np.ndarray, query: np.ndarray, candidates: np.ndarray, k: int) -> list[Hit]:
    """Exact float64 inner products of one query with candidate rows, best first, ties by passage id.

    FAISS's float32 scores depend on how a batch was blocked for BLAS (1e-7 apart for the same query alone
    or in a batch); re-scoring in float64 makes a query's ranking independent of its batch, and the
    speculation cache scores with this same function, so cache and index agree on every tie."""
    cand = np.unique(candidates[candidates >= 0])
    return top_k(cand.tolist(), exact_scores(vectors, query, cand).tolist(), k)


def exact_scores(vectors: np.ndarray, query: np.ndarray, pids: np.ndarray) -> np.ndarray:
    """float64 inner products [len(pids)] of one query with the stored rows: the dense scoring function.

    Each float32 x float32 product is exact in float64, and numpy sums each contiguous row the same way
    whatever the number of rows, so a passage's score never depends on which other passages are scored
    with it (a BLAS matrix-vector product gives no such promise): the index and the cache agree bit for bit."""
    rows = np.ascontiguousarray(vectors[pids], dtype=np.float64)  # [c, d]
    return (rows * query.astype(np.float64)).sum(axis=1)


class DenseIndex:
    """A FAISS index searched with query vectors; `search_vectors` is what verification calls (the same
    vector that speculation scored against the cache). `vectors` are the indexed rows (memory-mapped)."""

    def __init__(self, index: faiss.Index, kind: str, vectors: np.ndarray) -> None:
        if len(vectors) != index.ntotal:
            raise Unavailable(f"the {kind} index holds {index.ntotal} vectors but the embeddings {len(vectors)}")
        self.index, self.kind, self.vectors = index, kind, vectors

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def search_vectors(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """queries: float32 [n, d] -> n lists of up to k hits, best first."""
        if k <= 0:
            raise InvalidRequest(f"k must be a positive number of passages, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.index.d:
            raise InvalidRequest(f"query vectors must be [n, {self.index.d}], got {list(queries.shape)}")
        if len(queries) == 0:
            return []
        _, ids = self.index.search(queries, min(k + RESCORE_MARGIN, self.size))  # [n, k + margin]
        return [rescore(self.vectors, q, row, k) for q, row in zip(queries, ids)]


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int) -> list[list[Hit]]:
    """numpy brute force in float64: the reference the flat index is tested against."""
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T  # [q, n]
    out = []
    for row in scores:
        order = np.lexsort((np.arange(len(row)), -row))[:k]
        out.append([Hit(float(row[i]), int(i)) for i in order])
    return out
