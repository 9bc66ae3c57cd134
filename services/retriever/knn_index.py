"""KNN-LM's datastore and its search: one entry per corpus token, key = the LM's final hidden state (the final-norm
output the LM head reads) after a passage's tokens 0..j, value = token j+1 of that passage. A retriever: the
per-request KNN speculation cache (`services/datastore/knn_cache.py`) reads entries and scores through it.

Folder (`Layout.knn_datastore(model)`), written by `knn_build.build`:
    keys.npy     float16 [N, d]  memory-mapped at load
    values.npy   int32 [N]       the token that followed the context of keys[i]
    text.npy     int32 [N]       passage id of entry i; a passage's entries are contiguous and in order, so entry
                                 i+1 continues entry i iff text[i+1] == text[i]
    ivf.index    FAISS IndexIVFFlat over the keys (the approximate index), memory-mapped at load
    meta.json    written last, atomically: it exists iff the build is complete
    progress.json  while building: batches done, so a rerun resumes (removed once meta.json is written)

Exactness. The fp16 keys are the datastore: the exact index (IndexFlatL2 over their float32 upcast, filled at
load, no float32 copy on disk), the IVF index, `gather` and the speculation cache all hold the same fp16-rounded
values, so the baseline and every speculative path see identical keys. fp16 only moves the KNN distribution
relative to float32 keys (measured on SmolLM2-135M, tiny profile: max per-key relative L2 error 3.8e-4,
`meta.json` fp16_max_rel_error); it never makes two paths disagree. Exact ties are common: every passage of
one article starts with the same title line, so their first keys are equal (tiny: 2000 of 40k entries share
their key, up to 101 at once); ties rank by entry id everywhere.

Distances. FAISS's float32 distances depend on its kernel (faiss 1.15): while nq·d < `faiss.cvar.
distance_compute_blas_threshold` (128000 by default: up to 222 queries of 576 dims) each distance is a sequential
float32 sum of squared differences and a batch gives bit-identical distances to each query alone; past it
(`services.retriever.dense.BLAS_THRESHOLD`, set at load: 7+ queries of 576 dims, where one product beats
separate scans), they come from |x|² + |y|² - 2x·y with sgemm, differ from the sequential ones in the last
bits (up to 3e-3 here), and a batch may or may not equal its queries alone (tiny profile, 8 queries: 25% of
distances and 12% of top-32 ids differed). See tests/retriever/test_knn_index.py::test_faiss_batch_vs_single.
Batches of up to SCAN_MAX_BATCH queries scan an fp16 scalar-quantizer twin of the flat index instead (the same
fp16 values, decoded exactly, half the bytes to read; its float32 sums obey the same bound below). So `search`
never returns FAISS's numbers: it takes FAISS's top k + margin as candidates and re-scores them
with `exact_distances` (float64 sums of squared differences of the stored rows, one row at a time, independent
of what else is scored), ranked by (distance, entry id). The exact index's answer is certified: with FAISS's
float32 error bound e = γ(d+4)·(|q| + max|key|)², every entry FAISS left out is at least (its last distance - e)
away; when the k-th re-scored distance is not below that, the search is repeated with a 4x wider margin. So the
exact top-k is the true (float64) top-k with ties by id, identical for a query alone or in any batch, and equal
bit for bit to what `KnnCache.lookup` returns when those entries are cached. The IVF answer is re-scored the same
way but is approximate (its candidate set depends on the probed lists). Cost (tiny, 40k entries, one thread,
k = 1024): exact 5.4 ms for 1 query (FAISS 3.5 + re-scoring; 17 ms when a BLAS product is forced for one
query), 42 ms for 8; IVF (nprobe 32) 3.2 / 18 ms.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from services.common.errors import InvalidRequest, Unavailable
from services.retriever.dense import BLAS_THRESHOLD, ivf_nlist
from services.retriever.types import KNN_INDEXES, Neighbours, check_knn_index

FORMAT_VERSION = 1
REBUILD = "rebuild with `ralmspec assets` (services.retriever.knn_build.build)"
NOT_BUILT = "this replica has no KNN-LM datastore (build it with `ralmspec assets`)"
IVF_TRAIN_MAX = 100_000  # keys sampled to train the IVF centroids
ADD_CHUNK = 65_536  # keys upcast to float32 at a time when filling an index (bounds peak RAM)
SCORE_CHUNK = 64  # rows per float64 block in exact_distances
# Exact searches of up to this many queries scan the fp16 twin of the flat index (bench/results/knn_search.md,
# 600k x 576, k 1024, one thread: 31-38 ms a query against 77-90 for the float32 scan); larger batches take the
# float32 index's BLAS product, which reads the index once per batch (16 queries: 425 ms against ~560).
SCAN_MAX_BATCH = 8
U32 = 2.0**-24  # float32 unit roundoff


def exact_distances(rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """float64 squared L2 distances [m] of float16|float32 rows [m, d] to one query [d]: the scoring function
    of every KNN path. Each difference is exact in float64 and numpy sums each contiguous row the same way
    whatever the number of rows, so an entry's distance never depends on which others are scored (float16 and
    float32 copies of a key score the same). Chunked so the float64 temporaries stay in cache."""
    q = np.asarray(query, dtype=np.float64).ravel()
    out = np.empty(len(rows), dtype=np.float64)
    for i in range(0, len(rows), SCORE_CHUNK):
        diff = np.asarray(rows[i : i + SCORE_CHUNK], dtype=np.float64)  # [c, d]
        diff -= q
        diff *= diff
        out[i : i + SCORE_CHUNK] = diff.sum(axis=1)
    return out


def rank(dists: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k best (distance ascending, then entry id) among candidates."""
    return np.lexsort((ids, dists))[:k]


class KnnDatastore:
    def __init__(self, keys: np.ndarray, values: np.ndarray, text: np.ndarray, meta: dict) -> None:
        self.keys = keys  # [N, d] float16, memory-mapped
        self._rows = np.asarray(keys)  # a plain ndarray view of the same mapping: cheaper fancy indexing
        self.values = values  # [N] int32
        self.text = text  # [N] int32
        self.meta = meta
        starts = np.flatnonzero(np.diff(text)) + 1 if len(text) else np.zeros(0, np.int64)
        self._run_starts = np.concatenate([[0], starts]).astype(np.int64)  # [runs] first entry of each passage
        self._run_ends = np.concatenate([starts, [len(text)]]).astype(np.int64)  # [runs] one past its last
        self._max_norm = float(meta["max_key_norm"])
        self._indexes: dict[str, faiss.Index] = {}
        self._scan: faiss.Index | None = None  # the exact index's fp16 twin, for batches of few queries
        self.retries = 0  # exact searches repeated with a wider margin (certificate failed), for stats

    @property
    def dim(self) -> int:
        return int(self.keys.shape[1])

    @property
    def size(self) -> int:
        return int(self.keys.shape[0])

    @classmethod
    def load(cls, folder: Path, indexes: Sequence[str] = KNN_INDEXES, nprobe: int = 32) -> KnnDatastore:
        meta = read_meta(folder)
        keys = np.load(folder / "keys.npy", mmap_mode="r")
        values = np.load(folder / "values.npy", mmap_mode="r")
        text = np.load(folder / "text.npy", mmap_mode="r")
        n, d = meta["entries"], meta["dim"]
        if keys.shape != (n, d) or keys.dtype != np.float16 or values.shape != (n,) or text.shape != (n,):
            raise Unavailable(f"{folder} does not match its meta.json (truncated or mixed builds): {REBUILD}")
        store = cls(keys, values, text, meta)
        store._open(indexes, folder / "ivf.index", nprobe)
        return store

    @classmethod
    def from_arrays(cls, keys: np.ndarray, values: np.ndarray, text: np.ndarray,
                    indexes: Sequence[str] = ("exact",), nprobe: int = 32) -> KnnDatastore:
        """An in-memory datastore over given entries (tests, experiments); keys are rounded to float16 and each
        text's entries must be contiguous."""
        k16 = np.ascontiguousarray(keys, dtype=np.float16)
        meta = {"version": FORMAT_VERSION, "entries": len(k16), "dim": k16.shape[1], "max_key_norm": max_key_norm(k16)}
        store = cls(k16, np.asarray(values, dtype=np.int32), np.asarray(text, dtype=np.int32), meta)
        store._open(indexes, None, nprobe)
        return store

    def _open(self, indexes: Sequence[str], ivf_path: Path | None, nprobe: int) -> None:
        faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD  # the process-wide policy, whoever loads first
        for name in indexes:
            check_knn_index(name)
        if "exact" in indexes:
            self._indexes["exact"] = flat_index(self.keys)
            self._scan = fp16_index(self.keys)
        if "approx" in indexes:
            ivf: Any
            if ivf_path is None:
                ivf, _ = ivf_index(self.keys)
            else:
                ivf = faiss.read_index(str(ivf_path), faiss.IO_FLAG_MMAP)  # inverted lists stay on disk
            ivf.nprobe = nprobe
            self._indexes["approx"] = ivf

    def search(self, queries: np.ndarray, k: int, index: str = "exact") -> tuple[np.ndarray, np.ndarray]:
        """queries [q, d] float32 -> (squared L2 distances [q, k] float32 ascending, entry ids [q, k] int64;
        -1 ids with +inf distances pad when fewer). Distances are `exact_distances`, ties by entry id."""
        if index not in self._indexes:
            raise InvalidRequest(f"KNN index {index!r} is not loaded (loaded: {sorted(self._indexes)})")
        if k <= 0:
            raise InvalidRequest(f"k must be a positive number of neighbours, got {k}")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InvalidRequest(f"queries must be [n, {self.dim}], got {list(q.shape)}")
        out_d = np.full((len(q), k), np.inf, dtype=np.float32)
        out_i = np.full((len(q), k), -1, dtype=np.int64)
        exact = index == "exact"
        todo = np.arange(len(q))
        want = min(self.size, k + max(16, k // 4))  # FAISS candidates re-scored per query
        while len(todo) and self.size:
            ix = self._indexes[index]
            if exact and self._scan is not None and len(todo) <= SCAN_MAX_BATCH:
                ix = self._scan
            fd, fi = ix.search(q[todo], want)  # [t, want] each
            retry = []
            for row, f_last, cand in zip(todo, fd[:, -1], fi):
                cand = cand[cand >= 0]
                dist = exact_distances(self._rows[cand], q[row])
                best = rank(dist, cand, k)
                if exact and want < self.size and not self._certified(dist[best[-1]], float(f_last), q[row]):
                    retry.append(row)
                    continue
                out_d[row, : len(best)] = dist[best]
                out_i[row, : len(best)] = cand[best]
            self.retries += len(retry)
            todo, want = np.array(retry, dtype=np.int64), min(self.size, want * 4)
        return out_d, out_i

    def neighbours(self, queries: np.ndarray, k: int, index: str = "exact") -> list[Neighbours]:
        """`search`, one `Neighbours` per query row, with each entry's token."""
        dists, ids = self.search(queries, k, index)
        return [self.with_tokens(d, i) for d, i in zip(dists, ids)]

    def with_tokens(self, dists: np.ndarray, ids: np.ndarray) -> Neighbours:
        return Neighbours(dists, ids, np.where(ids >= 0, self.values[np.maximum(ids, 0)], -1).astype(np.int64))

    def _certified(self, kth: float, faiss_last: float, query: np.ndarray) -> bool:
        """True when no entry FAISS left out can beat the k-th re-scored distance. FAISS's float32 distance (either
        kernel) is within γ(d+4)·(|q| + max|key|)² of the true one; kth is exact to ~1e-13 relative."""
        g = (self.dim + 4) * U32
        err = g / (1 - g) * (float(np.linalg.norm(query.astype(np.float64))) + self._max_norm) ** 2
        return kth * (1 + 1e-12) < faiss_last - err

    def successors(self, ids: np.ndarray, n: int) -> np.ndarray:
        """int64 unique entry ids i+1..i+n following each id in ids (any shape, -1 ignored) within the same
        text, ascending."""
        flat = np.asarray(ids, dtype=np.int64).ravel()
        flat = flat[flat >= 0]
        if n <= 0 or not len(flat):
            return np.zeros(0, np.int64)
        self._check_ids(flat)
        end = self._run_ends[np.searchsorted(self._run_starts, flat, side="right") - 1]  # [m]
        nxt = flat[:, None] + np.arange(1, n + 1)  # [m, n]
        return np.unique(nxt[nxt < end[:, None]])

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """keys of entries as float32 [len(ids), d] (the exact values the exact index holds)."""
        idx = np.asarray(ids, dtype=np.int64)
        self._check_ids(idx)
        return np.asarray(self._rows[idx], dtype=np.float32)

    def _check_ids(self, ids: np.ndarray) -> None:
        if len(ids) and (ids.min() < 0 or ids.max() >= self.size):
            raise InvalidRequest(f"entry ids must be in [0, {self.size})")


def _filled(index: Any, keys: np.ndarray, dtype: type) -> Any:
    """`index` (flat codes: one row of `dtype` per key) holding fp16 `keys`, filled in place chunk by chunk (peak
    RAM: the index plus one chunk; `add` would reallocate and copy)."""
    n, d = keys.shape
    size = n * d * np.dtype(dtype).itemsize
    index.codes.resize(size)
    if n:
        rows: np.ndarray = faiss.rev_swig_ptr(index.codes.data(), size).view(dtype).reshape(n, d)
        for i in range(0, n, ADD_CHUNK):
            rows[i : i + ADD_CHUNK] = keys[i : i + ADD_CHUNK]
    index.ntotal = n
    return index


def fp16_index(keys: np.ndarray) -> faiss.IndexScalarQuantizer:
    """An fp16 scalar-quantizer index over fp16 keys: its codes are the keys' own bytes (decoding is exact), so it
    holds the same values as `flat_index` in half the bytes, and a scan reads half the memory."""
    sq = faiss.IndexScalarQuantizer(keys.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
    return _filled(sq, keys, np.float16)


def flat_index(keys: np.ndarray) -> faiss.IndexFlatL2:
    """IndexFlatL2 over the float32 upcast of fp16 keys."""
    return _filled(faiss.IndexFlatL2(keys.shape[1]), keys, np.float32)


def read_meta(folder: Path) -> dict:
    path = folder / "meta.json"
    if not path.exists():
        raise Unavailable(f"KNN datastore {folder} is missing or incomplete (no meta.json): {REBUILD}")
    meta: dict = json.loads(path.read_text())
    if meta.get("version") != FORMAT_VERSION:
        raise Unavailable(f"{folder} has format version {meta.get('version')}, this code reads "
                          f"{FORMAT_VERSION}: {REBUILD}")
    return meta


def ivf_index(keys: np.ndarray) -> tuple[faiss.IndexIVFFlat, int]:
    """IVFFlat (L2) trained on <= IVF_TRAIN_MAX sampled keys; returns (index, nlist)."""
    n, d = keys.shape
    sample = np.sort(np.random.default_rng(0).choice(n, size=min(n, IVF_TRAIN_MAX), replace=False))
    nlist = min(ivf_nlist(n), max(1, len(sample) // 39))  # ~4 sqrt(n), >= 39 training keys per list
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist, faiss.METRIC_L2)
    index.train(np.asarray(keys[sample], dtype=np.float32))
    for i in range(0, n, ADD_CHUNK):
        index.add(np.asarray(keys[i : i + ADD_CHUNK], dtype=np.float32))
    return index, nlist


def max_key_norm(keys: np.ndarray) -> float:
    """max |key| over float16 keys [n, d], in float64, chunk by chunk."""
    out = 0.0
    for i in range(0, len(keys), ADD_CHUNK):
        out = max(out, float(np.sqrt((np.asarray(keys[i : i + ADD_CHUNK], dtype=np.float64) ** 2).sum(1).max())))
    return out


def held_out_passages(folder: Path, passages: int) -> list[int]:
    """Ids of the passages (of `passages`) with no entry in the datastore at `folder`: text whose continuation
    KNN-LM has to predict rather than copy (prompts for benchmarks and the demo)."""
    inside = set(np.unique(np.load(folder / "text.npy", mmap_mode="r")).tolist())
    return [i for i in range(passages) if i not in inside]

