"""LM sessions expire when idle (a gateway that died never closes its own): an expired session answers NOT_FOUND
saying so, an active one survives, and a full replica drops its idle sessions before refusing an open. A fake
clock; a one-layer random GPT-2 (no assets)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
import torch
import transformers
from ralmspec.v1 import lm_pb2

from services.common.errors import NotFound, Overloaded
from services.lm.engine import LmEngine, LmSettings, StopSets
from services.lm.model import LoadedLM

IDLE_S = 10.0
CTX = [1, 2, 3]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def lm() -> LoadedLM:
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=12, n_positions=64)
    return LoadedLM("tiny", transformers.GPT2LMHeadModel(cfg).eval(), None, torch.device("cpu"), torch.float32)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engine(lm: LoadedLM, clock: Clock) -> LmEngine:
    return LmEngine(lm, StopSets(frozenset(), frozenset()), LmSettings(max_sessions=2, session_idle_s=IDLE_S), clock)


def test_an_idle_session_expires_and_an_active_one_survives(engine: LmEngine, clock: Clock) -> None:
    active, idle = engine.open(), engine.open()
    for _ in range(3):  # 3 x 6 s: `active` is used every 6 s, `idle` not since it was opened
        clock.now += 0.6 * IDLE_S
        assert len(engine.step(active, CTX, 2, False).tokens) == 2
    with pytest.raises(NotFound, match=rf"LM session '{idle}' expired after 10 s unused; open a new one"):
        engine.step(idle, CTX, 2, False)
    assert not engine.close(idle) and engine.close(active)
    with pytest.raises(NotFound, match="no LM session"):  # closed is not expired
        engine.session(active)


def test_a_full_replica_expires_idle_sessions_before_refusing(engine: LmEngine, clock: Clock) -> None:
    first = engine.open()
    clock.now += 0.6 * IDLE_S
    second = engine.open()
    with pytest.raises(Overloaded, match="holds 2 LM sessions"):  # both in use
        engine.open()
    clock.now += 0.6 * IDLE_S  # `first` is idle past IDLE_S, `second` is not
    third = engine.open()
    assert len(engine.sessions) == 2
    engine.session(second), engine.session(third)
    with pytest.raises(NotFound, match="expired"):
        engine.session(first)


def test_the_idle_time_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RALMSPEC_LM_SESSION_IDLE_S", "42.5")
    assert LmSettings.from_env().session_idle_s == 42.5
    monkeypatch.delenv("RALMSPEC_LM_SESSION_IDLE_S")
    assert LmSettings.from_env() == LmSettings()


@pytest.mark.asyncio
async def test_an_expired_session_is_not_found_over_grpc(lm_rpc: Callable[[str], Any], clock: Clock) -> None:
    active, idle = [(await lm_rpc("OpenSession")(lm_pb2.OpenSessionRequest(), timeout=5)).session_id for _ in range(2)]
    clock.now += 0.6 * IDLE_S
    await lm_rpc("Step")(lm_pb2.StepRequest(session_id=active, tokens=CTX, max_new_tokens=1), timeout=5)
    clock.now += 0.6 * IDLE_S
    for op, req in (("Step", lm_pb2.StepRequest(session_id=idle, tokens=CTX, max_new_tokens=1)),
                    ("State", lm_pb2.StateRequest(session_id=idle, tokens=CTX))):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await lm_rpc(op)(req, timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert e.value.details() == f"LM session '{idle}' expired after 10 s unused; open a new one"
    reply = await lm_rpc("Step")(lm_pb2.StepRequest(session_id=active, tokens=CTX, max_new_tokens=1), timeout=5)
    assert len(reply.tokens) == 1


def test_batch_invariance_is_a_setting(lm: LoadedLM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RALMSPEC_BATCH_INVARIANT", "0")
    assert LmSettings.from_env().batch_invariant is False
    stops = StopSets(frozenset(), frozenset())
    try:
        plain = LmEngine(lm, stops, LmSettings(batch_invariant=False))  # the BLAS library's own kernels
        assert lm.batch_invariant is False
        assert len(plain.step(plain.open(), CTX, 4, False).tokens) == 4
    finally:
        LmEngine(lm, stops, LmSettings())  # the module's model goes back to the invariant kernels
    assert lm.batch_invariant is True
