"""The gateway service over its real gRPC adapter, in process (the tiny model, an LM that pauses before each step so
generations outlast the test's deadlines): one worker and a queue of one refuse the third request with a retry hint;
the client's deadline and `deadline_s` (queueing included) end a request promptly with its LM session closed; a
cancelled stream stops its controller at the next LM step; KNN-LM honours `deadline_s`."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import grpc
import pytest
from ralmspec.v1 import common_pb2 as cpb
from ralmspec.v1 import gateway_pb2 as pb
from ralmspec.v1 import gateway_pb2_grpc

from services.common.grpc_server import GrpcServer, start_server
from services.common.ops import Call
from services.gateway.admission import RequestPool
from services.gateway.controller import Controller, Request
from services.gateway.knn_generation import KnnLmEngine
from services.gateway.ralm import Emit, RalmEngine, RalmResult
from services.gateway.ralmspec import PRESETS
from services.gateway.service import gateway_service

pytestmark = pytest.mark.slow

PAUSE_S = 0.05  # before each LM step: a 400-token request takes far longer than any deadline below
IDLE_S = 120.0  # the longest wait for a request to stop: one LM step, which a loaded 2-core machine makes slow
SOON_S = 5.0  # "promptly", with slack for a loaded machine (a 400-token request takes much longer)
PROMPT = "Tell me about the history of Europe."
KNN_PROMPT = "The history of"  # KNN-LM ends the prompt above at once (EOS); this one runs on
LONG = {
    "kv": pb.GenerateRequest(prompt=PROMPT, max_new_tokens=400, mode=pb.MODE_BASELINE_KV),
    "ralmspec": pb.GenerateRequest(prompt=PROMPT, max_new_tokens=400),  # the default +PSA: async verification
    "drafting": pb.GenerateRequest(prompt=PROMPT, max_new_tokens=400, mode=pb.MODE_BASELINE_KV,
                                   draft=cpb.DRAFT_SOURCE_REST, retrieval_stride=16),  # several LM steps a stride
    "knn-lm": pb.GenerateRequest(prompt=KNN_PROMPT, max_new_tokens=400, mode=pb.MODE_BASELINE_KV, knn=pb.Knn()),
    "knn-lm ralmspec": pb.GenerateRequest(prompt=KNN_PROMPT, max_new_tokens=400, knn=pb.Knn()),
}


class SlowLm:
    """The real LM, pausing before each step and recording every call: (name, whether the running request's call
    had already ended, i.e. was cancelled or past its deadline, when the LM call began)."""

    def __init__(self, lm: Any) -> None:
        self.lm, self.calls = lm, []
        self.call: Call | None = None  # the running request's (the gateway runs one at a time here)

    def _record(self, name: str) -> None:
        call = self.call
        ended = call is not None and (call.cancelled.is_set() or (call.remaining() or 1.0) < 0)
        self.calls.append((name, ended))

    def open(self) -> str:
        self._record("open")
        return str(self.lm.open())

    def step(self, *args: Any, **kw: Any) -> Any:
        self._record("step")
        time.sleep(PAUSE_S)
        return self.lm.step(*args, **kw)

    def state(self, *args: Any, **kw: Any) -> Any:
        self._record("state")
        time.sleep(PAUSE_S)
        return self.lm.state(*args, **kw)

    def close(self, sid: str) -> bool:
        self._record("close")
        return bool(self.lm.close(sid))

    def count(self, name: str) -> int:
        return sum(n == name for n, _ in list(self.calls))

    def steps_after_the_call_ended(self) -> int:
        """LM steps begun once the request's call had ended: 0, or 1 when the end came between the controller's
        check and the step."""
        return sum(n in ("step", "state") and ended for n, ended in list(self.calls))


class SpyController(Controller):
    """Tells the LM which call the running request serves."""

    def __init__(self, lm: SlowLm, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.lm = lm

    def run(self, req: Request, emit: Emit | None = None, call: Call | None = None) -> RalmResult:
        self.lm.call = call
        return super().run(req, emit, call)


@dataclass
class Gateway:
    stub: gateway_pb2_grpc.GatewayServiceStub
    lm: SlowLm
    pool: RequestPool

    def idle(self) -> None:
        """Until no request holds a thread or waits for one."""
        self.until(0, 0)

    def until(self, running: int, waiting: int, timeout_s: float = IDLE_S) -> None:
        end = time.monotonic() + timeout_s
        while (self.pool.running, self.pool.waiting) != (running, waiting):
            assert time.monotonic() < end, f"{self.pool.running} running, {self.pool.waiting} waiting"
            time.sleep(0.01)


@pytest.fixture
def gateway(engine, knn) -> Iterator[Gateway]:
    """A gateway with one worker and a queue of one, on its own event loop thread."""
    lm = SlowLm(engine.backends.lm)
    ralm = RalmEngine(engine.tok, engine.max_positions, engine.docs, replace(engine.backends, lm=lm), engine.stop_sets)
    knnlm = KnnLmEngine(engine.tok, replace(knn.backends, lm=lm), stops=engine.stop_sets, verify_workers=2)
    pool = RequestPool(workers=1, max_queue=1)
    service = gateway_service(SpyController(lm, ralm, verify_workers=2, knn=knnlm), PRESETS["+PSA"], pool)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server: GrpcServer = asyncio.run_coroutine_threadsafe(start_server([service], 0), loop).result()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield Gateway(gateway_pb2_grpc.GatewayServiceStub(channel), lm, pool)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result()
        pool.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def all_closed(lm: SlowLm) -> bool:
    return lm.count("open") == lm.count("close")


def test_one_worker_and_a_queue_of_one_refuse_the_third_request_with_a_retry_hint(gateway):
    running = gateway.stub.GenerateStream(LONG["kv"], timeout=IDLE_S)
    next(running)  # its first tokens: it holds the worker
    waiting = gateway.stub.GenerateStream(LONG["kv"], timeout=IDLE_S)
    gateway.until(1, 1)
    t = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        gateway.stub.Generate(LONG["kv"], timeout=IDLE_S)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - t < SOON_S
    assert e.value.details().startswith("gateway busy: 1 running, 1 waiting (RALMSPEC_CONCURRENCY=1, "
                                        "RALMSPEC_MAX_QUEUE=1); retry in ~")
    running.cancel()
    next(waiting)  # the queued request runs once the cancelled one stopped
    waiting.cancel()
    gateway.idle()
    assert gateway.lm.count("open") == 2 and all_closed(gateway.lm)


def test_a_client_deadline_shorter_than_the_generation_ends_it_promptly_and_closes_the_session(gateway):
    t = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        gateway.stub.Generate(LONG["ralmspec"], timeout=1.0)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t < SOON_S
    gateway.idle()
    assert gateway.lm.count("open") == 1 and all_closed(gateway.lm)
    assert gateway.lm.steps_after_the_call_ended() <= 1  # at most the step in flight when the deadline passed


@pytest.mark.parametrize("mode", list(LONG))
def test_a_cancelled_stream_stops_its_controller_at_the_next_lm_step(gateway, mode):
    stream = gateway.stub.GenerateStream(LONG[mode], timeout=IDLE_S)
    next(stream)
    next(stream)  # well into the generation
    stream.cancel()
    gateway.idle()
    assert gateway.lm.steps_after_the_call_ended() <= 1, "the controller went on using the LM after a cancel"
    assert gateway.lm.calls[-1] == ("close", True) and all_closed(gateway.lm)


def test_deadline_s_counts_the_time_in_the_gateway_queue(gateway):
    running = gateway.stub.GenerateStream(LONG["kv"], timeout=IDLE_S)
    next(running)
    t = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        gateway.stub.Generate(pb.GenerateRequest(question="Who wrote Hamlet?", deadline_s=0.3), timeout=IDLE_S)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t < SOON_S
    assert e.value.details().startswith("the request ran past its 0.3 s deadline after 0.")
    assert "s in the gateway's queue, before it ran (1 running, 0 waiting)" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # the client's own deadline passes in the queue too
        gateway.stub.Generate(pb.GenerateRequest(question="Who wrote Hamlet?"), timeout=0.3)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    running.cancel()
    gateway.idle()
    assert gateway.lm.count("open") == 1 and all_closed(gateway.lm)  # neither queued request ran


@pytest.mark.parametrize("mode", ["knn-lm", "knn-lm ralmspec"])
def test_knnlm_honours_deadline_s(gateway, mode):
    req = pb.GenerateRequest()
    req.CopyFrom(LONG[mode])
    req.deadline_s = 0.5
    t = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        gateway.stub.Generate(req, timeout=IDLE_S)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert e.value.details() == "the request ran past its 0.5 s deadline"
    assert time.monotonic() - t < SOON_S  # the deadline, then at most one LM step and a verification
    assert gateway.lm.steps_after_the_call_ended() <= 1
    gateway.idle()
    assert all_closed(gateway.lm)
