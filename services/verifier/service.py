"""Verifier service: checks a round of speculation with one batched search on the retriever service (passages,
or KNN-LM datastore entries).

Stateless (scale by replicas). Keys pass through untouched (the retriever service validates them), so a
verification scores exactly what speculation scored.
"""

from __future__ import annotations

from ralmspec.v1 import retriever_pb2 as rpb
from ralmspec.v1 import verifier_pb2 as pb

from services.common.contracts import RETRIEVER, VERIFIER
from services.common.errors import InvalidRequest
from services.common.ops import ServiceDef
from services.common.transport import StreamClient
from services.retriever.wire import hits_from_proto
from services.verifier.verification import first_mismatch


def verifier_service(retriever: StreamClient, timeout_s: float) -> ServiceDef:
    search, search_knn = RETRIEVER.ops["Search"], RETRIEVER.ops["SearchKnn"]

    async def verify(req: pb.VerifyRequest) -> pb.VerifyReply:
        if not req.keys:
            raise InvalidRequest("no query keys to verify")
        if req.guesses and len(req.guesses) != len(req.keys):
            raise InvalidRequest(f"{len(req.guesses)} guesses for {len(req.keys)} keys: give one per key, or none")
        reply = await retriever.call(RETRIEVER.stream, search,
                                     rpb.SearchRequest(retriever=req.retriever, keys=req.keys, k=req.k or 1),
                                     timeout_s=timeout_s)
        assert isinstance(reply, rpb.SearchReply)
        bad = first_mismatch(list(req.guesses), hits_from_proto(reply.results)) if req.guesses else None
        return pb.VerifyReply(results=reply.results, first_mismatch=-1 if bad is None else bad,
                              search_s=reply.search_s)

    async def verify_knn(req: pb.VerifyKnnRequest) -> pb.VerifyKnnReply:
        # a pass-through batch: the datastore search validates the queries; the gateway checks the tokens (the
        # agreement rule needs the logits it holds)
        if not req.queries:
            raise InvalidRequest("no queries to verify")
        reply = await retriever.call(RETRIEVER.stream, search_knn,
                                     rpb.SearchKnnRequest(queries=req.queries, k=req.k, index=req.index),
                                     timeout_s=timeout_s)
        assert isinstance(reply, rpb.SearchKnnReply)
        return pb.VerifyKnnReply(results=reply.results, search_s=reply.search_s)

    return VERIFIER.bind(Verify=verify, VerifyKnn=verify_knn)
