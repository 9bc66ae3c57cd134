"""The speculation cache ranks like the real retriever: when the real top-1 is cached, it is the cache's top-1."""

from __future__ import annotations

import random

import pytest

from services.datastore.speculation_cache import SpeculationCache


@pytest.mark.parametrize("retriever", ["exact", "sparse"])
def test_cached_real_top1_is_the_cache_top1(engine, questions, retriever):
    ret = engine.retriever(retriever)
    rng = random.Random(7)
    n_docs = len(engine.docs)
    checked = 0
    for q in questions[::173][:40]:
        key = ret.embed([q.question])[0]
        real = ret.search_embedded([key], 30)[0]
        if not real:
            continue
        cache = SpeculationCache(ret.score)
        # the real top-1, some close competitors, and random passages, in random order
        pids = [real[0].pid] + [h.pid for h in rng.sample(real[1:], 10)] + rng.sample(range(n_docs), 30)
        rng.shuffle(pids)
        cache.insert(pids)
        top = cache.lookup(key)[0]
        assert top.pid == real[0].pid
        assert top.score == real[0].score
        checked += 1
    assert checked >= 35


def test_cache_scores_equal_the_index_scores(engine, questions):
    ret = engine.retriever("sparse")
    for q in questions[:20]:
        hits = ret.search([q.question], 10)[0]
        assert ret.score(q.question, [h.pid for h in hits]) == [h.score for h in hits]


def test_insert_deduplicates_and_ignores_missing_documents():
    cache = SpeculationCache(lambda key, pids: [float(-p) for p in pids])
    assert cache.insert([3, 1, 3, -1, 2]) == 3 and len(cache) == 3 and 1 in cache
    assert [h.pid for h in cache.lookup("q", k=3)] == [1, 2, 3]
    assert SpeculationCache(lambda k, p: []).lookup("q") == []


def test_ties_go_to_the_lower_passage_id():
    cache = SpeculationCache(lambda key, pids: [1.0 for _ in pids])
    cache.insert([9, 4, 7])
    assert cache.lookup("q")[0].pid == 4
