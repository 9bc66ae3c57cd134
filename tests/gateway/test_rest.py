"""REST drafting never changes greedy output: on 60 RaLM prompts (passage + QA prompt) with drafts from the
corpus datastore and the context, and inside iterative RaLM with speculative retrieval on, every retriever."""

from __future__ import annotations

import pytest

from services.gateway.backends import drafted_decode
from services.gateway.prompts import qa_prompt
from services.gateway.ralm import RalmConfig
from services.gateway.ralmspec import PRESETS, SpeculativeRalm
from services.lm.decoder import Emitted

PROMPTS = 60
TOKENS = 12  # per prompt; 60 prompts keep this test near 3 minutes on 2 cores (AMD EPYC, AVX2)


def greedy_then_drafted(engine, seq: list[int], n: int, source: str, budget: int) -> tuple[Emitted, Emitted]:
    """Plain greedy decoding, then REST drafting on the same session: the session keeps its longest common prefix
    with the sequence, so the drafted run starts from the prompt's KV cache (one prefill per prompt)."""
    lm = engine.backends.lm
    sid = lm.open()
    try:
        return lm.step(sid, seq, n, False), drafted_decode(engine.backends, sid, seq, n, False, source, budget)
    finally:
        lm.close(sid)


@pytest.mark.slow
def test_rest_greedy_equals_greedy_on_60_prompts(engine, questions, same_tokens):
    exact = engine.retriever("exact")
    sources = ("both", "rest", "prompt")
    tokens = forwards = 0
    for i, q in enumerate(questions[:PROMPTS]):
        prompt = engine.encode(qa_prompt(q.question))
        pid = exact.search([engine.query(prompt, RalmConfig(), engine.query_floor(prompt))], 1)[0][0].pid
        seq = engine.bos + list(engine.doc_ids(pid, 256)) + prompt
        base, got = greedy_then_drafted(engine, seq, TOKENS, sources[i % 3], (4, 8, 8)[i % 3])
        same_tokens(base, got, f"REST prompt {i}")
        tokens += len(got.tokens)
        forwards += got.forwards
    assert tokens / forwards > 1.3, tokens / forwards  # the drafts were really accepted, not just verified


@pytest.mark.slow
@pytest.mark.parametrize("retriever", ["exact", "approx", "sparse"])
def test_drafting_inside_speculative_ralm_keeps_the_baseline_tokens(engine, questions, retriever, same_tokens):
    spec = SpeculativeRalm(engine)
    q = qa_prompt(questions[23].question)
    base = engine.generate(q, RalmConfig(max_new_tokens=16, stop_at_newline=False), retriever)
    for draft, preset in (("both", "+P"), ("prompt", "+PSA"), ("rest", "ralmspec")):
        cfg = RalmConfig(max_new_tokens=16, stop_at_newline=False, draft=draft, draft_budget=8)
        plain = engine.generate(q, cfg, retriever)
        if draft != "rest":  # the retrieved passage in the context is a rich draft source for a QA answer
            assert plain.lm_forwards < base.lm_forwards
        for got in (plain, spec.generate(q, cfg, PRESETS[preset], retriever)):
            if same_tokens(base, got, f"{retriever} {draft} {preset}"):
                assert got.doc_ids == base.doc_ids  # drafts never crossed a retrieval boundary
