"""RaLMSpec's per-request speculation cache for KNN-LM: the datastore entries retrieved (and their successors)
over the last few generations, searched for a query's nearest neighbours among them.

`lookup` is the exact top-k over the cached entries with the datastore's own scoring (`exact_distances`,
ranked by distance then entry id), so its distances for an entry equal `KnnDatastore.search`'s bit for bit and,
when the datastore's true top-k is cached, the cache returns exactly it. To stay ~1 ms for 10k entries it
scores every entry in float32 with FAISS's single-threaded SIMD kernel (a BLAS product would be faster alone but
multi-threaded BLAS waits for a busy second core: 0.2 vs 8 ms measured on the shared 2-core machine), keeps
the entries float32's error bound cannot rule out, and re-scores only those exactly:
    a_i = fl32(sum_j (c_ij - q_j)²),   |a_i - D_i| <= γ(d+2) D_i   (every term is >= 0)
    U = k-th smallest of a_i (1 + g);  entry i can be in the top k only if a_i (1 - g) <= U, g = γ/(1-γ).
"""

from __future__ import annotations

import faiss
import numpy as np

from services.common.bounds import Bound
from services.common.errors import InvalidRequest
from services.retriever.knn_index import U32, KnnDatastore, exact_distances, rank
from services.retriever.types import Neighbours

SUCCESSORS = Bound(1, 64)  # entries cached after each verified neighbour (the paper's n is 10)


def check_successors(n: int) -> int:
    return SUCCESSORS.check("successors", n)


class KnnCache:
    def __init__(self, datastore: KnnDatastore, max_generations: int = 1) -> None:
        if max_generations < 1:
            raise InvalidRequest(f"max_generations must be >= 1, got {max_generations}")
        self.datastore = datastore
        self.max_generations = max_generations
        self._gens: list[np.ndarray] = []  # unique entry ids of each live generation, oldest first
        d = datastore.dim
        self._ids = np.zeros(0, np.int64)  # [m] cached entry ids, ascending
        self._keys = np.zeros((0, d), np.float32)  # [m, d] their keys
        g = (d + 2) * U32
        self._slack = 2 * g / (1 - g)  # relative bound of a float32 sum of squares, with room

    def __len__(self) -> int:
        return len(self._ids)

    def clear(self) -> None:
        self._gens.clear()
        self._ids, self._keys = self._ids[:0], self._keys[:0]

    def insert(self, ids: np.ndarray) -> int:
        """Add one generation of entry ids (any shape, -1 ignored) and drop generations beyond max_generations;
        returns how many of these ids were not cached before."""
        new = np.unique(np.asarray(ids, dtype=np.int64).ravel())
        new = new[new >= 0]
        if len(new) and new[-1] >= self.datastore.size:
            raise InvalidRequest(f"entry ids must be < {self.datastore.size}, got {new[-1]}")
        added = int((~np.isin(new, self._ids, assume_unique=True)).sum())
        self._gens = (self._gens + [new])[-self.max_generations :]
        live = np.unique(np.concatenate(self._gens))
        pos = np.minimum(np.searchsorted(self._ids, live), max(len(self._ids) - 1, 0))
        have = (self._ids[pos] == live) if len(self._ids) else np.zeros(len(live), bool)
        keys = np.empty((len(live), self.datastore.dim), np.float32)
        keys[have] = self._keys[pos[have]]
        keys[~have] = self.datastore.gather(live[~have])  # keys read once, when an entry enters the cache
        self._ids, self._keys = live, keys
        return added

    def insert_after(self, ids: np.ndarray, n: int) -> int:
        """One generation: the n entries that follow each of `ids` in its text (RaLMSpec's prefetch for KNN-LM:
        the next token's neighbours are mostly the successors of this token's)."""
        return self.insert(self.datastore.successors(ids, check_successors(n)))

    def neighbours(self, query: np.ndarray, k: int) -> Neighbours:
        """`lookup`, with each entry's token."""
        return self.datastore.with_tokens(*self.lookup(query, k))

    def close(self) -> None:
        self.clear()

    def lookup(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """query [d] float32 -> (squared L2 distances [k'] float32 ascending, entry ids [k'] int64), the exact
        nearest cached entries, ties by entry id; k' = min(k, len(self))."""
        if k <= 0:
            raise InvalidRequest(f"k must be a positive number of neighbours, got {k}")
        q = np.ascontiguousarray(query, dtype=np.float32).ravel()
        if len(q) != self.datastore.dim:
            raise InvalidRequest(f"the query must have {self.datastore.dim} dims, got {len(q)}")
        m = len(self._ids)
        if m == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        cand = np.arange(m)
        if k < m:
            approx = np.empty(m, dtype=np.float32)  # [m]
            faiss.fvec_L2sqr_ny(faiss.swig_ptr(approx), faiss.swig_ptr(q), faiss.swig_ptr(self._keys),  # type: ignore[attr-defined]
                                len(q), m)
            a = approx.astype(np.float64)
            upper = np.partition(a, k - 1)[k - 1] * (1 + self._slack)
            cand = np.flatnonzero(a * (1 - self._slack) <= upper)
        dist = exact_distances(self._keys[cand], q)
        best = rank(dist, self._ids[cand], k)
        return dist[best].astype(np.float32), self._ids[cand][best]
