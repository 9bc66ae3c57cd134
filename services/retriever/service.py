"""Retriever service: the three retrievers behind the RetrieverService contract (stateless; scale by replicas),
and KNN-LM's datastore search (SearchKnn) when the replica opened the datastore.

Index calls run on a small thread pool (FAISS and Lucene release the GIL); Lucene is reached through pyjnius,
which attaches each pool thread to the JVM on first use. Unless coalescing is off (RALMSPEC_COALESCE_MS=0),
concurrent `Search` calls with the same (retriever, k), and `SearchKnn` calls with the same (index, k), that
arrive while the pool's threads are busy with their group share one index call when a thread frees
(`coalescing.py`).
Each is validated before it joins, and every search re-scores its candidates exactly, so a query's hits do not
depend on its batch-mates (tests/retriever/test_coalescing.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import faiss
import numpy as np
from ralmspec.v1 import retriever_pb2 as pb

from services.common import metrics
from services.common.contracts import RETRIEVER
from services.common.errors import InvalidRequest, Unavailable
from services.common.ops import ServiceDef
from services.common.tracing import ContextExecutor
from services.common.wire import knn_index_name, retriever_name, vector_from_bytes
from services.retriever.coalescing import MAX_BATCH, Coalescer, CoalesceSettings
from services.retriever.knn_index import NOT_BUILT, KnnDatastore
from services.retriever.retriever import Retriever, check_pids, pick
from services.retriever.types import PASSAGE_K, Hit, Neighbours, QueryKey, check_knn_k, check_search
from services.retriever.wire import checked_key, hits_to_proto, key_to_proto, neighbours_to_proto

T = TypeVar("T")


@dataclass(frozen=True)
class RetrieverServiceSettings:
    threads: int = 2  # index calls at once (FAISS and Lucene release the GIL)
    omp_threads: int = 1  # FAISS's OpenMP threads in each of them (as DenseParams: 1 searched faster on 2 cores)
    coalesce: CoalesceSettings = field(default_factory=CoalesceSettings)  # cross-request batching of searches

    @classmethod
    def from_env(cls) -> RetrieverServiceSettings:
        return cls(coalesce=CoalesceSettings.from_env())


def check_k(k: int) -> int:
    return PASSAGE_K.check("k", k)


def knn_queries(ds: KnnDatastore | None, queries: Sequence[bytes]) -> tuple[KnnDatastore, np.ndarray]:
    """A KNN search's queries, validated, as [q, d] float32 (and the datastore that can answer them)."""
    if ds is None:
        raise Unavailable(NOT_BUILT)
    if not queries:
        raise InvalidRequest("no queries given")
    if len(queries) > MAX_BATCH:
        raise InvalidRequest(f"at most {MAX_BATCH} queries per call, got {len(queries)}")
    return ds, np.stack([vector_from_bytes(q, ds.dim, "a KNN query (an LM hidden state)") for q in queries])


def retriever_service(retrievers: Mapping[str, Retriever], knn: KnnDatastore | None = None,
                      settings: RetrieverServiceSettings = RetrieverServiceSettings(),
                      ) -> tuple[ServiceDef, ThreadPoolExecutor]:
    # OpenMP's thread count is per thread: set it in each pool thread (the main thread's setting is not inherited)
    pool = ContextExecutor(max_workers=settings.threads, thread_name_prefix="retriever",
                           initializer=faiss.omp_set_num_threads, initargs=(settings.omp_threads,))

    async def run(fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn)

    async def run_search(index: str, n: int, fn: Callable[[], T]) -> T:
        """One index call of `n` queries on the pool, timed there (its queueing is not search time)."""
        def timed() -> T:
            t = time.perf_counter()
            out = fn()
            metrics.observe_search(metrics.RETRIEVER_BATCH, metrics.RETRIEVER_SECONDS, index, n,
                                   time.perf_counter() - t)
            return out

        return await run(timed)

    async def search_batch(group: tuple[str, int], keys: list[QueryKey]) -> list[list[Hit]]:
        name, k = group
        ret = retrievers[name]
        return await run_search(name, len(keys), lambda: ret.search_embedded(keys, k))

    async def search_knn_batch(group: tuple[str, int], queries: list[np.ndarray]) -> list[Neighbours]:
        index, k = group
        ds = knn
        assert ds is not None  # knn_queries refused the call otherwise
        return await run_search(f"knn-{index}", len(queries), lambda: ds.neighbours(np.stack(queries), k, index))

    # a call that finds a pool thread free for its group runs alone; those that find all busy share the next one
    searches = Coalescer(search_batch, settings.coalesce, slots=settings.threads)
    knn_searches = Coalescer(search_knn_batch, settings.coalesce, slots=settings.threads)

    async def embed(req: pb.EmbedRequest) -> pb.EmbedReply:
        ret = pick(retrievers, retriever_name(req.retriever))
        queries = list(req.queries)
        check_search(queries, 1)
        if len(queries) > MAX_BATCH:
            raise InvalidRequest(f"at most {MAX_BATCH} queries per call, got {len(queries)}")
        keys = await run(lambda: ret.embed(queries))
        return pb.EmbedReply(keys=[key_to_proto(k) for k in keys])

    async def search(req: pb.SearchRequest) -> pb.SearchReply:
        name = retriever_name(req.retriever)
        ret = pick(retrievers, name)
        if not req.keys:
            raise InvalidRequest("no query keys given")
        if len(req.keys) > MAX_BATCH:
            raise InvalidRequest(f"at most {MAX_BATCH} keys per call, got {len(req.keys)}")
        keys = [checked_key(k, ret.dim) for k in req.keys]
        k = check_k(req.k)
        t = time.perf_counter()
        rows = await searches.submit((name, k), keys)
        return pb.SearchReply(results=[hits_to_proto(r) for r in rows], search_s=time.perf_counter() - t)

    async def score(req: pb.ScoreRequest) -> pb.ScoreReply:
        ret = pick(retrievers, retriever_name(req.retriever))
        key = checked_key(req.key, ret.dim)
        pids = check_pids(ret, req.passage_ids)
        return pb.ScoreReply(scores=await run(lambda: ret.score(key, pids)))

    async def search_knn(req: pb.SearchKnnRequest) -> pb.SearchKnnReply:
        _, q = knn_queries(knn, req.queries)
        index = knn_index_name(req.index)
        check_knn_k(req.k)
        t = time.perf_counter()
        rows = await knn_searches.submit((index, req.k), list(q))
        return pb.SearchKnnReply(results=[neighbours_to_proto(n) for n in rows], search_s=time.perf_counter() - t)

    return RETRIEVER.bind(Embed=embed, Search=search, Score=score, SearchKnn=search_knn), pool
