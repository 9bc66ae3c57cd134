"""Speculative KNN-LM emits the baseline KNN-LM's tokens, on the real model and the real tiny datastore, over
prompts, k, λ, strides, every switch and both indexes (a hypothesis property); plus validation and the
perplexity of the interpolation."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.errors import InvalidRequest
from services.gateway.knn_generation import KnnRequest
from services.gateway.speculation import PRESETS, SpecConfig
from services.lm.knn_mixing import next_token
from services.lm.types import KnnLmConfig

TOKENS = 16


@pytest.fixture(scope="module")
def prompts(engine, knn_ds):
    """Openings of passages: half held out of the datastore, half inside it (where the cache guesses well)."""
    inside = sorted(set(int(t) for t in np.unique(knn_ds.text)))
    held = [i for i in range(len(engine.docs)) if i not in set(inside)]
    picks = held[:: max(1, len(held) // 6)][:6] + inside[:: max(1, len(inside) // 6)][:6]
    return [" ".join(engine.docs.document(i).split()[:14]) for i in picks]


@pytest.fixture(scope="module")
def baseline(knn, prompts):
    @cache
    def run(pi: int, k: int, lam: float, index: str):
        return knn.generate(prompts[pi], KnnRequest(TOKENS, knn=KnnLmConfig(k=k, lam=lam, index=index)))

    return run


@pytest.mark.slow
@pytest.mark.parametrize("index", ["exact", "approx"])
def test_every_preset_equals_the_baseline(knn, prompts, baseline, index, same_tokens):
    stats = []
    for pi in (0, 7):
        base = baseline(pi, 1024, 0.25, index)
        for name, preset in PRESETS.items():
            got = knn.speculate(prompts[pi], KnnRequest(TOKENS, knn=KnnLmConfig(index=index)), preset)
            same_tokens(base, got, f"knnlm {index} prompt {pi} {name}")
            assert got.stats["retrieval_calls"] <= len(base.tokens)  # batching never adds datastore searches
            stats.append(got.stats)
    assert any(s["rollbacks"] for s in stats), "no configuration ever rolled back: the test lost its teeth"
    assert any(s["mean_stride"] > 1 for s in stats)


@pytest.mark.slow
def test_property_speculation_never_changes_tokens(knn, prompts, baseline, same_tokens):
    rollbacks: list[int] = []  # per example

    @settings(max_examples=12, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(pi=st.integers(0, len(prompts) - 1), k=st.sampled_from([1, 8, 64, 1024]),
           lam=st.sampled_from([0.1, 0.25, 0.5, 0.9]), index=st.sampled_from(["exact", "approx"]),
           stride=st.integers(1, 6), prefetch=st.booleans(), os3=st.booleans(), asynchronous=st.booleans())
    def prop(pi, k, lam, index, stride, prefetch, os3, asynchronous):
        spec = SpecConfig(stride=stride, prefetch=prefetch, os3=os3, asynchronous=asynchronous)
        got = knn.speculate(prompts[pi], KnnRequest(TOKENS, knn=KnnLmConfig(k=k, lam=lam, index=index)), spec)
        same_tokens(baseline(pi, k, lam, index), got, f"knnlm {index} prompt {pi} k={k} λ={lam} {spec}")
        rollbacks.append(got.stats["rollbacks"])

    prop()
    assert sum(rollbacks) > 0, "no example rolled back: the equivalence was never checked across a repair"


def test_streamed_tokens_are_verified_tokens(knn, prompts, baseline, same_tokens):
    seen: list[int] = []
    got = knn.speculate(prompts[8], KnnRequest(TOKENS), PRESETS["+PSA"], emit=seen.extend)
    assert seen == got.tokens
    same_tokens(baseline(8, 1024, 0.25, "exact"), got, "knnlm stream")


def test_lambda_zero_is_the_plain_lm(knn, engine, prompts):
    got = knn.generate(prompts[0], KnnRequest(8, knn=KnnLmConfig(lam=0.0)))
    sid = engine.backends.lm.open()
    try:
        plain = engine.backends.lm.step(sid, knn.encode(prompts[0]), 8, False)
    finally:
        engine.backends.lm.close(sid)
    assert got.tokens == plain.tokens


def test_interpolation_aggregates_neighbours_by_token():
    import torch

    logits = torch.tensor([0.0, 0.0, 5.0])  # the LM alone says token 2
    dists = np.array([1.0, 1.0, 1.5], dtype=np.float32)
    tokens = np.array([0, 1, 0])  # two near neighbours vote for token 0
    assert next_token(logits, dists, tokens, KnnLmConfig(lam=0.25))[0] == 2
    assert next_token(logits, dists, tokens, KnnLmConfig(lam=0.99))[0] == 0
    assert next_token(logits, dists, np.array([-1, -1, -1]), KnnLmConfig(lam=0.99))[0] == 2  # padding ignored


@pytest.mark.parametrize("bad", [dict(k=0), dict(k=10**6), dict(lam=1.5), dict(lam=-0.1), dict(temperature=0.0),
                                 dict(index="hnsw")])
def test_bad_settings_are_rejected(knn, prompts, bad):
    with pytest.raises(InvalidRequest):
        knn.generate(prompts[0], KnnRequest(4, knn=KnnLmConfig(**bad)))


def test_empty_prompt_and_bad_lengths_are_rejected(knn, prompts):
    with pytest.raises(InvalidRequest, match="empty"):
        knn.generate("", KnnRequest(4))
    with pytest.raises(InvalidRequest):
        knn.speculate(prompts[0], KnnRequest(0), PRESETS["ralmspec"])
    with pytest.raises(InvalidRequest):
        knn.speculate(prompts[0], KnnRequest(4), SpecConfig(stride=0))


def test_perplexity_with_lambda_zero_is_the_lm_alone(knn, knn_ds, engine, prompts):
    from services.lm.knn_mixing import perplexity

    texts = [knn.encode(p) for p in prompts[:2]]
    p = perplexity(engine.backends.lm.lm, texts, knn_ds.search, knn_ds.values,
                   [KnnLmConfig(lam=0.0), KnnLmConfig(lam=0.25)])
    assert p.tokens == sum(len(t) - 1 for t in texts)
    assert p.knnlm[0] == pytest.approx(p.lm, rel=1e-9) and p.knnlm[1] != p.lm
    with pytest.raises(InvalidRequest):
        perplexity(engine.backends.lm.lm, texts, knn_ds.search, knn_ds.values, [KnnLmConfig(k=1), KnnLmConfig()])


def test_the_public_api_builds_knnlm_requests(engine, knn, prompts, same_tokens):
    from ralmspec.v1 import common_pb2 as cpb
    from ralmspec.v1 import gateway_pb2 as pb

    from services.common.errors import Unavailable
    from services.gateway.api import to_request
    from services.gateway.controller import Controller

    req = to_request(pb.GenerateRequest(prompt=prompts[3], max_new_tokens=8,
                                        knn=pb.Knn(k=64, lam=0.5, index=cpb.KNN_INDEX_APPROX)))
    assert req.knn == KnnRequest(8, knn=KnnLmConfig(k=64, lam=0.5, index="approx")) and req.spec is not None
    streamed: list[int] = []
    got = Controller(engine, knn=knn).run(req, emit=streamed.extend)
    assert streamed == got.tokens
    same_tokens(knn.generate(prompts[3], req.knn), got, "knnlm via the API")
    with pytest.raises(Unavailable, match="no KNN-LM"):
        Controller(engine).run(req)
    with pytest.raises(InvalidRequest, match="retriever do not apply"):
        to_request(pb.GenerateRequest(prompt="x", knn=pb.Knn(), retriever=cpb.RETRIEVER_KIND_EXACT))
