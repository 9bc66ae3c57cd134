"""Request ids through `ralmspec up --profile tiny`: a client's `x-request-id` comes back in the reply (its field and
initial metadata) and is in the JSON log lines of every service the request crossed; an invalid one is refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from ralmspec.v1 import common_pb2 as cpb
from ralmspec.v1 import gateway_pb2 as pb
from ralmspec.v1 import gateway_pb2_grpc
from up_process import Up, start_up

pytestmark = pytest.mark.slow

ADAPTERS = ("services.common.grpc_server", "services.common.transport")  # where a call served is logged
SERVICES = ("gateway", "lm", "retriever", "datastore", "verifier")
Q = "Where did Super Bowl 50 take place?"  # tiny's questions are SQuAD dev's
REQUESTS = {
    # RaLMSpec +PSA: plain steps on the retriever, the speculation cache on the datastore, every stride on the LM; OS³
    # speculates only once it has evidence, so a short answer may never reach the verifier (`crossed` asks the reply)
    "ralmspec-psa": pb.GenerateRequest(question=Q, mode=pb.MODE_RALMSPEC, max_new_tokens=16,
                                       speculation=pb.Speculation(stride=3, prefetch=True, os3=True,
                                                                  asynchronous=True)),
    # RaLMSpec at a fixed stride of 3 (+PA) over 6 strides of text (a question's answer may end within one): it
    # speculates from the second stride on, so it crosses the verifier too
    "ralmspec-stride3": pb.GenerateRequest(prompt="Super Bowl 50 was an American football game", max_new_tokens=24,
                                           retrieval_stride=4, mode=pb.MODE_RALMSPEC,
                                           speculation=pb.Speculation(stride=3, prefetch=True, os3=False,
                                                                      asynchronous=True)),
    # REST drafting inside the KV baseline's strides: drafts from the datastore, retrieval on the retriever
    "rest-drafting": pb.GenerateRequest(question=Q, mode=pb.MODE_BASELINE_KV, draft=cpb.DRAFT_SOURCE_BOTH,
                                        max_new_tokens=16, retriever=cpb.RETRIEVER_KIND_EXACT),
}


def crossed(req: pb.GenerateRequest, reply: pb.GenerateReply) -> set[str]:
    """The services a request crossed: all but the verifier, and the verifier when it speculated (a round verified)."""
    speculated = req.mode == pb.MODE_RALMSPEC and reply.stats.mean_stride > 0
    return set(SERVICES) - ({"verifier"} if not speculated else set())


@pytest.fixture(scope="module")
def up() -> Iterator[Up]:
    cluster = start_up({"RALMSPEC_LOG_FORMAT": "json", "RALMSPEC_LOG": "INFO"})
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def stub(up: Up) -> Iterator[gateway_pb2_grpc.GatewayServiceStub]:
    with up.channel() as ch:
        yield gateway_pb2_grpc.GatewayServiceStub(ch)


def json_lines(path: Path) -> list[dict[str, object]]:
    """Every log line of a service: one JSON object each, naming its service and replica. (Other lines are what
    the process printed, not logged: its `ready` line, a library's progress bar.)"""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            got = json.loads(line)
            assert {"time", "level", "service", "replica", "logger", "message"} <= set(got), line
            out.append(got)
    assert out, f"{path}: no JSON log line"
    return out


@pytest.mark.parametrize("name", list(REQUESTS))
def test_the_clients_id_comes_back_and_is_in_the_logs_of_every_service_crossed(up: Up, stub, name: str) -> None:
    req = REQUESTS[name]
    rid = f"e2e {name} {id(req):x}"  # printable ASCII, spaces included
    reply, call = stub.Generate.with_call(req, metadata=(("x-request-id", rid),), timeout=300)
    assert reply.token_ids and reply.request_id == rid
    if name == "ralmspec-stride3":
        assert reply.stats.mean_stride > 0, "no round was verified: the verifier was not crossed"
    assert ("x-request-id", rid) in tuple(call.initial_metadata())
    chunks = list(stub.GenerateStream(req, metadata=(("x-request-id", rid + "-s"),), timeout=300))
    assert chunks[-1].done.request_id == rid + "-s" and list(chunks[-1].done.token_ids) == list(reply.token_ids)
    missing = []
    for service in SERVICES:
        lines = json_lines(up.log_of(service))
        about = [x for x in lines if x.get("request_id") == rid]
        if service in crossed(req, reply) and not any(x["level"] == "INFO" for x in about):
            missing.append(service)
        calls = [x for x in about if x["level"] == "INFO" and x["logger"] in ADAPTERS]
        assert len(calls) <= 1, f"{service}: {len(calls)} INFO lines for one request's calls"
        assert all(x["service"] == service for x in lines)
    assert not missing, f"{rid} not in the INFO logs of {missing}"


def test_the_gateways_own_id_comes_back_when_the_client_sends_none(stub) -> None:
    reply, call = stub.Generate.with_call(REQUESTS["rest-drafting"], timeout=300)
    assert len(reply.request_id) == 32 and ("x-request-id", reply.request_id) in tuple(call.initial_metadata())


@pytest.mark.parametrize("rid", ["", "x" * 129])
def test_an_invalid_request_id_is_invalid_argument(stub, rid: str) -> None:
    for call in (lambda: stub.Generate(pb.GenerateRequest(question=Q), metadata=(("x-request-id", rid),), timeout=60),
                 lambda: list(stub.GenerateStream(pb.GenerateRequest(question=Q), metadata=(("x-request-id", rid),),
                                                  timeout=60))):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "x-request-id must be 1-128 printable ASCII characters" in e.value.details()
