"""KNN speculation cache: exact top-k among cached entries (= brute force, = the datastore's own answer when its
top-k is cached), generations dropped in order."""

from __future__ import annotations

import time

import numpy as np
import pytest

from services.common.errors import InvalidRequest
from services.datastore.knn_cache import KnnCache
from services.retriever.knn_index import KnnDatastore, exact_distances


@pytest.fixture(scope="module")
def store() -> KnnDatastore:
    """4000 clustered 48-dim entries in passages of 50, with exact duplicates (ties) and near-duplicates."""
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 4, (20, 48))
    keys = centers[rng.integers(0, 20, 4000)] + rng.normal(0, 1, (4000, 48))
    keys[100:150] = keys[200:250]  # a duplicated passage
    keys[300] = keys[301] + 1e-3  # rounds to the same float16 key or next to it
    return KnnDatastore.from_arrays(keys, rng.integers(0, 50, 4000), np.arange(4000) // 50)


def _brute(store: KnnDatastore, ids: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.unique(ids[ids >= 0])
    d = ((np.asarray(store.keys[ids], dtype=np.float64) - q.astype(np.float64)) ** 2).sum(1)
    best = np.lexsort((ids, d))[:k]
    return d[best], ids[best]


@pytest.mark.parametrize("seed", range(4))
def test_lookup_equals_brute_force(store, seed):
    rng = np.random.default_rng(seed)
    cache = KnnCache(store)
    ids = rng.integers(-1, store.size, rng.integers(1, 3000))
    cache.insert(ids)
    assert len(cache) == len(np.unique(ids[ids >= 0]))
    for _ in range(20):
        q = (store.gather(rng.integers(0, store.size, 1))[0] + rng.normal(0, rng.choice([0, 0.1, 2]), 48))
        q = q.astype(np.float32)
        for k in (1, 7, 64, 5000):
            dist, got = cache.lookup(q, k)
            bd, bi = _brute(store, ids, q, k)
            np.testing.assert_array_equal(got, bi)
            np.testing.assert_allclose(dist, bd, rtol=1e-6)
            assert dist.dtype == np.float32 and got.dtype == np.int64 and len(got) == min(k, len(cache))


def test_ties_break_by_entry_id(store):
    cache = KnnCache(store)
    cache.insert(np.array([230, 130, 5]))  # 130 duplicates 230's key
    dist, ids = cache.lookup(store.gather(np.array([230]))[0], 2)
    assert ids.tolist() == [130, 230] and dist.tolist() == [0.0, 0.0]


def test_lookup_equals_the_datastore_when_its_top_k_is_cached(store):
    rng = np.random.default_rng(5)
    q = (store.gather(rng.integers(0, store.size, 30)) + rng.normal(0, 0.5, (30, 48))).astype(np.float32)
    dist, ids = store.search(q, 32)
    for r in range(len(q)):
        cache = KnnCache(store)
        cache.insert(np.concatenate([ids[r], rng.integers(0, store.size, 500), store.successors(ids[r], 3)]))
        cd, ci = cache.lookup(q[r], 32)
        assert ci.tolist() == ids[r].tolist()
        assert cd.tobytes() == dist[r].tobytes()  # the same scoring function, bit for bit
        assert cd.tobytes() == exact_distances(store.gather(ci), q[r]).astype(np.float32).tobytes()


def test_generations_are_dropped_oldest_first(store):
    cache = KnnCache(store, max_generations=2)
    assert cache.insert(np.array([[1, 2], [2, -1]])) == 2
    assert cache.insert(np.array([2, 3])) == 1
    assert len(cache) == 3
    assert cache.insert(np.array([4])) == 1  # drops generation {1, 2}; 2 is kept by {2, 3}
    assert len(cache) == 3
    assert sorted(cache.lookup(np.zeros(48, np.float32), 10)[1].tolist()) == [2, 3, 4]
    one = KnnCache(store)
    one.insert(np.array([7, 8]))
    assert one.insert(np.array([8, 9])) == 1 and sorted(one.lookup(np.zeros(48, np.float32), 5)[1]) == [8, 9]
    np.testing.assert_array_equal(one._keys, store.gather(np.array([8, 9])))
    one.clear()
    assert len(one) == 0 and one.lookup(np.zeros(48, np.float32), 3)[1].tolist() == []
    assert one.insert(np.array([-1])) == 0 and len(one) == 0


def test_checks(store):
    cache = KnnCache(store)
    with pytest.raises(InvalidRequest):
        KnnCache(store, max_generations=0)
    with pytest.raises(InvalidRequest):
        cache.lookup(np.zeros(48, np.float32), 0)
    with pytest.raises(InvalidRequest):
        cache.lookup(np.zeros(47, np.float32), 1)
    with pytest.raises(InvalidRequest):
        cache.insert(np.array([store.size]))


def test_lookup_is_fast_for_10k_entries():
    rng = np.random.default_rng(1)
    big = KnnDatastore.from_arrays(rng.normal(0, 1, (12_000, 576)), np.zeros(12_000), np.zeros(12_000), indexes=())
    cache = KnnCache(big)
    cache.insert(np.arange(10_000))
    q = rng.normal(0, 1, 576).astype(np.float32)
    cache.lookup(q, 1024)
    times = []
    for _ in range(20):
        t = time.perf_counter()
        cache.lookup(q, 1024)
        times.append(time.perf_counter() - t)
    assert np.median(times) < 0.02  # ~1.5 ms unloaded; generous for a shared machine
