"""Verifier service: checks rounds of speculation with batched searches on the retriever service (passages, or
KNN-LM datastore entries).

Stateless (scale by replicas). Rounds of different requests that arrive within the merge window
(RALMSPEC_VERIFY_WINDOW_MS; 0 = off, the default: it lost on 2 CPU cores) and ask the same retriever and k merge
into one retriever call (`services/retriever/coalescing.py`); each Verify gets its own rows back and its own
first mismatch. Keys pass through untouched, so a verification scores exactly what speculation scored; they are
checked here only as far as needed to keep one request's bad key from failing its batch-mates (the group key
holds the key's kind and size, and the retriever checks the rest, which every member of a group then passes or
fails alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf.message import Message
from ralmspec.v1 import common_pb2 as cpb
from ralmspec.v1 import retriever_pb2 as rpb
from ralmspec.v1 import verifier_pb2 as pb

from services.common import env, metrics
from services.common.contracts import RETRIEVER, VERIFIER
from services.common.errors import InvalidRequest
from services.common.ops import Operation, ServiceDef
from services.common.wire import knn_index, knn_index_name, retriever_kind, retriever_name, vector_from_bytes
from services.retriever.coalescing import MAX_BATCH, Coalescer, CoalesceSettings
from services.retriever.wire import hits_from_proto
from services.verifier.verification import first_mismatch

TEXT = -1  # the size of a text (BM25) key in a group key; a vector key's size is its byte length


@dataclass(frozen=True)
class VerifierSettings:
    timeout_s: float = 120.0  # a retriever call's deadline
    coalesce: CoalesceSettings = field(default_factory=CoalesceSettings)  # rounds of requests merged per call

    @classmethod
    def from_env(cls, timeout_s: float) -> VerifierSettings:
        return cls(timeout_s=timeout_s, coalesce=CoalesceSettings.from_env(env.VERIFY_WINDOW_MS))


class Caller(Protocol):
    """How the verifier reaches the retriever service: a `StreamClient` (or, in tests, the handlers in process)."""

    async def call(self, stream: str, op: Operation, request: Message, *,
                   timeout_s: float | None = None) -> Message: ...


def key_size(keys: Sequence[cpb.QueryKey]) -> int:
    """The size all of one request's keys share (TEXT, or a vector's bytes), checked as far as the retriever's
    rules do not depend on which retriever: keys of different sizes never share a batch."""
    sizes = set()
    for i, key in enumerate(keys):
        if key.WhichOneof("key") == "text":
            if not key.text.strip():
                raise InvalidRequest(f"query key {i} is an empty text")
            sizes.add(TEXT)
        else:
            sizes.add(len(vector_from_bytes(key.vector, None, f"query key {i}")) * 4)
    if len(sizes) > 1:
        raise InvalidRequest("the query keys of one request must all be texts or all vectors of one size")
    return sizes.pop()


def query_size(queries: Sequence[bytes]) -> int:
    sizes = {len(vector_from_bytes(q, None, f"KNN query {i}")) * 4 for i, q in enumerate(queries)}
    if len(sizes) > 1:
        raise InvalidRequest("the KNN queries of one request must all be vectors of one size")
    return sizes.pop()


def verifier_service(retriever: Caller, settings: VerifierSettings = VerifierSettings()) -> ServiceDef:
    search, search_knn = RETRIEVER.ops["Search"], RETRIEVER.ops["SearchKnn"]

    # A batch's rows carry the shared call's search_s. Group keys: (retriever or index name, k, key size).
    async def search_batch(group: tuple[str, int, int], keys: list[cpb.QueryKey]) -> list[tuple[cpb.HitList, float]]:
        name, k, _ = group
        reply = await retriever.call(RETRIEVER.stream, search,
                                     rpb.SearchRequest(retriever=retriever_kind(name), keys=keys, k=k),
                                     timeout_s=settings.timeout_s)
        assert isinstance(reply, rpb.SearchReply)
        metrics.observe_search(metrics.VERIFIER_BATCH, metrics.VERIFIER_SECONDS, name, len(keys), reply.search_s)
        return [(r, reply.search_s) for r in reply.results]

    async def search_knn_batch(group: tuple[str, int, int], queries: list[bytes]
                               ) -> list[tuple[cpb.Neighbours, float]]:
        name, k, _ = group
        reply = await retriever.call(RETRIEVER.stream, search_knn,
                                     rpb.SearchKnnRequest(queries=queries, k=k, index=knn_index(name)),
                                     timeout_s=settings.timeout_s)
        assert isinstance(reply, rpb.SearchKnnReply)
        metrics.observe_search(metrics.VERIFIER_BATCH, metrics.VERIFIER_SECONDS, f"knn-{name}", len(queries),
                               reply.search_s)
        return [(r, reply.search_s) for r in reply.results]

    # A window, not slots: the verifier cannot see the retriever tier's threads, and a round must never wait
    # behind a stuck call to a dead replica (the retriever coalesces again, by its own busy threads).
    searches = Coalescer(search_batch, settings.coalesce)
    knn_searches = Coalescer(search_knn_batch, settings.coalesce)

    async def verify(req: pb.VerifyRequest) -> pb.VerifyReply:
        if not req.keys:
            raise InvalidRequest("no query keys to verify")
        if len(req.keys) > MAX_BATCH:
            raise InvalidRequest(f"at most {MAX_BATCH} keys per call, got {len(req.keys)}")
        if req.guesses and len(req.guesses) != len(req.keys):
            raise InvalidRequest(f"{len(req.guesses)} guesses for {len(req.keys)} keys: give one per key, or none")
        group = (retriever_name(req.retriever), req.k or 1, key_size(req.keys))
        rows = await searches.submit(group, list(req.keys))
        results = [r for r, _ in rows]
        bad = first_mismatch(list(req.guesses), hits_from_proto(results)) if req.guesses else None
        return pb.VerifyReply(results=results, first_mismatch=-1 if bad is None else bad, search_s=rows[0][1])

    async def verify_knn(req: pb.VerifyKnnRequest) -> pb.VerifyKnnReply:
        # a batch of searches only: the gateway checks the tokens (the agreement rule needs the logits it holds)
        if not req.queries:
            raise InvalidRequest("no queries to verify")
        if len(req.queries) > MAX_BATCH:
            raise InvalidRequest(f"at most {MAX_BATCH} queries per call, got {len(req.queries)}")
        group = (knn_index_name(req.index), req.k, query_size(req.queries))
        rows = await knn_searches.submit(group, list(req.queries))
        return pb.VerifyKnnReply(results=[r for r, _ in rows], search_s=rows[0][1])

    return VERIFIER.bind(Verify=verify, VerifyKnn=verify_knn)
