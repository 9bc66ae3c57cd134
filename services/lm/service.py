"""LM service: the LM engine's sessions behind the LmService contract (a thin adapter; no decoding logic).

Model calls run on one thread per replica, in arrival order: a replica's model serves one step at a time
(torch uses the cores inside a step), and a session's steps stay in the caller's order.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from ralmspec.v1 import lm_pb2 as pb

from services.common.contracts import LM
from services.common.errors import InvalidRequest
from services.common.ops import ServiceDef
from services.common.wire import vector_bytes
from services.lm.engine import LmEngine
from services.lm.wire import draft_from_proto, sampling_from_proto


def _sid(session_id: str) -> str:
    if not session_id:
        raise InvalidRequest("session_id is empty: call OpenSession first")
    return session_id


def lm_service(engine: LmEngine, replica_stream: str) -> tuple[ServiceDef, ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lm")

    async def open_session(req: pb.OpenSessionRequest) -> pb.OpenSessionReply:
        return pb.OpenSessionReply(session_id=engine.open(), replica_stream=replica_stream)

    async def step(req: pb.StepRequest) -> pb.StepReply:
        sid = _sid(req.session_id)
        engine.session(sid)  # NOT_FOUND before queueing behind other steps
        tree = draft_from_proto(req.draft) if req.HasField("draft") else None
        sampling = sampling_from_proto(req)  # INVALID_ARGUMENT before queueing, too
        e = await asyncio.get_running_loop().run_in_executor(
            pool, engine.step, sid, list(req.tokens), req.max_new_tokens, req.stop_at_newline, req.reprefill, tree,
            sampling)
        return pb.StepReply(tokens=e.tokens, gaps=e.gaps, stopped=e.stopped, forwards=e.forwards, fed=e.fed)

    async def state(req: pb.StateRequest) -> pb.StateReply:
        sid = _sid(req.session_id)
        engine.session(sid)
        hidden, logits = await asyncio.get_running_loop().run_in_executor(pool, engine.state, sid, list(req.tokens))
        return pb.StateReply(hidden=vector_bytes(hidden), logits=vector_bytes(logits.numpy()))

    async def close_session(req: pb.CloseSessionRequest) -> pb.CloseSessionReply:
        return pb.CloseSessionReply(existed=engine.close(_sid(req.session_id)))

    return LM.bind(OpenSession=open_session, Step=step, State=state, CloseSession=close_session), pool
