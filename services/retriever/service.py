"""Retriever service: the three retrievers behind the RetrieverService contract (stateless; scale by replicas),
and KNN-LM's datastore search (SearchKnn) when the replica opened the datastore.

Index calls run on a small thread pool (FAISS and Lucene release the GIL); Lucene is reached through pyjnius,
which attaches each pool thread to the JVM on first use.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
from ralmspec.v1 import retriever_pb2 as pb

from services.common.contracts import RETRIEVER
from services.common.errors import InvalidRequest, Unavailable
from services.common.ops import ServiceDef
from services.common.wire import knn_index_name, retriever_name, vector_from_bytes
from services.retriever.knn_index import NOT_BUILT, KnnDatastore
from services.retriever.retriever import Retriever, check_pids, pick
from services.retriever.types import PASSAGE_K, check_knn_k, check_search
from services.retriever.wire import checked_key, hits_to_proto, key_to_proto, neighbours_to_proto

T = TypeVar("T")
MAX_BATCH = 1024  # queries per call


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


def retriever_service(retrievers: Mapping[str, Retriever], threads: int = 2,
                      knn: KnnDatastore | None = None) -> tuple[ServiceDef, ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="retriever")

    async def run(fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn)

    async def embed(req: pb.EmbedRequest) -> pb.EmbedReply:
        ret = pick(retrievers, retriever_name(req.retriever))
        queries = list(req.queries)
        check_search(queries, 1)
        if len(queries) > MAX_BATCH:
            raise InvalidRequest(f"at most {MAX_BATCH} queries per call, got {len(queries)}")
        keys = await run(lambda: ret.embed(queries))
        return pb.EmbedReply(keys=[key_to_proto(k) for k in keys])

    async def search(req: pb.SearchRequest) -> pb.SearchReply:
        ret = pick(retrievers, retriever_name(req.retriever))
        if not req.keys:
            raise InvalidRequest("no query keys given")
        if len(req.keys) > MAX_BATCH:
            raise InvalidRequest(f"at most {MAX_BATCH} keys per call, got {len(req.keys)}")
        keys = [checked_key(k, ret.dim) for k in req.keys]
        k = check_k(req.k)
        t = time.perf_counter()
        rows = await run(lambda: ret.search_embedded(keys, k))
        return pb.SearchReply(results=[hits_to_proto(r) for r in rows], search_s=time.perf_counter() - t)

    async def score(req: pb.ScoreRequest) -> pb.ScoreReply:
        ret = pick(retrievers, retriever_name(req.retriever))
        key = checked_key(req.key, ret.dim)
        pids = check_pids(ret, req.passage_ids)
        return pb.ScoreReply(scores=await run(lambda: ret.score(key, pids)))

    async def search_knn(req: pb.SearchKnnRequest) -> pb.SearchKnnReply:
        ds, q = knn_queries(knn, req.queries)
        index = knn_index_name(req.index)
        check_knn_k(req.k)
        t = time.perf_counter()
        rows = await run(lambda: ds.neighbours(q, req.k, index))
        return pb.SearchKnnReply(results=[neighbours_to_proto(n) for n in rows], search_s=time.perf_counter() - t)

    return RETRIEVER.bind(Embed=embed, Search=search, Score=score, SearchKnn=search_knn), pool
