"""Distributed runtime: the controller's backends as calls over Redis streams to the service processes.

The controller is synchronous code (it runs on a worker thread of the gateway); each call here hands a
coroutine to the gateway's event loop, where one `StreamClient` multiplexes every request's calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TypeVar

from google.protobuf.message import Message
from ralmspec.v1 import datastore_pb2 as dpb
from ralmspec.v1 import lm_pb2 as lpb
from ralmspec.v1 import retriever_pb2 as rpb
from ralmspec.v1 import verifier_pb2 as vpb

from services.common.contracts import DATASTORE, LM, RETRIEVER, VERIFIER
from services.common.ops import ServiceDef
from services.common.transport import StreamClient
from services.common.wire import hits_from_proto, key_from_proto, key_to_proto, retriever_kind
from services.gateway.backends import Backends, Cache
from services.lm.decoder import Emitted
from services.retriever.retriever import QueryKey, Retriever
from services.retriever.types import Hit, check_search

M = TypeVar("M", bound=Message)


class Bridge:
    """Blocking calls from controller threads, run on the event loop that owns the stream client."""

    def __init__(self, client: StreamClient, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.client, self.loop, self.timeout_s = client, loop, timeout_s

    def call(self, service: ServiceDef, op: str, request: Message, reply: type[M], stream: str | None = None) -> M:
        coro = self.client.call(stream or service.stream, service.ops[op], request, timeout_s=self.timeout_s)
        out = asyncio.run_coroutine_threadsafe(coro, self.loop).result()
        assert isinstance(out, reply)
        return out


class RemoteLm:
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.streams: dict[str, str] = {}  # session id -> the replica stream holding its KV cache

    def open(self) -> str:
        r = self.bridge.call(LM, "OpenSession", lpb.OpenSessionRequest(), lpb.OpenSessionReply)
        self.streams[r.session_id] = r.replica_stream
        return r.session_id

    def step(self, sid: str, seq: Sequence[int], n: int, stop_at_newline: bool, reprefill: bool = False) -> Emitted:
        req = lpb.StepRequest(session_id=sid, tokens=list(seq), max_new_tokens=n, stop_at_newline=stop_at_newline,
                              reprefill=reprefill)
        r = self.bridge.call(LM, "Step", req, lpb.StepReply, self.streams[sid])
        return Emitted(list(r.tokens), list(r.gaps), forwards=r.forwards, fed=r.fed, stopped=r.stopped)

    def close(self, sid: str) -> bool:
        stream = self.streams.pop(sid)
        return self.bridge.call(LM, "CloseSession", lpb.CloseSessionRequest(session_id=sid), lpb.CloseSessionReply,
                                stream).existed


class RemoteRetriever:
    dim: int | None = None  # keys come from the service and go back to it unchanged
    size = 0  # not known here; the services validate passage ids

    def __init__(self, bridge: Bridge, name: str) -> None:
        self.bridge, self.name, self.kind = bridge, name, retriever_kind(name)

    def embed(self, queries: Sequence[str]) -> list[QueryKey]:
        check_search(queries, 1)
        r = self.bridge.call(RETRIEVER, "Embed", rpb.EmbedRequest(retriever=self.kind, queries=list(queries)),
                             rpb.EmbedReply)
        return [key_from_proto(k) for k in r.keys]

    def search_embedded(self, keys: Sequence[QueryKey], k: int) -> list[list[Hit]]:
        req = rpb.SearchRequest(retriever=self.kind, keys=[key_to_proto(x) for x in keys], k=k)
        return hits_from_proto(self.bridge.call(RETRIEVER, "Search", req, rpb.SearchReply).results)

    def score(self, key: QueryKey, pids: Sequence[int]) -> list[float]:
        req = rpb.ScoreRequest(retriever=self.kind, key=key_to_proto(key), passage_ids=list(pids))
        return list(self.bridge.call(RETRIEVER, "Score", req, rpb.ScoreReply).scores)

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        check_search(queries, k)
        return self.search_embedded(self.embed(queries), k)


class RemoteCache:
    def __init__(self, bridge: Bridge, cache_id: str, stream: str) -> None:
        self.bridge, self.cache_id, self.stream = bridge, cache_id, stream
        self.size = 0

    def insert(self, pids: Sequence[int]) -> int:
        r = self.bridge.call(DATASTORE, "Insert", dpb.InsertRequest(cache_id=self.cache_id, passage_ids=list(pids)),
                             dpb.InsertReply, self.stream)
        self.size = r.size
        return r.added

    def lookup(self, key: QueryKey, k: int = 1) -> list[Hit]:
        if not self.size:  # an empty cache answers nothing: skip the hop
            return []
        r = self.bridge.call(DATASTORE, "Lookup", dpb.LookupRequest(cache_id=self.cache_id, key=key_to_proto(key), k=k),
                             dpb.LookupReply, self.stream)
        return [Hit(h.score, h.passage_id) for h in r.hits]

    def __len__(self) -> int:
        return self.size

    def close(self) -> None:
        self.bridge.call(DATASTORE, "CloseCache", dpb.CloseCacheRequest(cache_id=self.cache_id), dpb.CloseCacheReply,
                         self.stream)


class RemoteCaches:
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def open(self, retriever: str) -> Cache:
        r = self.bridge.call(DATASTORE, "OpenCache", dpb.OpenCacheRequest(retriever=retriever_kind(retriever)),
                             dpb.OpenCacheReply)
        return RemoteCache(self.bridge, r.cache_id, r.replica_stream)


class RemoteVerifier:
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def verify(self, retriever: str, keys: Sequence[QueryKey], guesses: Sequence[int], k: int) -> list[list[Hit]]:
        req = vpb.VerifyRequest(retriever=retriever_kind(retriever), keys=[key_to_proto(x) for x in keys],
                                guesses=list(guesses), k=k)
        return hits_from_proto(self.bridge.call(VERIFIER, "Verify", req, vpb.VerifyReply).results)


def remote_backends(bridge: Bridge, retrievers: Sequence[str]) -> Backends:
    rets: dict[str, Retriever] = {r: RemoteRetriever(bridge, r) for r in retrievers}
    return Backends(RemoteLm(bridge), rets, RemoteCaches(bridge), RemoteVerifier(bridge))
