"""The KV-cached decoder on the real packaged model."""

from __future__ import annotations

import pytest
import torch

from services.lm.decoder import Session

PROMPT = "The Normans were the people who in the 10th and 11th centuries gave their name to"


@pytest.fixture(scope="module")
def lm(engine):
    return engine.backends.lm.lm


@pytest.fixture(scope="module")
def ids(engine):
    return engine.encode(PROMPT)


def full_recompute(lm, ids, n):
    ctx, out = list(ids), []
    with torch.inference_mode():
        for _ in range(n):
            tok = int(lm.model(torch.tensor([ctx])).logits[0, -1].argmax())
            out.append(tok)
            ctx.append(tok)
    return out


def test_cached_greedy_equals_full_recompute(lm, ids):
    e = Session(lm).greedy(ids, 24, frozenset())
    assert e.tokens == full_recompute(lm, ids, 24)
    assert len(e.gaps) == 24 and all(g >= 0 for g in e.gaps)
    assert e.forwards == 24  # one prefill + 23 single-token steps; the last token is fed lazily


def test_rollback_crops_the_cache_and_refeeds(lm, ids):
    s = Session(lm)
    first = s.greedy(ids, 16, frozenset())
    fed = s.fed_tokens
    # roll back to 8 generated tokens and continue: only the cut point is re-fed, not the prefix
    again = s.greedy(ids + first.tokens[:8], 8, frozenset())
    assert again.tokens == first.tokens[8:16]
    assert s.fed_tokens - fed <= 8
    assert len(s.ids) == len(ids) + 15


def test_kv_reuse_matches_reprefill(lm, ids):
    reuse, fresh = Session(lm), Session(lm)
    out_r, out_f = [], []
    for _ in range(5):
        out_r += reuse.greedy(ids + out_r, 4, frozenset()).tokens
        out_f += fresh.greedy(ids + out_f, 4, frozenset(), reuse=False).tokens
    assert out_r == out_f
    assert reuse.fed_tokens < fresh.fed_tokens


def test_same_logits_within_and_across_sessions(lm, ids):
    a = Session(lm).logits_after(ids)
    b = Session(lm).logits_after(ids)
    assert torch.equal(a, b)


def test_stop_token_ends_the_run(lm, ids):
    first = Session(lm).greedy(ids, 5, frozenset())
    e = Session(lm).greedy(ids, 5, frozenset([first.tokens[2]]))
    assert e.stopped and e.tokens == first.tokens[:3]


def test_empty_sequence_is_rejected(lm):
    with pytest.raises(ValueError, match="empty"):
        Session(lm).logits_after([])
