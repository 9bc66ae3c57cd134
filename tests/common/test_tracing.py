"""Request ids (services/common/tracing.py, logs.py): the id check, its trip through threads, the stream entry's
envelope and gRPC metadata, the log filter and the JSON formatter."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from google.protobuf.wrappers_pb2 import StringValue

from services.common import logs, tracing
from services.common.errors import InvalidRequest
from services.common.grpc_client import GrpcClient
from services.common.grpc_server import GrpcServer, start_server
from services.common.ops import Operation, ServiceDef
from services.common.redis_server import LocalRedis
from services.common.transport import StreamClient, StreamWorker
from services.retriever.coalescing import Coalescer, CoalesceSettings


async def whoami(req: StringValue) -> StringValue:
    """The request id this handler runs under ("" outside a request)."""
    return StringValue(value=tracing.current() or "")


async def forward(req: StringValue) -> StringValue:
    """Calls `Whoami` on the gRPC server at `req.value` from inside this call: the id goes along."""
    async with GrpcClient(req.value) as c:
        reply = await c.call(WHO, WHO.ops["Whoami"], StringValue(), timeout_s=5)
    assert isinstance(reply, StringValue)
    return reply


async def count(req: StringValue) -> AsyncIterator[StringValue]:
    yield StringValue(value=tracing.current() or "")


WHO = ServiceDef.of("ralmspec.test.Who", f"test:who:{uuid.uuid4().hex}",
                    Operation("Whoami", StringValue, StringValue, whoami),
                    Operation("Forward", StringValue, StringValue, forward),
                    Operation("Count", StringValue, StringValue, count, streaming=True))


# -- the id and its trip through threads ------------------------------------------------------------------------


@pytest.mark.parametrize("rid", ["a", "req-42", "0f" * 64, "!~{}:/=", "node-RaLM QA, +PSA"])
def test_valid_ids(rid: str) -> None:
    assert tracing.check(rid) == rid


@pytest.mark.parametrize("rid", ["", "x" * 129, "tab\there", "new\nline", "é", "\x7f"])
def test_invalid_ids_are_refused_with_what_an_id_must_be(rid: str) -> None:
    with pytest.raises(InvalidRequest, match=r"x-request-id must be 1-128 printable ASCII characters"):
        tracing.check(rid)


def test_from_wire_keeps_only_ids() -> None:
    assert tracing.from_wire(b"abc") == "abc"
    assert tracing.from_wire(None) is None and tracing.from_wire(b"") is None
    assert tracing.from_wire(b"new\nline") is None


def test_new_ids_are_valid_and_distinct() -> None:
    assert len({tracing.new_id() for _ in range(100)}) == 100
    assert tracing.valid(tracing.new_id())


def test_bound_restores_the_outer_id() -> None:
    with tracing.bound("outer"):
        with tracing.bound("inner"):
            assert tracing.current() == "inner"
        assert tracing.current() == "outer"
    assert tracing.current() is None


def test_a_context_executor_carries_the_id_and_a_plain_pool_does_not() -> None:
    with tracing.bound("r1"), tracing.ContextExecutor(1) as ours, ThreadPoolExecutor(1) as plain:
        assert ours.submit(tracing.current).result() == "r1"
        assert plain.submit(tracing.current).result() is None  # why the services' pools are ContextExecutors


@pytest.mark.asyncio
async def test_run_in_executor_and_run_coroutine_threadsafe_carry_the_id() -> None:
    loop = asyncio.get_running_loop()

    async def read() -> str | None:
        return tracing.current()

    def from_a_thread() -> str | None:  # what the gateway's Bridge does from a controller thread
        with tracing.bound("r2"):
            return asyncio.run_coroutine_threadsafe(read(), loop).result(5)

    with tracing.ContextExecutor(1) as pool:
        with tracing.bound("r3"):
            assert await loop.run_in_executor(pool, tracing.current) == "r3"
        assert await loop.run_in_executor(pool, from_a_thread) == "r2"


@pytest.mark.asyncio
async def test_a_coalesced_batch_runs_as_its_callers_request_or_none() -> None:
    seen: list[str | None] = []

    async def run(key: str, items: list[int]) -> list[int]:
        seen.append(tracing.current())
        await asyncio.sleep(0.01)
        return items

    c: Coalescer[str, int, int] = Coalescer(run, CoalesceSettings(window_ms=20))

    async def submit(rid: str, item: int) -> list[int]:
        with tracing.bound(rid):
            return await c.submit("k", [item])

    assert await asyncio.gather(submit("a", 1), submit("a", 2)) == [[1], [2]]
    assert await asyncio.gather(submit("a", 3), submit("b", 4)) == [[3], [4]]
    assert seen == ["a", None]  # one request's batch is its; a merged batch is no single request's


# -- logs --------------------------------------------------------------------------------------------------------


def record(msg: str = "hello %s", args: tuple[object, ...] = ("world",), **extra: object) -> logging.LogRecord:
    return logging.getLogger("services.test").makeRecord("services.test", logging.INFO, __file__, 1, msg, args,
                                                         None, extra=extra or None)


def formatted(r: logging.LogRecord, formatter: logging.Formatter) -> str:
    assert logs.RequestIdFilter().filter(r)
    return formatter.format(r)


def test_json_lines_carry_the_request_id_when_there_is_one() -> None:
    fmt = logs.JsonFormatter("lm", "lm-0-123")
    with tracing.bound("abc"):
        line = formatted(record(), fmt)
    got = json.loads(line)
    assert got.pop("time").endswith("Z")
    assert got == {"level": "INFO", "service": "lm", "replica": "lm-0-123", "logger": "services.test",
                   "message": "hello world", "request_id": "abc"}
    assert "request_id" not in json.loads(formatted(record(), fmt))  # outside a request: no field
    assert json.loads(formatted(record(request_id="given"), fmt))["request_id"] == "given"  # extra= wins


def test_a_traceback_stays_on_its_line() -> None:
    try:
        raise RuntimeError("kaput\nsecond line")
    except RuntimeError:
        r = logging.getLogger("x").makeRecord("x", logging.ERROR, __file__, 1, "failed:\n%s", ("why",),
                                              sys.exc_info())
    line = formatted(r, logs.JsonFormatter())
    assert "\n" not in line
    got = json.loads(line)
    assert got["message"] == "failed:\nwhy" and "Traceback" in got["exc"] and "kaput" in got["exc"]
    assert "service" not in got and "replica" not in got  # a CLI process names neither


def test_text_lines_tag_the_request() -> None:
    fmt = logs.text_formatter("gateway")
    with tracing.bound("abc"):
        assert formatted(record(), fmt).endswith(" gateway INFO services.test [abc]: hello world")
    assert formatted(record(), fmt).endswith(" gateway INFO services.test: hello world")


@pytest.mark.parametrize(("var", "value"), [("RALMSPEC_LOG_FORMAT", "yaml"), ("RALMSPEC_LOG", "LOUD")])
def test_configure_refuses_unknown_settings(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SystemExit, match=var):
        logs.configure("INFO", "json")


def test_configure_picks_the_format(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        monkeypatch.setenv("RALMSPEC_LOG_FORMAT", "")
        logs.configure("INFO", "json", service="lm", replica="r")
        assert isinstance(root.handlers[0].formatter, logs.JsonFormatter)
        monkeypatch.setenv("RALMSPEC_LOG_FORMAT", "TEXT")
        logs.configure("INFO", "json")
        assert not isinstance(root.handlers[0].formatter, logs.JsonFormatter)
    finally:
        root.handlers[:], root.level = saved
        logging.captureWarnings(False)


def test_call_log_is_info_once_per_request_then_debug(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("services.test.calls")
    calls = tracing.CallLog(log, size=2)
    with caplog.at_level(logging.DEBUG, logger=log.name):
        for rid in ("a", "a", "b", None, "c", "a"):  # "a" fell out of a window of two
            with tracing.bound(rid):
                calls.done("/svc/Op", "OK", 0.0)
    assert [r.levelname for r in caplog.records] == ["INFO", "DEBUG", "INFO", "DEBUG", "INFO", "INFO"]
    assert caplog.records[0].getMessage().startswith("/svc/Op OK in ")


# -- across processes: the stream entry's envelope and gRPC metadata ---------------------------------------------


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with LocalRedis() as server:
        yield server.url


@pytest.mark.asyncio
async def test_the_envelope_carries_the_id_and_old_entries_still_decode(url: str) -> None:
    w = StreamWorker(url, WHO, "w1", block_ms=100)
    task = asyncio.create_task(w.run())
    r = aioredis.from_url(url)
    try:
        async with StreamClient(url, block_ms=100) as client:
            who = WHO.ops["Whoami"]
            with tracing.bound("req-1"):
                assert (await client.call(WHO.stream, who, StringValue(), timeout_s=5)).value == "req-1"
            assert (await client.call(WHO.stream, who, StringValue(), timeout_s=5)).value == ""  # none: none sent
            sent = await r.xrange(WHO.stream)
            assert [f.get(b"request_id") for _, f in sent] == [b"req-1", None]
        for fields in ({}, {"request_id": "raw-2"}, {"request_id": "not\tan id"}):  # hand-made entries, old and new
            reply_to = f"test:reply:{uuid.uuid4().hex}"
            await r.xadd(WHO.stream, {"op": "Whoami", "id": "raw", "reply_to": reply_to, "deadline_ms": 0,
                                      "body": b"", **fields})
            got = await r.xread({reply_to: "0-0"}, count=1, block=3000)
            reply = got[0][1][0][1]
            assert reply[b"code"] == b"OK"
            want = "raw-2" if fields.get("request_id") == "raw-2" else ""
            assert StringValue.FromString(reply[b"body"]).value == want
    finally:
        await w.drain()
        await task
        await r.aclose()


@pytest_asyncio.fixture
async def server() -> AsyncIterator[GrpcServer]:
    srv = await start_server([WHO], port=0)
    yield srv
    await srv.stop(0)


def raw(ch: grpc.aio.Channel, name: str) -> grpc.aio.UnaryUnaryMultiCallable:
    return ch.unary_unary(WHO.method(name), request_serializer=StringValue.SerializeToString,
                          response_deserializer=StringValue.FromString)


@pytest.mark.asyncio
async def test_grpc_binds_the_clients_id_or_its_own_and_sends_it_back(server: GrpcServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        call = raw(ch, "Whoami")(StringValue(), metadata=(("x-request-id", "client-7"),), timeout=5)
        assert (await call).value == "client-7"
        assert ("x-request-id", "client-7") in tuple(await call.initial_metadata())
        call = raw(ch, "Whoami")(StringValue(), timeout=5)
        own = (await call).value
        assert tracing.valid(own) and ("x-request-id", own) in tuple(await call.initial_metadata())
        # concurrent calls keep their own ids
        ids = [f"c{i}" for i in range(8)]
        got = await asyncio.gather(*(raw(ch, "Whoami")(StringValue(), metadata=(("x-request-id", i),), timeout=5)
                                     for i in ids))
        assert [g.value for g in got] == ids
        stream = ch.unary_stream(WHO.method("Count"), request_serializer=StringValue.SerializeToString,
                                 response_deserializer=StringValue.FromString)
        assert [m.value async for m in stream(StringValue(), metadata=(("x-request-id", "s-1"),), timeout=5)] == ["s-1"]


@pytest.mark.asyncio
@pytest.mark.parametrize("rid", ["", "x" * 200])
async def test_grpc_refuses_an_invalid_id(server: GrpcServer, rid: str) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await raw(ch, "Whoami")(StringValue(), metadata=(("x-request-id", rid),), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "x-request-id must be 1-128 printable ASCII characters" in (e.value.details() or "")


@pytest.mark.asyncio
async def test_a_call_made_while_serving_a_request_sends_its_id(server: GrpcServer) -> None:
    target = f"127.0.0.1:{server.port}"
    async with GrpcClient(target) as c:
        with tracing.bound("outer-1"):  # GrpcClient sends the current id...
            assert (await c.call(WHO, WHO.ops["Whoami"], StringValue(), timeout_s=5)).value == "outer-1"
        # ...and so does a handler's own call to another service (the server bound the id there)
        async with grpc.aio.insecure_channel(target) as ch:
            got = await raw(ch, "Forward")(StringValue(value=target), metadata=(("x-request-id", "fw-1"),), timeout=5)
    assert got.value == "fw-1"
