"""Datastore service: per-request speculation caches behind the DatastoreService contract (RaLM's passage caches
and KNN-LM's entry caches), and REST's drafts.

A cache scores with the retriever's own `score` (dense: float64 inner product with the index's rows; sparse:
Lucene's BM25 from the index statistics), so this replica opens the retrievers' scoring data. Caches are
pinned to the replica that opened them and expire when idle (a gateway that died never closes its caches).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from ralmspec.v1 import common_pb2 as cpb
from ralmspec.v1 import datastore_pb2 as pb

from services.common.contracts import DATASTORE
from services.common.errors import InvalidRequest, Unavailable
from services.common.expiring import ExpiringTable
from services.common.ops import ServiceDef
from services.common.tracing import ContextExecutor
from services.common.wire import retriever_name, vector_from_bytes
from services.datastore.knn_cache import KnnCache, check_successors
from services.datastore.proposers import LocalDrafts
from services.datastore.speculation_cache import SpeculationCache
from services.datastore.wire import tree_to_proto
from services.retriever.knn_index import NOT_BUILT, KnnDatastore
from services.retriever.retriever import Retriever, check_pids, pick
from services.retriever.types import check_knn_k
from services.retriever.wire import checked_key, hits_to_proto, neighbours_to_proto

C = TypeVar("C", SpeculationCache, KnnCache)


@dataclass
class _Entry:
    cache: SpeculationCache | KnnCache
    retriever: Retriever | None  # what a passage cache scores with (None: a KNN-LM cache)


class CacheTable:
    """Caches by id, expired when idle, with a bound on how many one replica holds."""

    def __init__(self, retrievers: Mapping[str, Retriever], max_caches: int = 4096, idle_s: float = 600.0) -> None:
        self.retrievers = retrievers
        self.entries = ExpiringTable[_Entry]("speculation cache", max_caches, idle_s)

    def open(self, kind: int) -> str:
        ret = pick(self.retrievers, retriever_name(kind))
        return self.entries.add(_Entry(SpeculationCache(ret.score), ret))

    def open_knn(self, ds: KnnDatastore | None) -> str:
        if ds is None:
            raise Unavailable(NOT_BUILT)
        return self.entries.add(_Entry(KnnCache(ds), None))

    def get(self, cid: str, kind: type[C]) -> tuple[C, _Entry]:
        """The cache `cid` (which must be a `kind` cache) and its entry."""
        if not cid:
            raise InvalidRequest("cache_id is empty: call OpenCache (or OpenKnnCache) first")
        e = self.entries.get(cid)
        if not isinstance(e.cache, kind):
            opened, used = ("OpenKnnCache", "Insert/Lookup") if kind is SpeculationCache else (
                "OpenCache", "InsertKnn/LookupKnn")
            raise InvalidRequest(f"cache {cid!r} was opened by {opened}: it does not serve {used}")
        return e.cache, e

    def close(self, cid: str) -> bool:
        return self.entries.pop(cid)


SOURCES = {cpb.DRAFT_SOURCE_REST: "rest", cpb.DRAFT_SOURCE_PROMPT: "prompt", cpb.DRAFT_SOURCE_BOTH: "both"}


def datastore_service(retrievers: Mapping[str, Retriever], replica_stream: str, drafts: LocalDrafts,
                      threads: int = 2, knn: KnnDatastore | None = None) -> tuple[ServiceDef, ThreadPoolExecutor]:
    table = CacheTable(retrievers)
    pool = ContextExecutor(max_workers=threads, thread_name_prefix="datastore")

    async def open_cache(req: pb.OpenCacheRequest) -> pb.OpenCacheReply:
        retriever_name(req.retriever)  # INVALID_ARGUMENT for an unknown kind
        return pb.OpenCacheReply(cache_id=table.open(req.retriever), replica_stream=replica_stream)

    async def insert(req: pb.InsertRequest) -> pb.InsertReply:
        cache, e = table.get(req.cache_id, SpeculationCache)
        assert e.retriever is not None
        added = cache.insert(check_pids(e.retriever, [p for p in req.passage_ids if p >= 0]))
        return pb.InsertReply(added=added, size=len(cache))

    async def lookup(req: pb.LookupRequest) -> pb.LookupReply:
        cache, e = table.get(req.cache_id, SpeculationCache)
        assert e.retriever is not None
        key = checked_key(req.key, e.retriever.dim)
        k = req.k or 1
        if k < 0:
            raise InvalidRequest(f"k must be positive, got {k}")
        hits = await asyncio.get_running_loop().run_in_executor(pool, cache.lookup, key, k)
        return pb.LookupReply(hits=hits_to_proto(hits).hits)

    async def close_cache(req: pb.CloseCacheRequest) -> pb.CloseCacheReply:
        return pb.CloseCacheReply(existed=table.close(req.cache_id))

    async def propose(req: pb.ProposeRequest) -> pb.ProposeReply:
        if req.source not in SOURCES:
            raise InvalidRequest(f"draft source must be REST (2), PROMPT (3) or BOTH (4), got {req.source}")
        if not 1 <= req.budget <= 256:
            raise InvalidRequest(f"budget must be in 1..256 tree nodes, got {req.budget}")
        if not req.context or min(req.context) < 0:
            raise InvalidRequest("the context must be a non-empty list of token ids (>= 0)")
        context = list(req.context)
        tree = await asyncio.get_running_loop().run_in_executor(
            pool, drafts.propose, SOURCES[req.source], context, req.budget)
        return pb.ProposeReply(tree=tree_to_proto(tree))

    async def open_knn_cache(req: pb.OpenKnnCacheRequest) -> pb.OpenCacheReply:
        return pb.OpenCacheReply(cache_id=table.open_knn(knn), replica_stream=replica_stream)

    async def insert_knn(req: pb.InsertKnnRequest) -> pb.InsertReply:
        cache, _ = table.get(req.cache_id, KnnCache)
        n = check_successors(req.successors)
        ids = np.array(req.entry_ids, dtype=np.int64)  # -1s are ignored, ids past the datastore: INVALID_ARGUMENT
        added = await asyncio.get_running_loop().run_in_executor(pool, cache.insert_after, ids, n)
        return pb.InsertReply(added=added, size=len(cache))

    async def lookup_knn(req: pb.LookupKnnRequest) -> pb.LookupKnnReply:
        cache, _ = table.get(req.cache_id, KnnCache)
        query = vector_from_bytes(req.query, cache.datastore.dim, "a KNN query (an LM hidden state)")
        check_knn_k(req.k)
        found = await asyncio.get_running_loop().run_in_executor(pool, cache.neighbours, query, req.k)
        return pb.LookupKnnReply(neighbours=neighbours_to_proto(found))

    return DATASTORE.bind(OpenCache=open_cache, Insert=insert, Lookup=lookup, CloseCache=close_cache,
                          Propose=propose, OpenKnnCache=open_knn_cache, InsertKnn=insert_knn,
                          LookupKnn=lookup_knn), pool

