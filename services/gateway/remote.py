"""Distributed runtime: the controller's backends as calls over Redis streams to the service processes.

The controller is synchronous code (it runs on a worker thread of the gateway); each call here hands a
coroutine to the gateway's event loop, where one `StreamClient` multiplexes every request's calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch
from google.protobuf.message import Message
from ralmspec.v1 import common_pb2 as cpb
from ralmspec.v1 import datastore_pb2 as dpb
from ralmspec.v1 import lm_pb2 as lpb
from ralmspec.v1 import retriever_pb2 as rpb
from ralmspec.v1 import verifier_pb2 as vpb

from services.common.contracts import DATASTORE, LM, RETRIEVER, VERIFIER
from services.common.errors import DeadlineExceeded, NotFound
from services.common.ops import Call, ServiceDef
from services.common.transport import StreamClient
from services.common.wire import knn_index, retriever_kind, vector_bytes, vector_from_bytes
from services.datastore.draft_tree import DraftTree
from services.datastore.wire import tree_from_proto, tree_to_proto
from services.gateway.backends import Backends, Cache
from services.gateway.knn_generation import KnnBackends
from services.lm.decoder import Emitted
from services.lm.types import SamplingParams
from services.lm.wire import sampling_to_proto
from services.retriever.retriever import Retriever
from services.retriever.types import Hit, Neighbours, QueryKey, check_search
from services.retriever.wire import hits_from_proto, key_from_proto, key_to_proto, neighbours_from_proto

M = TypeVar("M", bound=Message)
log = logging.getLogger(__name__)


class Bridge:
    """Blocking calls from controller threads, run on the event loop that owns the stream client."""

    def __init__(self, client: StreamClient, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.client, self.loop, self.timeout_s = client, loop, timeout_s

    def call(self, service: ServiceDef, op: str, request: Message, reply: type[M], stream: str | None = None,
             cleanup: bool = False) -> M:
        """`op`'s reply, waited for no longer than the request being served waits (`Call.timeout`: a client that
        gave up frees the gateway's thread); `cleanup` calls (closing a session, a cache) go out even after it."""
        try:
            timeout = self.timeout_s if cleanup else Call.timeout(self.timeout_s)
        except DeadlineExceeded as e:  # the request ended before the call: nothing sent
            raise RequestDeadline(str(e)) from None
        coro = self.client.call(stream or service.stream, service.ops[op], request, timeout_s=timeout)
        try:
            out = asyncio.run_coroutine_threadsafe(coro, self.loop).result()
        except DeadlineExceeded:
            served = Call.current()
            if served is None or timeout >= self.timeout_s:
                raise
            # the request's own deadline cut the call short: say so, as the engines do between steps
            raise RequestDeadline(f"the request ran past {served.what}") from None
        assert isinstance(out, reply)
        return out

    def count_replay(self, service: ServiceDef) -> None:
        """Count a call replayed because a pinned replica of `service` was lost (the cluster's "replayed" hash)."""
        asyncio.run_coroutine_threadsafe(self.client.count("replayed", service.stream), self.loop).result()


LOST = (NotFound, DeadlineExceeded)  # a pinned replica restarted (state gone) or died (its stream unread)


class RequestDeadline(DeadlineExceeded):
    """A call cut short (or never sent) because the request it served reached its deadline: the request is over
    and no replica was lost, so the LOST handlers re-raise it rather than replay the call or rebuild a cache."""


class RemoteLm:
    """Sessions pinned to LM replicas. A step carries the whole sequence, so when a session's replica is lost
    the step is replayed on a new session (any replica), which re-prefills: no request is lost with it."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.where: dict[str, tuple[str, str]] = {}  # our session id -> (replica's session id, replica stream)

    def _open(self) -> tuple[str, str]:
        r = self.bridge.call(LM, "OpenSession", lpb.OpenSessionRequest(), lpb.OpenSessionReply)
        return r.session_id, r.replica_stream

    def open(self) -> str:
        sid, stream = self._open()
        self.where[sid] = (sid, stream)
        return sid

    def step(self, sid: str, seq: Sequence[int], n: int, stop_at_newline: bool, reprefill: bool = False,
             tree: DraftTree | None = None, sampling: SamplingParams | None = None, prefix: int = 0) -> Emitted:
        draft = tree_to_proto(tree) if tree is not None else None
        r = self._pinned(sid, "Step", lambda real: lpb.StepRequest(
            session_id=real, tokens=list(seq), max_new_tokens=n, stop_at_newline=stop_at_newline,
            reprefill=reprefill, draft=draft, prefix_tokens=prefix, **sampling_to_proto(sampling)), lpb.StepReply)
        return Emitted(list(r.tokens), list(r.gaps), forwards=r.forwards, fed=r.fed, stopped=r.stopped)

    def state(self, sid: str, seq: Sequence[int]) -> tuple[np.ndarray, torch.Tensor]:
        r = self._pinned(sid, "State", lambda real: lpb.StateRequest(session_id=real, tokens=list(seq)),
                         lpb.StateReply)
        logits = torch.from_numpy(vector_from_bytes(r.logits, None, "logits"))
        return vector_from_bytes(r.hidden, None, "hidden"), logits

    def _pinned(self, sid: str, op: str, make: Callable[[str], Message], reply: type[M]) -> M:
        """`op` on the session's replica; once more on a new session (any replica) if that replica is lost."""
        for attempt in (0, 1):
            real, stream = self.where[sid]
            try:
                return self.bridge.call(LM, op, make(real), reply, stream)
            except RequestDeadline:
                raise
            except LOST as e:
                if attempt:
                    raise
                log.warning("LM session %s on %s lost (%s); replaying the %s on a new session", real, stream, e, op)
                self.bridge.count_replay(LM)
                self.where[sid] = self._open()
        raise AssertionError("unreachable")

    def close(self, sid: str) -> bool:
        real, stream = self.where.pop(sid)
        try:
            return self.bridge.call(LM, "CloseSession", lpb.CloseSessionRequest(session_id=real),
                                    lpb.CloseSessionReply, stream, cleanup=True).existed
        except LOST:
            return False  # its replica is gone, and the session with it


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


class _PinnedCache:
    """A per-request cache pinned to a datastore replica. What was inserted is kept here too, so a lost replica's
    cache is rebuilt on another one with the same content (the same guesses follow).

    Opened by its first operation, not by the request: a request whose plain steps never touch it (OS³ found no
    γ worth watching) pays no round trip to open or close it, and otherwise the open happens where the first
    insert does, on the bookkeeping thread rather than before the first step (the demo's 0.75 s answers: 2-3%)."""

    def __init__(self, bridge: Bridge, open_op: str, open_request: Message) -> None:
        self.bridge, self._open_op, self._open_request = bridge, open_op, open_request
        self.cache_id: str | None = None  # until the first operation
        self.stream: str | None = None

    def _open(self) -> tuple[str, str]:
        r = self.bridge.call(DATASTORE, self._open_op, self._open_request, dpb.OpenCacheReply)
        return r.cache_id, r.replica_stream

    def _restore(self) -> None:
        """Insert what this cache held into a newly opened (empty) one."""

    def _call(self, op: str, make: Callable[[str], Message], reply: type[M]) -> M:
        if self.cache_id is None:
            self.cache_id, self.stream = self._open()
        try:
            return self.bridge.call(DATASTORE, op, make(self.cache_id), reply, self.stream)
        except RequestDeadline:
            raise
        except LOST as e:
            log.warning("speculation cache %s on %s lost (%s); rebuilding it", self.cache_id, self.stream, e)
            self.bridge.count_replay(DATASTORE)
            self.cache_id, self.stream = self._open()
            self._restore()
            return self.bridge.call(DATASTORE, op, make(self.cache_id), reply, self.stream)

    def close(self) -> None:
        if self.cache_id is None:
            return  # never opened
        try:
            self.bridge.call(DATASTORE, "CloseCache", dpb.CloseCacheRequest(cache_id=self.cache_id),
                             dpb.CloseCacheReply, self.stream, cleanup=True)
        except LOST:
            pass  # gone with its replica


class RemoteCache(_PinnedCache):
    """RaLM's passage cache on the datastore service."""

    def __init__(self, bridge: Bridge, retriever: str) -> None:
        self.pids: list[int] = []
        self.seen: set[int] = set()
        super().__init__(bridge, "OpenCache", dpb.OpenCacheRequest(retriever=retriever_kind(retriever)))

    def _restore(self) -> None:
        if self.pids:
            self.bridge.call(DATASTORE, "Insert", dpb.InsertRequest(cache_id=self.cache_id, passage_ids=self.pids),
                             dpb.InsertReply, self.stream)

    def insert(self, pids: Sequence[int]) -> int:
        new = [p for p in dict.fromkeys(pids) if p >= 0 and p not in self.seen]
        if not new:
            return 0
        r = self._call("Insert", lambda cid: dpb.InsertRequest(cache_id=cid, passage_ids=new), dpb.InsertReply)
        self.pids += new
        self.seen.update(new)
        return r.added

    def lookup(self, key: QueryKey, k: int = 1) -> list[Hit]:
        if not self.pids:  # an empty cache answers nothing: skip the hop
            return []
        pk = key_to_proto(key)
        r = self._call("Lookup", lambda cid: dpb.LookupRequest(cache_id=cid, key=pk, k=k), dpb.LookupReply)
        return [Hit(h.score, h.passage_id) for h in r.hits]

    def __len__(self) -> int:
        return len(self.pids)


class RemoteCaches:
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def open(self, retriever: str) -> Cache:
        return RemoteCache(self.bridge, retriever)


class RemoteVerifier:
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def verify(self, retriever: str, keys: Sequence[QueryKey], guesses: Sequence[int], k: int) -> list[list[Hit]]:
        req = vpb.VerifyRequest(retriever=retriever_kind(retriever), keys=[key_to_proto(x) for x in keys],
                                guesses=list(guesses), k=k)
        return hits_from_proto(self.bridge.call(VERIFIER, "Verify", req, vpb.VerifyReply).results)


class RemoteDrafts:
    SOURCES = {"rest": cpb.DRAFT_SOURCE_REST, "prompt": cpb.DRAFT_SOURCE_PROMPT, "both": cpb.DRAFT_SOURCE_BOTH}

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def propose(self, kind: str, context: Sequence[int], budget: int) -> DraftTree:
        req = dpb.ProposeRequest(context=list(context), source=self.SOURCES[kind], budget=budget)
        return tree_from_proto(self.bridge.call(DATASTORE, "Propose", req, dpb.ProposeReply).tree)


class RemoteKnnSearch:
    """KNN datastore searches on the retriever service (the baseline), or through the verifier (speculation)."""

    def __init__(self, bridge: Bridge, via_verifier: bool) -> None:
        self.bridge, self.via_verifier = bridge, via_verifier

    def neighbours(self, queries: np.ndarray, k: int, index: str = "exact") -> list[Neighbours]:
        q = [vector_bytes(row) for row in queries]
        if self.via_verifier:
            r: Message = self.bridge.call(VERIFIER, "VerifyKnn", vpb.VerifyKnnRequest(
                queries=q, k=k, index=knn_index(index)), vpb.VerifyKnnReply)
        else:
            r = self.bridge.call(RETRIEVER, "SearchKnn", rpb.SearchKnnRequest(queries=q, k=k, index=knn_index(index)),
                                 rpb.SearchKnnReply)
        return [neighbours_from_proto(n) for n in r.results]  # type: ignore[attr-defined]


class RemoteKnnCache(_PinnedCache):
    """KNN-LM's entry cache on the datastore service."""

    def __init__(self, bridge: Bridge) -> None:
        self.last: tuple[list[int], int] | None = None  # the live generation (max_generations = 1): ids, n
        self.size = 0
        super().__init__(bridge, "OpenKnnCache", dpb.OpenKnnCacheRequest())

    def _restore(self) -> None:
        if self.last:
            ids, n = self.last
            self.bridge.call(DATASTORE, "InsertKnn", dpb.InsertKnnRequest(cache_id=self.cache_id, entry_ids=ids,
                                                                          successors=n), dpb.InsertReply, self.stream)

    def insert_after(self, ids: np.ndarray, n: int) -> int:
        flat = [int(i) for i in np.asarray(ids).ravel() if i >= 0]
        r = self._call("InsertKnn", lambda cid: dpb.InsertKnnRequest(cache_id=cid, entry_ids=flat, successors=n),
                       dpb.InsertReply)
        self.last, self.size = (flat, n), r.size
        return r.added

    def neighbours(self, query: np.ndarray, k: int) -> Neighbours:
        q = vector_bytes(query)
        r = self._call("LookupKnn", lambda cid: dpb.LookupKnnRequest(cache_id=cid, query=q, k=k), dpb.LookupKnnReply)
        return neighbours_from_proto(r.neighbours)

    def __len__(self) -> int:
        return self.size


def remote_knn_backends(bridge: Bridge, lm: RemoteLm) -> KnnBackends:
    return KnnBackends(lm, RemoteKnnSearch(bridge, via_verifier=False), RemoteKnnSearch(bridge, via_verifier=True),
                       lambda: RemoteKnnCache(bridge))


def remote_backends(bridge: Bridge, retrievers: Sequence[str]) -> Backends:
    rets: dict[str, Retriever] = {r: RemoteRetriever(bridge, r) for r in retrievers}
    return Backends(RemoteLm(bridge), rets, RemoteCaches(bridge), RemoteVerifier(bridge), RemoteDrafts(bridge))
