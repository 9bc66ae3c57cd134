"""Gateway service: the public API (Generate, GenerateStream) over the controller (a thin adapter).

The controller is synchronous; each request runs on a thread of the gateway's bounded pool (`admission.py`: past its
workers and queue, RESOURCE_EXHAUSTED) and reaches the other services through the backends it was built with. A
request stops at the earlier of its `deadline_s` (counted from its arrival, queueing included) and the client's gRPC
deadline, and before its next LM step once the client cancels. GenerateStream forwards tokens as the controller
releases them, which it does only once they are verified. Both replies carry the request's id (`tracing.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from ralmspec.v1 import gateway_pb2 as pb

from services.common import metrics, tracing
from services.common.contracts import GATEWAY
from services.common.ops import Call, ServiceDef
from services.gateway.admission import RequestPool
from services.gateway.api import to_reply, to_request
from services.gateway.controller import Controller, Request
from services.gateway.ralm import RalmResult
from services.gateway.ralmspec import SpecConfig


def observe(request: Request, res: RalmResult) -> None:
    """A finished request's counts in the gateway's metrics (`metrics.py`)."""
    kind = "ralm" if request.knn is None else "knnlm"
    metrics.GATEWAY_TOKENS.labels(kind, "ralmspec" if request.spec else request.cfg.mode).inc(len(res.tokens))
    if request.spec is not None:
        metrics.observe_speculation(kind, request.spec.prefetch, res.stats)
    metrics.observe_drafts(request.cfg.draft, res.drafted, res.draft_accepted)


def gateway_service(controller: Controller, default_spec: SpecConfig, pool: RequestPool) -> ServiceDef:
    engine = controller.engine

    def reply(res: RalmResult) -> pb.GenerateReply:
        out = to_reply(res, engine.docs)
        out.request_id = tracing.current() or ""
        return out

    def admit(req: pb.GenerateRequest, call: Call) -> tuple[Request, Call]:
        """The request, and its call with `deadline_s` counted from now (when that comes before the client's)."""
        request = to_request(req, default_spec)
        return request, call.within(request.cfg.deadline_s)

    async def generate(req: pb.GenerateRequest, call: Call) -> pb.GenerateReply:
        request, call = admit(req, call)
        res = await pool.run(lambda: controller.run(request, None, call), call)
        observe(request, res)
        return reply(res)

    async def generate_stream(req: pb.GenerateRequest, call: Call) -> AsyncGenerator[pb.GenerateChunk, None]:
        request, call = admit(req, call)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[int] | None] = asyncio.Queue()

        def emit(tokens: list[int]) -> None:  # called on the controller's thread
            loop.call_soon_threadsafe(queue.put_nowait, list(tokens))

        run = asyncio.ensure_future(pool.run(lambda: controller.run(request, emit, call), call))
        run.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            tokens: list[int] = []
            text = ""
            while (chunk := await queue.get()) is not None:
                tokens += chunk
                full = engine.decode(tokens)
                delta = full[len(text):] if full.startswith(text) else full  # a multi-byte character completes late
                text = full
                yield pb.GenerateChunk(delta=pb.TokenDelta(token_ids=chunk, text=delta))
            res = await run
            observe(request, res)
        finally:
            if not run.done():  # the client went away: leave the queue (a running controller stops on its call)
                run.cancel()
        yield pb.GenerateChunk(done=reply(res))

    return GATEWAY.bind(Generate=generate, GenerateStream=generate_stream)
