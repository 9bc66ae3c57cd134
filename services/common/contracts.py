"""Every service's contract: proto service name, Redis request stream, operations with their message types.

Servers `bind` handlers to these; clients (stream or gRPC) call through them. Stateful services (LM sessions,
speculation caches) pin a session to one replica: its replica stream is `<stream>:<replica>`.
"""

from __future__ import annotations

from ralmspec.v1 import datastore_pb2 as ds
from ralmspec.v1 import gateway_pb2 as gw
from ralmspec.v1 import lm_pb2 as lm
from ralmspec.v1 import retriever_pb2 as rt
from ralmspec.v1 import verifier_pb2 as vf

from services.common.ops import Operation, ServiceDef

LM = ServiceDef.of(
    "ralmspec.v1.LmService", "ralmspec:lm",
    Operation("OpenSession", lm.OpenSessionRequest, lm.OpenSessionReply),
    Operation("Step", lm.StepRequest, lm.StepReply),
    Operation("State", lm.StateRequest, lm.StateReply),
    Operation("CloseSession", lm.CloseSessionRequest, lm.CloseSessionReply),
    Operation("Stats", lm.StatsRequest, lm.StatsReply),
)
RETRIEVER = ServiceDef.of(
    "ralmspec.v1.RetrieverService", "ralmspec:retriever",
    Operation("Embed", rt.EmbedRequest, rt.EmbedReply),
    Operation("Search", rt.SearchRequest, rt.SearchReply),
    Operation("Score", rt.ScoreRequest, rt.ScoreReply),
    Operation("SearchKnn", rt.SearchKnnRequest, rt.SearchKnnReply),
)
VERIFIER = ServiceDef.of(
    "ralmspec.v1.VerifierService", "ralmspec:verifier",
    Operation("Verify", vf.VerifyRequest, vf.VerifyReply),
    Operation("VerifyKnn", vf.VerifyKnnRequest, vf.VerifyKnnReply),
)
DATASTORE = ServiceDef.of(
    "ralmspec.v1.DatastoreService", "ralmspec:datastore",
    Operation("OpenCache", ds.OpenCacheRequest, ds.OpenCacheReply),
    Operation("Insert", ds.InsertRequest, ds.InsertReply),
    Operation("Lookup", ds.LookupRequest, ds.LookupReply),
    Operation("CloseCache", ds.CloseCacheRequest, ds.CloseCacheReply),
    Operation("Propose", ds.ProposeRequest, ds.ProposeReply),
    Operation("OpenKnnCache", ds.OpenKnnCacheRequest, ds.OpenCacheReply),
    Operation("InsertKnn", ds.InsertKnnRequest, ds.InsertReply),
    Operation("LookupKnn", ds.LookupKnnRequest, ds.LookupKnnReply),
)
GATEWAY = ServiceDef.of(
    "ralmspec.v1.GatewayService", "ralmspec:gateway",
    Operation("Generate", gw.GenerateRequest, gw.GenerateReply),
    Operation("GenerateStream", gw.GenerateRequest, gw.GenerateChunk, streaming=True),
)
SERVICES = {"lm": LM, "retriever": RETRIEVER, "verifier": VERIFIER, "datastore": DATASTORE, "gateway": GATEWAY}


def replica_stream(service: ServiceDef, replica: str) -> str:
    return f"{service.stream}:{replica}"
