"""The gRPC adapter end to end on a loopback port: round trips, the status mapping, streaming, health, reflection,
graceful stop and the signal hook. A test ServiceDef on StringValue keeps it free of the project's protos."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf.wrappers_pb2 import StringValue
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from services.common.errors import DeadlineExceeded, InvalidRequest
from services.common.grpc_client import GrpcClient
from services.common.grpc_server import GrpcServer, install_sigterm, start_server
from services.common.ops import Operation, RemoteError, ServerStream, ServiceDef, Unary

SLOW_S = 0.5  # how long Slow sleeps: long enough for stop() to begin while it runs


async def echo(req: StringValue) -> StringValue:
    return StringValue(value=f"echo:{req.value}")


async def fail(req: StringValue) -> StringValue:
    raise InvalidRequest("x must be positive, got -1")


async def boom(req: StringValue) -> StringValue:
    raise RuntimeError("kaput")


SLOW_ENTERED: list[asyncio.Event] = []  # set when a Slow call is inside its handler (tests wait on it, not a sleep)


async def slow(req: StringValue) -> StringValue:
    for e in SLOW_ENTERED:
        e.set()
    await asyncio.sleep(SLOW_S)
    return StringValue(value="slow done")


async def count(req: StringValue) -> AsyncIterator[StringValue]:
    n = int(req.value)
    if n < 0:
        raise InvalidRequest(f"n must be >= 0, got {n}")
    for i in range(n):
        yield StringValue(value=str(i))
    if n == 3:
        raise RuntimeError("after three")  # an error after some replies: they arrive, then the status


def op(name: str, handler: Unary | ServerStream, streaming: bool = False) -> Operation:
    return Operation(name, StringValue, StringValue, handler, streaming)


ECHO = ServiceDef.of("ralmspec.test.Echo", "ralmspec:test", op("Echo", echo), op("Fail", fail), op("Boom", boom),
                     op("Slow", slow), op("Count", count, streaming=True))


@pytest_asyncio.fixture
async def server() -> AsyncIterator[GrpcServer]:
    srv = await start_server([ECHO], port=0)
    yield srv
    await srv.stop(0)


@pytest_asyncio.fixture
async def client(server: GrpcServer) -> AsyncIterator[GrpcClient]:
    async with GrpcClient(f"127.0.0.1:{server.port}") as c:
        yield c


def raw(channel: grpc.aio.Channel, name: str) -> Any:  # a unary-unary multicallable
    return channel.unary_unary(ECHO.method(name), request_serializer=StringValue.SerializeToString,
                               response_deserializer=StringValue.FromString)


@pytest.mark.asyncio
async def test_unary_round_trip_via_client(client: GrpcClient) -> None:
    reply = await client.call(ECHO, ECHO.ops["Echo"], StringValue(value="hi"), timeout_s=5)
    assert reply == StringValue(value="echo:hi")


@pytest.mark.asyncio
async def test_unary_round_trip_and_status_on_raw_channel(server: GrpcServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        assert (await raw(ch, "Echo")(StringValue(value="x"), timeout=5)).value == "echo:x"
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await raw(ch, "Fail")(StringValue(), timeout=5)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad.value.details() == "x must be positive, got -1"
        with pytest.raises(grpc.aio.AioRpcError) as internal:
            await raw(ch, "Boom")(StringValue(), timeout=5)
        assert internal.value.code() == grpc.StatusCode.INTERNAL
        assert internal.value.details() == "internal error: RuntimeError: kaput"
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await raw(ch, "Nope")(StringValue(), timeout=5)
        assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED


NOT_PROTOBUF = [(b"\xff\xff\xff", "Wire format was corrupt"), (b"\x0a\x02\xff\xfe", "String field had bad UTF-8")]


@pytest.mark.asyncio
@pytest.mark.parametrize("body, reason", NOT_PROTOBUF)
async def test_a_body_that_is_not_the_request_message_is_invalid_argument(
        server: GrpcServer, caplog: pytest.LogCaptureFixture, body: bytes, reason: str) -> None:
    caplog.set_level(logging.DEBUG)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        for name, kind in (("Echo", ch.unary_unary), ("Count", ch.unary_stream)):
            call = kind(ECHO.method(name))  # identity serializers: the bytes go out as they are
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await call(body, timeout=5) if name == "Echo" else [r async for r in call(body, timeout=5)]
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert bad.value.details() == (f"{name}: the request body is not a valid google.protobuf.StringValue "
                                           f"message ({reason})")
        assert (await ch.unary_unary(ECHO.method("Echo"))(b"\x0a\x01x", timeout=5)) == b"\x0a\x06echo:x"
    assert [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info] == []  # an answer, not a bug


@pytest.mark.asyncio
async def test_client_maps_status_back_to_errors(client: GrpcClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="services.common.grpc_server")
    with pytest.raises(InvalidRequest, match=r"^x must be positive, got -1$"):
        await client.call(ECHO, ECHO.ops["Fail"], StringValue(), timeout_s=5)
    with pytest.raises(RemoteError) as internal:
        await client.call(ECHO, ECHO.ops["Boom"], StringValue(), timeout_s=5)
    assert internal.value.code == "INTERNAL"
    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(logged) == 1 and logged[0].exc_info is not None  # INTERNAL: logged once, with its traceback
    with pytest.raises(DeadlineExceeded):
        await client.call(ECHO, ECHO.ops["Slow"], StringValue(), timeout_s=0.05)


@pytest.mark.asyncio
async def test_streaming_yields_all_then_status(client: GrpcClient) -> None:
    got = [r.value async for r in client.stream(ECHO, ECHO.ops["Count"], StringValue(value="5"), timeout_s=5)]
    assert got == ["0", "1", "2", "3", "4"]
    with pytest.raises(InvalidRequest, match="n must be >= 0, got -2"):
        [r async for r in client.stream(ECHO, ECHO.ops["Count"], StringValue(value="-2"), timeout_s=5)]
    got = []
    with pytest.raises(RemoteError, match="after three"):
        async for r in client.stream(ECHO, ECHO.ops["Count"], StringValue(value="3"), timeout_s=5):
            got.append(r.value)
    assert got == ["0", "1", "2"]  # replies before the error arrive, then the status ends the stream


@pytest.mark.asyncio
async def test_health_serving_then_not_serving_on_stop(server: GrpcServer, client: GrpcClient) -> None:
    await client.wait_healthy(timeout_s=5)
    await client.wait_healthy(ECHO.full_name, timeout_s=5)
    stub = health_pb2_grpc.HealthStub(client.channel)
    for name in ("", ECHO.full_name):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.Check(health_pb2.HealthCheckRequest(service="ralmspec.test.Nope"), timeout=5)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    stopping = asyncio.create_task(server.stop(1.0))
    await asyncio.sleep(0.05)
    for name in ("", ECHO.full_name):  # asked of the servicer: the stopping server refuses new RPCs
        reply = await server.health.Check(health_pb2.HealthCheckRequest(service=name), None)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await stopping


@pytest.mark.asyncio
async def test_reflection_lists_services(client: GrpcClient) -> None:
    info = reflection_pb2_grpc.ServerReflectionStub(client.channel).ServerReflectionInfo
    call = info(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    replies = [r async for r in call]
    names = {s.name for s in replies[0].list_services_response.service}
    assert names == {ECHO.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME}


@pytest.mark.asyncio
async def test_graceful_stop_lets_in_flight_call_finish(server: GrpcServer, client: GrpcClient) -> None:
    entered = asyncio.Event()
    SLOW_ENTERED.append(entered)
    try:
        in_flight = asyncio.create_task(client.call(ECHO, ECHO.ops["Slow"], StringValue(), timeout_s=30))
        await asyncio.wait_for(entered.wait(), 30)  # the call has reached the handler (however loaded the machine)
    finally:
        SLOW_ENTERED.remove(entered)
    await server.stop(grace_s=5)  # returns once the in-flight call is answered
    # the reply was sent before the stop completed; the client task may still need a turn of the loop to read it
    assert (await asyncio.wait_for(in_flight, 5)).value == "slow done"
    await server.wait()  # already terminated: returns at once


@pytest.mark.asyncio
async def test_bound_port_in_use_is_an_error(server: GrpcServer) -> None:
    with pytest.raises(RuntimeError):
        await start_server([ECHO], port=server.port)


@pytest.mark.asyncio
async def test_sigterm_runs_stop_once() -> None:
    loop = asyncio.get_running_loop()
    calls: list[int] = []
    stopped = asyncio.Event()

    async def stop() -> None:
        calls.append(1)
        stopped.set()

    install_sigterm(loop, stop)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.wait_for(stopped.wait(), 5)
        await asyncio.sleep(0.05)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    assert calls == [1]
