"""Baseline iterative RaLM on the real model and the real tiny indexes."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import pytest

from services.common.errors import DeadlineExceeded, InvalidRequest
from services.gateway.prompts import qa_prompt
from services.gateway.ralm import RalmConfig, RalmEngine

LONG = dict(max_new_tokens=24, stop_at_newline=False)  # several strides, so documents change mid-answer


@pytest.mark.slow
@pytest.mark.parametrize("retriever,n", [("exact", 8), ("approx", 6), ("sparse", 6)])
def test_paper_and_kv_reuse_emit_identical_tokens(engine, questions, retriever, n, same_tokens):
    changed = 0
    for q in questions[::211][:n]:
        kv = engine.generate(qa_prompt(q.question), RalmConfig(mode="kv-reuse", **LONG), retriever)
        paper = engine.generate(qa_prompt(q.question), RalmConfig(mode="paper", **LONG), retriever)
        same_tokens(paper, kv, f"{retriever} {q.id}")
        assert kv.retrievals == paper.retrievals == len(kv.doc_ids) == -(-len(kv.tokens) // 4)
        # the same steps; the paper re-prefills longer sequences, and past a 128-token chunk that takes more forwards
        assert kv.lm_forwards <= paper.lm_forwards
        changed += len(set(kv.doc_ids)) > 1
    assert changed > 0  # the document did change inside some answers: reuse was really exercised


def test_kv_reuse_feeds_fewer_tokens_than_paper(engine, questions):
    q = qa_prompt(questions[0].question)
    fed = {mode: engine.generate(q, RalmConfig(mode=mode, **LONG), "exact").lm_fed_tokens
           for mode in ("paper", "kv-reuse")}
    assert 0 < fed["kv-reuse"] < fed["paper"]


def test_lm_only_replays_the_documents_without_retrieval(engine, questions, same_tokens):
    q = qa_prompt(questions[5].question)
    kv = engine.generate(q, RalmConfig(mode="kv-reuse", **LONG), "exact")
    lm_only = engine.generate(q, RalmConfig(mode="lm-only", **LONG), schedule=kv.doc_ids)
    same_tokens(kv, lm_only, "lm-only")
    assert lm_only.retrievals == 0 and lm_only.retrieval_s == 0.0


def test_qa_answer_stops_at_newline(engine, questions):
    r = engine.generate(qa_prompt(questions[0].question), RalmConfig(), "exact")
    assert len(r.tokens) < 128 and "\n" not in r.text
    assert r.tokens[-1] in engine.stops(RalmConfig())


def test_no_retrieval_mode(engine, questions):
    r = engine.generate(qa_prompt(questions[0].question), RalmConfig(mode="no-retrieval"))
    assert r.retrievals == 0 and r.doc_ids == [] and r.tokens


def test_deterministic_within_a_process(engine, questions):
    q = qa_prompt(questions[3].question)
    a = engine.generate(q, RalmConfig(**LONG), "exact")
    b = engine.generate(q, RalmConfig(**LONG), "exact")
    assert a.tokens == b.tokens and a.doc_ids == b.doc_ids and a.gaps == b.gaps


class _SlowSearch:
    """A retriever whose searches take `pause_s` (else the real one)."""

    def __init__(self, retriever: Any, pause_s: float) -> None:
        self.retriever, self.pause_s = retriever, pause_s

    def search(self, *args: Any, **kw: Any) -> Any:
        time.sleep(self.pause_s)
        return self.retriever.search(*args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.retriever, name)


class _CountingLm:
    def __init__(self, lm: Any) -> None:
        self.lm, self.steps = lm, 0

    def step(self, *args: Any, **kw: Any) -> Any:
        self.steps += 1
        return self.lm.step(*args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.lm, name)


def test_an_answer_within_its_first_stride_still_meets_deadline_s(engine, questions):
    """The deadline is checked after the retrieval, before the stride's LM step (it was checked only between
    strides, so a one-stride answer finished however long its retrieval took)."""
    lm = _CountingLm(engine.backends.lm)
    slow = {name: _SlowSearch(r, 0.3) for name, r in engine.backends.retrievers.items()}
    ralm = RalmEngine(engine.tok, engine.max_positions, engine.docs,
                      replace(engine.backends, lm=lm, retrievers=slow), engine.stop_sets)
    cfg = RalmConfig(max_new_tokens=4, stride=4, deadline_s=0.1)
    with pytest.raises(DeadlineExceeded, match="0.1 s deadline"):
        ralm.generate(qa_prompt(questions[0].question), cfg, "exact")
    assert lm.steps == 0


def test_bad_input_gets_a_clear_error(engine):
    with pytest.raises(InvalidRequest, match="question is empty"):
        qa_prompt("   ")
    with pytest.raises(InvalidRequest, match="unknown retriever 'bogus'"):
        engine.generate(qa_prompt("Who?"), RalmConfig(), "bogus")
    with pytest.raises(InvalidRequest, match="over the limit"):
        engine.generate("word " * 3000, RalmConfig(), "exact")
    with pytest.raises(InvalidRequest, match=r"stride must be in 1\.\.64, got 0"):
        engine.generate(qa_prompt("Who?"), RalmConfig(stride=0), "exact")
    with pytest.raises(InvalidRequest, match="unknown mode"):
        engine.generate(qa_prompt("Who?"), RalmConfig(mode="fast"), "exact")
    with pytest.raises(InvalidRequest, match="k must be a positive"):
        engine.retriever("exact").search(["who?"], 0)
    with pytest.raises(InvalidRequest, match="k must be a positive"):
        engine.retriever("sparse").search(["who?"], 0)
    with pytest.raises(InvalidRequest, match="query 0 is empty"):
        engine.retriever("exact").search([" "], 1)


def test_queries_never_reach_back_past_the_prompts_last_blank_line(engine, questions):
    # the QA prompt's shots sit above its last blank line: the first query is the question alone
    q = questions[0].question
    ids = engine.encode(qa_prompt(q))
    floor = engine.query_floor(ids)
    assert engine.query(ids, RalmConfig(), floor) == f"Question: {q.strip()}\nAnswer:"
    more = ids + engine.encode(" Paris is the capital of France and a city of many museums and old bridges") * 3
    assert engine.query(more, RalmConfig(query_tokens=8), floor) == engine.decode(more[-8:])  # later: the last 8
    plain = engine.encode("Once upon a time there was")
    assert engine.query_floor(plain) == 0
    ends_blank = engine.encode("Some text\n\n")
    assert engine.query(ends_blank, RalmConfig(), engine.query_floor(ends_blank))  # never an empty query
