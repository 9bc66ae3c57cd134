"""End to end: the gateway's admission control, deadlines and cancellation with real services (tiny profile).

A real redis-server, one replica of each backend service, and a gateway started on its own with
RALMSPEC_CONCURRENCY=1 and RALMSPEC_MAX_QUEUE=1. What the controller did to the LM is read from the LM replica's
Redis streams: every call is an entry whose id is its arrival time (Redis's clock, ms) and whose body names the
session, so "LM steps after the cancel" and "the session was closed" are facts of the wire, not of the gateway.
"""

from __future__ import annotations

import time

import grpc
import pytest
import redis
from ralmspec.v1 import gateway_pb2 as pb
from ralmspec.v1 import gateway_pb2_grpc
from ralmspec.v1 import lm_pb2 as lpb

from services.common.contracts import LM, replica_stream
from services.up import Cluster

pytestmark = pytest.mark.slow

PROMPT = "Tell me about the history of Europe."
KNN_PROMPT = "The history of"  # KNN-LM ends the prompt above at once (EOS); this one runs on
# A long generation in 16-token strides: each LM Step is long next to the time the gateway takes to see a cancel.
LONG = pb.GenerateRequest(prompt=PROMPT, max_new_tokens=400, mode=pb.MODE_BASELINE_KV, retrieval_stride=16)
STOP_S = 60.0  # the longest a request may take to stop: one LM step on a loaded 2-core machine
SOON_S = 5.0  # "promptly", with slack for a loaded machine (the long request takes far longer)


@pytest.fixture(scope="module")
def backends():
    c = Cluster("tiny", {"lm": 1, "retriever": 1, "datastore": 1, "verifier": 1, "gateway": 0}).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def gateway(backends):
    """A gateway of one worker and a queue of one, on the backends' Redis."""
    c = Cluster("tiny", {"gateway": 1}, redis_url=backends.redis_url,
                extra_env={"RALMSPEC_CONCURRENCY": "1", "RALMSPEC_MAX_QUEUE": "1"}).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def stub(gateway):
    with gateway.channel() as ch:
        yield gateway_pb2_grpc.GatewayServiceStub(ch)


class LmWire:
    """The LM calls on the wire: (Redis arrival ms, op, session id) of every entry on the LM replica's streams."""

    def __init__(self, backends: Cluster) -> None:
        self.r = redis.Redis.from_url(backends.redis_url)
        lm = next(c for c in backends.children if c.service == "lm")
        self.streams = [LM.stream, replica_stream(LM, lm.replica)]

    def now_ms(self) -> int:
        sec, usec = self.r.time()
        return int(sec) * 1000 + int(usec) // 1000

    def calls(self, since_ms: int = 0) -> list[tuple[int, str, str]]:
        out = []
        for stream in self.streams:
            for entry_id, f in self.r.xrange(stream, min=since_ms):
                op = f[b"op"].decode()
                message = {"Step": lpb.StepRequest, "State": lpb.StateRequest,
                           "CloseSession": lpb.CloseSessionRequest}.get(op)
                sid = message.FromString(f[b"body"]).session_id if message else ""
                out.append((int(entry_id.split(b"-")[0]), op, sid))
        return sorted(out)

    def settled(self, since_ms: int) -> list[tuple[int, str, str]]:
        """The calls since `since_ms`, once every session stepped since then is closed (or STOP_S passed)."""
        end = time.monotonic() + STOP_S
        while True:
            calls = self.calls(since_ms)
            stepped = {sid for _, op, sid in calls if op in ("Step", "State")}
            closed = {sid for _, op, sid in calls if op == "CloseSession"}
            if stepped <= closed or time.monotonic() > end:
                return calls
            time.sleep(0.2)


@pytest.fixture(scope="module")
def wire(backends):
    return LmWire(backends)


@pytest.fixture(autouse=True)
def quiet(wire):
    """Each test starts once the previous tests' requests have stopped (their sessions closed)."""
    wire.settled(0)


def assert_stopped(calls: list[tuple[int, str, str]], ended_ms: int) -> None:
    """The request's session was closed, after at most one LM step begun once its call ended."""
    sessions = {sid for _, op, sid in calls if op in ("Step", "State")}
    assert len(sessions) == 1, calls
    sid = sessions.pop()
    assert any(op == "CloseSession" and s == sid for _, op, s in calls), f"session {sid} left open: {calls}"
    late = [c for c in calls if c[1] in ("Step", "State") and c[0] > ended_ms]
    assert len(late) <= 1, f"LM steps after the call ended: {late}"


def first_tokens(stream) -> None:
    chunk = next(stream)
    assert chunk.HasField("delta") and chunk.delta.token_ids


def test_a_third_concurrent_request_is_resource_exhausted_with_a_retry_hint(stub, wire):
    running = stub.GenerateStream(LONG, timeout=STOP_S * 4)
    first_tokens(running)  # it holds the one worker
    waiting = stub.GenerateStream(LONG, timeout=STOP_S * 4)
    time.sleep(0.5)  # its call reaches the gateway's queue
    t = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(LONG, timeout=STOP_S)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - t < SOON_S
    assert e.value.details().startswith("gateway busy: 1 running, 1 waiting (RALMSPEC_CONCURRENCY=1, "
                                        "RALMSPEC_MAX_QUEUE=1); retry in ~")
    running.cancel()
    first_tokens(waiting)  # the queued one runs once the cancelled one stopped
    waiting.cancel()


def test_a_client_deadline_shorter_than_the_generation_is_deadline_exceeded_and_closes_the_session(stub, wire):
    since = wire.now_ms()
    t = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(LONG, timeout=2.0)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t < 2.0 + SOON_S
    assert_stopped(wire.settled(since), since + 2000)


def test_a_cancelled_stream_stops_the_controller(stub, wire):
    since = wire.now_ms()
    stream = stub.GenerateStream(LONG, timeout=STOP_S * 4)
    first_tokens(stream)
    first_tokens(stream)
    cancelled = wire.now_ms()
    stream.cancel()
    assert_stopped(wire.settled(since), cancelled)


def test_knnlm_past_its_deadline_s_is_deadline_exceeded(stub, wire):
    for mode in (pb.MODE_BASELINE_KV, pb.MODE_RALMSPEC):
        since = wire.now_ms()
        req = pb.GenerateRequest(prompt=KNN_PROMPT, max_new_tokens=400, mode=mode, knn=pb.Knn(), deadline_s=1.0)
        t = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(req, timeout=STOP_S)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, mode
        assert e.value.details() == "the request ran past its 1 s deadline"
        assert time.monotonic() - t < 1.0 + SOON_S
        assert_stopped(wire.settled(since), since + 1000 + 250)  # 250 ms: the request's way to the gateway


def test_the_gateway_serves_again_after_all_that(stub):
    reply = stub.Generate(pb.GenerateRequest(question="Who wrote Hamlet?", max_new_tokens=8), timeout=STOP_S)
    assert reply.token_ids
