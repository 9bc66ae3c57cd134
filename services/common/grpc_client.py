"""The gRPC caller of a ServiceDef: one channel, typed by the operation table, errors mapped back by `error_of`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import auth, otel, tracing
from services.common.errors import Unavailable
from services.common.grpc_server import CHANNEL_OPTIONS
from services.common.ops import Operation, ServiceDef, error_of


def _metadata() -> tuple[tuple[str, str], ...] | None:
    """The current request's id as `x-request-id` metadata (the server logs its work under it), and the current
    OpenTelemetry span's `traceparent` when export is on; None when neither."""
    rid = tracing.current()
    md = [] if rid is None else [(tracing.METADATA_KEY, rid)]
    md += otel.carrier().items()
    return tuple(md) or None


class GrpcClient:
    """Calls operations on `target` ("host:port"); a non-OK status raises `error_of(code, details)`. A call made
    while serving a request (`tracing.current()`) sends its id as `x-request-id` metadata; every call sends `token`
    as a bearer token (`auth.py`), over TLS when `credentials` are given (`tls.py`).

    Make it inside the running event loop: a grpc.aio channel belongs to the loop it was made in.
    """

    def __init__(self, target: str, token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.target = target
        self.channel = auth.aio_channel(target, token, credentials, options=CHANNEL_OPTIONS)
        self._calls: dict[str, Any] = {}  # method path -> multicallable, built once

    def _callable(self, service: ServiceDef, op: Operation) -> Any:
        method = service.method(op.name)
        if method not in self._calls:
            make = self.channel.unary_stream if op.streaming else self.channel.unary_unary
            self._calls[method] = make(method, request_serializer=op.request.SerializeToString,
                                       response_deserializer=op.reply.FromString)
        return self._calls[method]

    async def call(self, service: ServiceDef, op: Operation, request: Message,
                   timeout_s: float | None = None) -> Message:
        try:
            with otel.span(service.method(op.name), "client"):
                reply: Message = await self._callable(service, op)(request, timeout=timeout_s, metadata=_metadata())
        except grpc.aio.AioRpcError as e:
            raise error_of(e.code().name, e.details() or "") from e
        return reply

    async def stream(self, service: ServiceDef, op: Operation, request: Message,
                     timeout_s: float | None = None) -> AsyncIterator[Message]:
        """The replies of a server-streaming operation, in order; an error status raises after the replies before it."""
        call = self._callable(service, op)(request, timeout=timeout_s, metadata=_metadata())
        try:
            async for reply in call:
                yield reply
        except grpc.aio.AioRpcError as e:
            raise error_of(e.code().name, e.details() or "") from e
        finally:
            call.cancel()  # no-op once done; ends the RPC when the caller stops early

    async def wait_healthy(self, service_name: str = "", timeout_s: float = 30) -> None:
        """Poll grpc.health.v1 Check until `service_name` ("" = the whole server) is SERVING."""
        check = health_pb2_grpc.HealthStub(self.channel).Check
        end = time.monotonic() + timeout_s
        last = "no answer"
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise Unavailable(f"{self.target} not healthy for {service_name or 'server'!r} "
                                  f"after {timeout_s:g}s: {last}")
            try:
                reply = await check(health_pb2.HealthCheckRequest(service=service_name), timeout=min(left, 1.0))
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as e:
                last = f"{e.code().name}: {e.details()}"
            await asyncio.sleep(min(0.1, max(end - time.monotonic(), 0)))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> GrpcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
