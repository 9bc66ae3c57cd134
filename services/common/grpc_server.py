"""The gRPC adapter: serves each ServiceDef's operation table on one grpc.aio server, with health and reflection.

Handlers stay protocol-free (`async def handler(request) -> reply`, or `(request, call)`); this module only decodes,
calls, encodes and maps an exception to a status through `status_of`, the one mapping every edge shares (an
undecodable request body included: INVALID_ARGUMENT). A handler that takes a `Call` learns the client's deadline
(`context.time_remaining()`) and its cancellation: gRPC cancels the handler's task when the client cancels, its
deadline passes or it stops reading a stream, and the adapter then sets `call.cancelled` for whatever work the
handler started on other threads.

Each call runs as part of a request (`tracing.py`): the client's `x-request-id` metadata when it sends one (checked:
INVALID_ARGUMENT otherwise), else a new id, bound for the handler and sent back as initial metadata `x-request-id`.
Each call is logged once when answered (`tracing.CallLog`: INFO for a request's first call here, else DEBUG), and
counted with its status and latency (`metrics.observe_rpc`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import metrics, otel, tracing
from services.common.auth import Auth, ServerAuth
from services.common.ops import CANCELLED, INTERNAL, OK, Call, Operation, ServiceDef, status_of
from services.common.tls import Tls

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # retrieved passages and token batches can pass gRPC's 4 MiB default
# The public API's bound on a request (a 20,000-character prompt is at most 80 KB of UTF-8): past it gRPC answers
# RESOURCE_EXHAUSTED before any parsing.
GATEWAY_MAX_MESSAGE_BYTES = 1024 * 1024
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> NoReturn:
    """End the RPC with the status `status_of(exc)`; INTERNAL is logged once, with its traceback."""
    code, message = status_of(exc)
    if code == INTERNAL:
        log.error("%s failed: %s", method, message, exc_info=exc)
    else:
        log.debug("%s answered %s: %s", method, code, message)
    await context.abort(grpc.StatusCode[code], message)  # raises grpc.aio.AbortError
    raise exc  # unreachable: abort always raises


def _record(calls: tracing.CallLog, method: str, service: str, op: str, code: str, started: float) -> None:
    """A finished call, in the log and the metrics."""
    calls.done(method, code, started)
    metrics.observe_rpc("grpc", service, op, code, started)


def _call_of(context: grpc.aio.ServicerContext) -> Call:
    left = context.time_remaining()
    return Call() if left is None else Call.expiring_in(left, f"the client's {left:.1f} s deadline")


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    value = next((v for k, v in context.invocation_metadata() or () if k == key), None)
    return value.decode("ascii", errors="replace") if isinstance(value, bytes) else value


async def _bind_request_id(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """Bind the call's request id (the client's, checked, or a new one) to the RPC's task; send it back first.
    Returns the caller's trace context, the OpenTelemetry span's parent (`otel.py`)."""
    given = _metadata(context, tracing.METADATA_KEY)
    rid = tracing.new_id() if given is None else tracing.check(given)
    tracing.REQUEST_ID.set(rid)  # grpc.aio runs each RPC in its own task: this call's context only
    await context.send_initial_metadata(((tracing.METADATA_KEY, rid),))
    parent = _metadata(context, otel.TRACEPARENT)
    return {} if parent is None else {otel.TRACEPARENT: parent}


def _unary(method: str, op: Operation, calls: tracing.CallLog) -> Callable[[bytes, grpc.aio.ServicerContext],
                                                                            Awaitable[Message]]:
    service = method.split("/")[1]  # "/<full service name>/<op>"

    async def rpc(body: bytes, context: grpc.aio.ServicerContext) -> Message:
        call, started = _call_of(context), time.perf_counter()
        code: str | None = OK  # None once recorded
        try:
            parent = await _bind_request_id(context)
            with otel.span(method, "server", parent):
                return await op.unary(op.parse(body), call)
        except Exception as exc:
            _record(calls, method, service, op.name, status_of(exc)[0], started)
            code = None  # recorded: before the status reaches the client, so a client that saw it sees the count
            await _abort(context, method, exc)
        except asyncio.CancelledError:  # the client cancelled or its deadline passed: the call stays cancelled
            call.cancelled.set()
            code = CANCELLED
            raise
        finally:
            if code is not None:
                _record(calls, method, service, op.name, code, started)

    return rpc


def _server_stream(method: str, op: Operation, calls: tracing.CallLog) -> Callable[[bytes, grpc.aio.ServicerContext],
                                                                                  AsyncIterator[Message]]:
    service = method.split("/")[1]

    async def rpc(body: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Message]:
        call, started = _call_of(context), time.perf_counter()
        code: str | None = OK  # None once recorded
        try:
            parent = await _bind_request_id(context)
            with otel.span(method, "server", parent):
                async with contextlib.aclosing(op.stream(op.parse(body), call)) as replies:
                    async for reply in replies:
                        yield reply
        except Exception as exc:  # replies already sent stand; the status ends the stream
            _record(calls, method, service, op.name, status_of(exc)[0], started)
            code = None  # recorded, before the status goes out
            await _abort(context, method, exc)
        except (asyncio.CancelledError, GeneratorExit):  # cancelled, past its deadline, or no longer read
            call.cancelled.set()
            code = CANCELLED
            raise
        finally:
            if code is not None:
                _record(calls, method, service, op.name, code, started)

    return rpc


def _method_handler(service: ServiceDef, op: Operation, calls: tracing.CallLog) -> grpc.RpcMethodHandler:
    # No request deserializer: the body arrives as bytes and is parsed inside the error mapping (a deserializer
    # that raises makes gRPC answer UNKNOWN and log a traceback).
    method = service.method(op.name)
    if op.streaming:
        return grpc.unary_stream_rpc_method_handler(_server_stream(method, op, calls),
                                                    response_serializer=op.reply.SerializeToString)
    return grpc.unary_unary_rpc_method_handler(_unary(method, op, calls),
                                               response_serializer=op.reply.SerializeToString)


def generic_handler(service: ServiceDef) -> grpc.GenericRpcHandler:
    """One gRPC handler serving every operation of `service` under /<full_name>/<op name>."""
    calls = tracing.CallLog(log)
    return grpc.method_handlers_generic_handler(
        service.full_name, {name: _method_handler(service, op, calls) for name, op in service.ops.items()})


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int  # the bound port (the one picked when 0 was asked for)
    services: list[str] = field(default_factory=list)  # full names served

    async def stop(self, grace_s: float) -> None:
        """Graceful: health turns NOT_SERVING, new RPCs are refused, in-flight ones get `grace_s` to finish."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def start_server(services: Sequence[ServiceDef], port: int, host: str = "127.0.0.1", *,
                       max_concurrent_rpcs: int | None = None, options: Sequence[tuple[str, Any]] = (),
                       auth: Auth | None = None, tls: Tls | None = None) -> GrpcServer:
    """Serve `services` on host:port (0: a free port) with grpc.health.v1 and server reflection; returns once bound.

    `max_concurrent_rpcs`: past it gRPC itself answers RESOURCE_EXHAUSTED (None: no limit).
    `options`: extra channel arguments, after (so overriding) CHANNEL_OPTIONS.
    `auth`: the bearer tokens calls need (`auth.py`; None or off: none). `tls`: serve TLS only (None: plaintext).
    """
    interceptors = [ServerAuth(auth)] if auth is not None and auth.on else []
    server = grpc.aio.server(handlers=[generic_handler(s) for s in services], interceptors=interceptors,
                             options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0), *options],
                             maximum_concurrent_rpcs=max_concurrent_rpcs)
    servicer = health.aio.HealthServicer()  # serves "" as SERVING from the start
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    names = [s.full_name for s in services]
    for name in names:
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"  # add_*_port raise RuntimeError when the port is taken
    bound = server.add_insecure_port(address) if tls is None else \
        server.add_secure_port(address, tls.server_credentials())
    await server.start()
    log.info("gRPC serving %s on %s:%d (%s, %s)", ", ".join(names), host, bound,
             "plaintext" if tls is None else "mutual TLS" if tls.client_auth else "TLS",
             "bearer tokens required" if interceptors else "no authentication")
    return GrpcServer(server, servicer, bound, names)


def install_sigterm(loop: asyncio.AbstractEventLoop, stop: Callable[[], Awaitable[None]]) -> None:
    """On SIGTERM or SIGINT run `stop()` once (a second signal while stopping does nothing)."""
    tasks: list[asyncio.Task[None]] = []  # holds the one stop task (the loop keeps only weak references)

    async def run() -> None:
        await stop()

    def on_signal(signum: int) -> None:
        if tasks:
            return
        log.info("signal %s: stopping", signal.Signals(signum).name)
        tasks.append(loop.create_task(run()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
