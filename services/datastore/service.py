"""Datastore service: per-request speculation caches behind the DatastoreService contract.

A cache scores with the retriever's own `score` (dense: float64 inner product with the index's rows; sparse:
Lucene's BM25 from the index statistics), so this replica opens the retrievers' scoring data. Caches are
pinned to the replica that opened them and expire when idle (a gateway that died never closes its caches).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ralmspec.v1 import common_pb2 as cpb
from ralmspec.v1 import datastore_pb2 as pb

from services.common.contracts import DATASTORE
from services.common.errors import InvalidRequest, NotFound, Overloaded
from services.common.ops import ServiceDef
from services.common.wire import checked_key, hits_to_proto, retriever_name, tree_to_proto
from services.datastore.proposers import LocalDrafts
from services.datastore.speculation_cache import SpeculationCache
from services.retriever.retriever import Retriever
from services.retriever.service import check_pids, pick


@dataclass
class _Entry:
    cache: SpeculationCache
    retriever: Retriever
    used: float


class CacheTable:
    """Caches by id, with idle expiry and a bound on how many one replica holds."""

    def __init__(self, retrievers: Mapping[str, Retriever], max_caches: int = 4096, idle_s: float = 600.0) -> None:
        self.retrievers, self.max_caches, self.idle_s = retrievers, max_caches, idle_s
        self.entries: dict[str, _Entry] = {}

    def open(self, kind: int) -> str:
        self.expire()
        if len(self.entries) >= self.max_caches:
            raise Overloaded(f"this datastore replica holds {self.max_caches} caches already; retry later")
        ret = pick(self.retrievers, kind)
        cid = uuid.uuid4().hex
        self.entries[cid] = _Entry(SpeculationCache(ret.score), ret, time.monotonic())
        return cid

    def get(self, cid: str) -> _Entry:
        if not cid:
            raise InvalidRequest("cache_id is empty: call OpenCache first")
        e = self.entries.get(cid)
        if e is None:
            raise NotFound(f"no speculation cache {cid!r} on this replica (closed, expired or opened elsewhere)")
        e.used = time.monotonic()
        return e

    def close(self, cid: str) -> bool:
        return self.entries.pop(cid, None) is not None

    def expire(self) -> None:
        old = time.monotonic() - self.idle_s
        for cid in [c for c, e in self.entries.items() if e.used < old]:
            del self.entries[cid]


SOURCES = {cpb.DRAFT_SOURCE_REST: "rest", cpb.DRAFT_SOURCE_PROMPT: "prompt", cpb.DRAFT_SOURCE_BOTH: "both"}


def datastore_service(retrievers: Mapping[str, Retriever], replica_stream: str, drafts: LocalDrafts,
                      threads: int = 2) -> tuple[ServiceDef, ThreadPoolExecutor]:
    table = CacheTable(retrievers)
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="datastore")

    async def open_cache(req: pb.OpenCacheRequest) -> pb.OpenCacheReply:
        retriever_name(req.retriever)  # INVALID_ARGUMENT for an unknown kind
        return pb.OpenCacheReply(cache_id=table.open(req.retriever), replica_stream=replica_stream)

    async def insert(req: pb.InsertRequest) -> pb.InsertReply:
        e = table.get(req.cache_id)
        added = e.cache.insert(check_pids(e.retriever, [p for p in req.passage_ids if p >= 0]))
        return pb.InsertReply(added=added, size=len(e.cache))

    async def lookup(req: pb.LookupRequest) -> pb.LookupReply:
        e = table.get(req.cache_id)
        key = checked_key(req.key, e.retriever.dim)
        k = req.k or 1
        if k < 0:
            raise InvalidRequest(f"k must be positive, got {k}")
        hits = await asyncio.get_running_loop().run_in_executor(pool, e.cache.lookup, key, k)
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

    return DATASTORE.bind(OpenCache=open_cache, Insert=insert, Lookup=lookup, CloseCache=close_cache,
                          Propose=propose), pool

