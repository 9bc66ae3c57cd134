"""The replica's prefix cache: a shared prefix (BOS + document) loaded from the cache gives the same bits as one
computed, so a request's tokens do not depend on which requests filled the cache (alone vs batched with others
that share its documents); revisiting a document hits; the budget evicts least-recently-used; the paper
baseline (re-prefill) recomputes and leaves the cache alone; a bad prefix length is INVALID_ARGUMENT."""

from __future__ import annotations

import random
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from ralmspec.v1 import lm_pb2

from services.common.errors import InvalidRequest
from services.lm.continuous_batching import BatchLimits, Scheduler
from services.lm.engine import LmEngine, LmSettings
from services.lm.prefix_cache import PrefixCache


@pytest.fixture(scope="module")
def lm(engine):
    return engine.backends.lm.lm


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40_000) for _ in range(n)]


DOCS = [ids(150, 1), ids(200, 2)]  # two documents (the first token stands in for BOS)
QUESTIONS = [ids(40, 10 + i) for i in range(4)]


def identical(a, b) -> bool:
    return a.tokens == b.tokens and np.array_equal(a.gaps, b.gaps)


def test_lru_within_a_token_budget() -> None:
    t = torch.zeros(1, 1, 1)
    cache = PrefixCache(budget_tokens=5)
    cache.put((1, 2), ((t, t),))
    cache.put((3, 4), ((t, t),))
    assert cache.get((1, 2)) is not None  # (1, 2) is now the most recent
    cache.put((5, 6), ((t, t),))  # 6 tokens > 5: the least recently used, (3, 4), goes
    assert cache.get((3, 4)) is None and cache.get((1, 2)) is not None and cache.held == 4
    cache.put(tuple(range(9)), ((t, t),))  # larger than the whole budget: not kept
    assert len(cache) == 2 and cache.stats.evicted == 1 and (cache.stats.hits, cache.stats.misses) == (2, 1)


def test_a_cached_prefix_gives_the_bits_of_a_computed_one_and_revisits_hit(lm) -> None:
    eng = LmEngine(lm, settings=LmSettings(prefill_chunk=64))
    doc_a, doc_b, q = DOCS[0], DOCS[1], QUESTIONS[0]
    sid = eng.open()
    first = eng.step(sid, doc_a + q, 5, False, prefix=len(doc_a))  # computes A, caches it
    eng.step(sid, doc_b + q, 5, False, prefix=len(doc_b))  # B: computed
    again = eng.step(sid, doc_a + q, 5, False, prefix=len(doc_a))  # back to A: loaded
    assert identical(first, again) and again.fed == len(q) + 4  # the question and the decodes: A was loaded
    other = LmEngine(lm, settings=LmSettings(prefill_chunk=64))  # a cold cache: A computed there
    assert identical(first, other.step(other.open(), doc_a + q, 5, False, prefix=len(doc_a)))
    st = eng.prefixes.stats
    assert (st.hits, st.misses, st.tokens_reused) == (1, 2, len(doc_a))
    paper = eng.step(sid, doc_a + q, 5, False, reprefill=True, prefix=len(doc_a))  # recomputes, cache untouched
    assert identical(first, paper) and paper.fed == len(doc_a) + len(q) + 4 and eng.prefixes.stats.hits == 1


def test_tokens_do_not_depend_on_who_filled_the_cache(lm) -> None:
    """Each call alone on a cold engine vs all calls together in one batch on one engine, where the sessions
    sharing a document find it cached by their batch-mates (greedy, sampled and drafted steps)."""
    from services.lm.types import Draft, SamplingParams

    settings = LmSettings(prefill_chunk=64)
    shared = LmEngine(lm, settings=settings)
    jobs = []
    for i, q in enumerate(QUESTIONS * 2):
        doc = DOCS[i % 2]
        kind = ("greedy", "sampled", "tree")[i % 3]
        jobs.append((doc + q, len(doc), kind, i))

    def work(eng: LmEngine, sid: str, seq: list[int], prefix: int, kind: str, i: int) -> Any:
        if kind == "sampled":
            return eng.step_work(sid, seq, 4, False, sampling=SamplingParams(temperature=0.8, seed=i), prefix=prefix)
        if kind == "tree":
            tree = Draft(np.array([seq[-1], 17, 99]), np.array([-1, 0, 0]))
            return eng.step_work(sid, seq, 3, False, tree=tree, prefix=prefix)
        return eng.step_work(sid, seq, 4, False, prefix=prefix)

    def alone(seq: list[int], prefix: int, kind: str, i: int) -> Any:
        from services.lm.ragged import run

        eng = LmEngine(lm, settings=settings)
        return run(lm, work(eng, eng.open(), seq, prefix, kind, i))

    want = [alone(*j) for j in jobs]
    sched = Scheduler(lm, BatchLimits(max_batch_seqs=8, max_batch_tokens=256), shared.kv_held)
    try:
        got = []
        for wave in (jobs[:2], jobs[2:]):  # the second wave finds both documents cached by the first
            futures = []
            for j in wave:
                sid = shared.open()
                futures.append(sched.submit(sid, work(shared, sid, *j)))
            got += [f.result(timeout=300) for f in futures]
    finally:
        sched.close()
    for j, a, b in zip(jobs, want, got):
        assert a.tokens == b.tokens and np.array_equal(a.gaps, b.gaps, equal_nan=True), j[2:]
    assert shared.prefixes.stats.hits == len(jobs) - 2  # other sessions' documents really were reused


def test_bad_prefix_lengths_are_refused(lm) -> None:
    eng = LmEngine(lm)
    sid = eng.open()
    for bad in (-1, 3, 7):
        with pytest.raises(InvalidRequest, match="prefix_tokens"):
            eng.step_work(sid, [5, 6, 7], 2, False, prefix=bad)


@pytest.mark.asyncio
async def test_prefix_tokens_over_grpc(lm) -> None:
    from services.common.contracts import LM
    from services.common.grpc_server import start_server
    from services.lm.service import lm_service

    svc, batch = lm_service(LmEngine(lm), "ralmspec:lm:test")
    srv = await start_server([svc], port=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            def rpc(name: str) -> Any:
                op = LM.ops[name]
                return ch.unary_unary(LM.method(name), request_serializer=op.request.SerializeToString,
                                      response_deserializer=op.reply.FromString)

            sid = (await rpc("OpenSession")(lm_pb2.OpenSessionRequest(), timeout=5)).session_id
            seq = DOCS[0][:20] + QUESTIONS[0][:5]
            ok = await rpc("Step")(lm_pb2.StepRequest(session_id=sid, tokens=seq, max_new_tokens=2, prefix_tokens=20),
                                   timeout=30)
            assert len(ok.tokens) == 2
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await rpc("Step")(lm_pb2.StepRequest(session_id=sid, tokens=seq, max_new_tokens=2,
                                                     prefix_tokens=len(seq)), timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prefix_tokens" in (e.value.details() or "")
            stats = await rpc("Stats")(lm_pb2.StatsRequest(), timeout=5)
            assert stats.prefix_misses == 1 and stats.prefix_cached_tokens == 20
    finally:
        batch.close()
        await srv.stop(0)
