"""LM service: the LM engine's sessions behind the LmService contract (a thin adapter; no decoding logic).

Model calls go to the replica's continuous-batching scheduler (`continuous_batching.py`): one forward per tick
over the pending steps of all sessions. A session's calls still run in the caller's order.
"""

from __future__ import annotations

import asyncio

from ralmspec.v1 import lm_pb2 as pb

from services.common import metrics
from services.common.contracts import LM
from services.common.errors import InvalidRequest
from services.common.ops import Call, ServiceDef
from services.common.wire import vector_bytes
from services.lm.continuous_batching import Scheduler
from services.lm.engine import LmEngine
from services.lm.wire import draft_from_proto, sampling_from_proto


def _sid(session_id: str) -> str:
    if not session_id:
        raise InvalidRequest("session_id is empty: call OpenSession first")
    return session_id


def stats_reply(engine: LmEngine, batch: Scheduler) -> pb.StatsReply:
    """The replica's counters: the Stats RPC's reply, and what its metrics endpoint reads at each scrape."""
    st, lim, px = batch.stats, batch.limits, engine.prefixes
    return pb.StatsReply(forwards=st.forwards, rows=st.rows, tokens=st.tokens, refused=st.refused,
                         expired=st.expired, sessions=len(engine.sessions), kv_tokens=engine.kv_held(),
                         queued=batch.queued, max_batch_seqs=lim.max_batch_seqs,
                         max_batch_tokens=lim.max_batch_tokens, busy_s=st.busy_s,
                         prefix_hits=px.stats.hits, prefix_misses=px.stats.misses,
                         prefix_tokens_reused=px.stats.tokens_reused, prefix_cached_tokens=px.held)


def lm_service(engine: LmEngine, replica_stream: str) -> tuple[ServiceDef, Scheduler]:
    batch = Scheduler(engine.lm, engine.settings.batch, engine.kv_held, on_forward=metrics.observe_forward,
                      on_start=metrics.LM_QUEUE_WAIT.observe)

    async def open_session(req: pb.OpenSessionRequest) -> pb.OpenSessionReply:
        return pb.OpenSessionReply(session_id=engine.open(), replica_stream=replica_stream)

    async def step(req: pb.StepRequest, call: Call) -> pb.StepReply:
        sid = _sid(req.session_id)
        tree = draft_from_proto(req.draft) if req.HasField("draft") else None
        sampling = sampling_from_proto(req)
        seq = list(req.tokens)
        # every check (and NOT_FOUND) happens here, before the call queues
        work = engine.step_work(sid, seq, req.max_new_tokens, req.stop_at_newline, req.reprefill, tree, sampling,
                                req.prefix_tokens)
        need = engine.kv_need(sid, seq, req.max_new_tokens, 0 if tree is None else len(tree.tokens))
        e = await asyncio.wrap_future(batch.submit(sid, work, need, call.deadline, call.cancelled))
        metrics.LM_GENERATED.inc(len(e.tokens))
        return pb.StepReply(tokens=e.tokens, gaps=e.gaps, stopped=e.stopped, forwards=e.forwards, fed=e.fed)

    async def state(req: pb.StateRequest, call: Call) -> pb.StateReply:
        sid = _sid(req.session_id)
        seq = list(req.tokens)
        work = engine.state_work(sid, seq)
        need = engine.kv_need(sid, seq, 1)
        hidden, logits = await asyncio.wrap_future(batch.submit(sid, work, need, call.deadline, call.cancelled))
        return pb.StateReply(hidden=vector_bytes(hidden), logits=vector_bytes(logits.numpy()))

    async def close_session(req: pb.CloseSessionRequest) -> pb.CloseSessionReply:
        return pb.CloseSessionReply(existed=engine.close(_sid(req.session_id)))

    async def stats(req: pb.StatsRequest) -> pb.StatsReply:
        return stats_reply(engine, batch)

    return LM.bind(OpenSession=open_session, Step=step, State=state, CloseSession=close_session, Stats=stats), batch
