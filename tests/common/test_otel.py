"""The optional OpenTelemetry layer (services/common/otel.py): off by default; on, a span per call sent, per RPC
served and per stream entry handled, parented across gRPC metadata and the stream entry's envelope. Runs when the
`otel` extra's SDK is installed, else skips."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from google.protobuf.wrappers_pb2 import StringValue

from services.common import otel, tracing
from services.common.grpc_client import GrpcClient
from services.common.grpc_server import start_server
from services.common.ops import Operation, ServiceDef
from services.common.redis_server import LocalRedis
from services.common.transport import StreamClient, StreamWorker


async def echo(req: StringValue) -> StringValue:
    return StringValue(value=req.value)


SVC = ServiceDef.of("ralmspec.test.Otel", f"test:otel:{uuid.uuid4().hex}", Operation("Echo", StringValue,
                                                                                     StringValue, echo))


@pytest.mark.parametrize(("flag", "endpoint", "want"), [("", "", False), ("", "http://c:4317", True),
                                                         ("1", "", True), ("0", "http://c:4317", False)])
def test_wanted_by_flag_or_endpoint(monkeypatch: pytest.MonkeyPatch, flag: str, endpoint: str, want: bool) -> None:
    monkeypatch.setenv("RALMSPEC_OTEL", flag)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    assert otel.wanted() is want


def test_off_by_default_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RALMSPEC_OTEL", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert otel.setup("lm", "r") is False
    with otel.span("x", "server", {"traceparent": "garbage"}):
        assert otel.carrier() == {}


@pytest.fixture
def spans() -> Iterator[list]:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    assert otel.setup("test", "replica-1", exporter)
    try:
        yield exporter.get_finished_spans  # type: ignore[misc]
    finally:
        otel.shutdown()


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with LocalRedis() as server:
        yield server.url


@pytest.mark.asyncio
async def test_spans_are_parented_across_grpc_and_the_stream_envelope(spans, url: str) -> None:
    server = await start_server([SVC], port=0)
    worker = StreamWorker(url, SVC, "w1", block_ms=100)
    task = asyncio.create_task(worker.run())
    try:
        async with GrpcClient(f"127.0.0.1:{server.port}") as grpc_client, StreamClient(url, block_ms=100) as client:
            with tracing.bound("rid-otel"):
                await grpc_client.call(SVC, SVC.ops["Echo"], StringValue(value="a"), timeout_s=5)
                await client.call(SVC.stream, SVC.ops["Echo"], StringValue(value="b"), timeout_s=5)
    finally:
        await worker.drain()
        await task
        await server.stop(0)
    got = {(s.name, s.kind.name): s for s in spans()}
    sent_grpc, served = got["/ralmspec.test.Otel/Echo", "CLIENT"], got["/ralmspec.test.Otel/Echo", "SERVER"]
    sent_stream, handled = got[f"{SVC.stream}/Echo", "CLIENT"], got["ralmspec.test.Otel/Echo", "CONSUMER"]
    for parent, child in ((sent_grpc, served), (sent_stream, handled)):
        assert child.parent is not None and child.parent.span_id == parent.context.span_id
        assert child.context.trace_id == parent.context.trace_id
        assert child.attributes["ralmspec.request_id"] == "rid-otel"
    assert served.resource.attributes["service.name"] == "ralmspec-test"
