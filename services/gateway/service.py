"""Gateway service: the public API (Generate, GenerateStream) over the controller (a thin adapter).

The controller is synchronous; each request runs on a worker thread and reaches the other services through
the backends it was built with. GenerateStream forwards tokens as the controller releases them, which it does
only once they are verified.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ralmspec.v1 import gateway_pb2 as pb

from services.common.contracts import GATEWAY
from services.common.ops import ServiceDef
from services.gateway.api import to_reply, to_request
from services.gateway.controller import Controller
from services.gateway.ralmspec import SpecConfig


def gateway_service(controller: Controller, default_spec: SpecConfig) -> ServiceDef:
    engine = controller.engine

    async def generate(req: pb.GenerateRequest) -> pb.GenerateReply:
        request = to_request(req, default_spec)
        res = await asyncio.to_thread(controller.run, request)
        return to_reply(res, engine.docs)

    async def generate_stream(req: pb.GenerateRequest) -> AsyncIterator[pb.GenerateChunk]:
        request = to_request(req, default_spec)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[int] | None] = asyncio.Queue()

        def emit(tokens: list[int]) -> None:  # called on the controller's thread
            loop.call_soon_threadsafe(queue.put_nowait, list(tokens))

        future = loop.run_in_executor(None, controller.run, request, emit)
        future.add_done_callback(lambda _: queue.put_nowait(None))
        tokens: list[int] = []
        text = ""
        while (chunk := await queue.get()) is not None:
            tokens += chunk
            full = engine.decode(tokens)
            delta = full[len(text):] if full.startswith(text) else full  # a multi-byte character completes late
            text = full
            yield pb.GenerateChunk(delta=pb.TokenDelta(token_ids=chunk, text=delta))
        res = await future
        yield pb.GenerateChunk(done=to_reply(res, engine.docs))

    return GATEWAY.bind(Generate=generate, GenerateStream=generate_stream)
