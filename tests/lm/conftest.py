"""LM test fixtures: the module's own `engine` behind a real LM gRPC server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest_asyncio

from services.common.contracts import LM
from services.common.grpc_server import start_server
from services.lm.engine import LmEngine
from services.lm.service import lm_service

Rpc = Callable[[str], Any]  # rpc("Step")(request, timeout=5) -> reply


@pytest_asyncio.fixture
async def lm_rpc(engine: LmEngine) -> AsyncIterator[Rpc]:
    """`lm_rpc(op)`: a callable for the LM operation `op` on a loopback gRPC server over the module's `engine`."""
    svc, batch = lm_service(engine, "ralmspec:lm:test")
    srv = await start_server([svc], port=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        def rpc(name: str) -> Any:
            op = LM.ops[name]
            return ch.unary_unary(LM.method(name), request_serializer=op.request.SerializeToString,
                                  response_deserializer=op.reply.FromString)

        yield rpc
    await srv.stop(0)
    batch.close()
