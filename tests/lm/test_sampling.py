"""Exact sampling: the processed distribution, the rejection rule's exactness (pure maths), and on a tiny random
model the distribution of 3-token continuations, enumerated exactly, matched by drafted and by plain sampling
(chi-square), with wrong acceptance rules rejected by the same test; bad values answer INVALID_ARGUMENT."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from ralmspec.v1 import lm_pb2

import services.lm.sampling as sampling
from services.common.errors import InvalidRequest
from services.datastore.draft_tree import DraftTree
from services.gateway.backends import Backends, drafted_decode
from services.lm.decoder import Session
from services.lm.engine import LmEngine, StopSets
from services.lm.model import LoadedLM
from services.lm.sampling import acceptance, choose, probs, sample
from services.lm.tree_attention import tree_step
from services.lm.types import SamplingParams
from services.lm.wire import sampling_from_proto, sampling_to_proto

V = 12  # tiny vocabulary: the 3-token continuations can be enumerated
CTX = [1, 2, 3, 4]
LENGTH = 3  # tokens per sampled continuation
T, TOP_P = 1.3, 0.9  # temperature and nucleus of the statistical test (the cut removes tokens at every step)
N = 6000  # samples per method; ~10 s each on one thread
ALPHA = 1e-4  # chi-square test level; the samples are seeded, so the test is deterministic
Probs = dict[tuple[int, ...], float]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: a tiny model's forward is overhead-bound, and two threads spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm() -> LoadedLM:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=V, n_positions=64, bos_token_id=0,
                                  eos_token_id=0, initializer_range=0.3, tie_word_embeddings=False)
    return LoadedLM("tiny", transformers.GPT2LMHeadModel(cfg).eval(), None, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def engine(lm: LoadedLM) -> LmEngine:
    return LmEngine(lm, StopSets(frozenset(), frozenset()))  # no stop tokens: every continuation has LENGTH tokens


# ---- the processed distribution ----

def test_temperature() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    torch.testing.assert_close(probs(SamplingParams(1.0), logits), torch.softmax(logits.double(), -1))
    torch.testing.assert_close(probs(SamplingParams(0.5), logits), torch.softmax(2 * logits.double(), -1))
    hot = probs(SamplingParams(1e6), logits)
    torch.testing.assert_close(hot, torch.full((4,), 0.25, dtype=torch.float64), atol=1e-5, rtol=0)
    cold = probs(SamplingParams(1e-300), torch.tensor([0.0, 3.0, 3.0, -math.inf]))  # no NaN; ties share
    assert cold.tolist() == [0.0, 0.5, 0.5, 0.0]
    assert SamplingParams().greedy and not SamplingParams(0.1).greedy


def test_top_p() -> None:
    p = torch.tensor([0.1, 0.5, 0.25, 0.15], dtype=torch.float64)
    logits = p.log().float()
    cut = lambda top_p: probs(SamplingParams(1.0, top_p), logits).tolist()  # noqa: E731
    assert cut(1.0) == pytest.approx(p.tolist())
    assert cut(0.4) == pytest.approx([0, 1, 0, 0])  # the top token alone reaches 0.4
    assert cut(1e-9) == pytest.approx([0, 1, 0, 0])
    assert cut(0.6) == pytest.approx([0, 0.5 / 0.75, 0.25 / 0.75, 0])  # smallest set with mass >= 0.6
    assert cut(0.85) == pytest.approx([0, 0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9])
    assert cut(0.95) == pytest.approx(p.tolist())
    ties = probs(SamplingParams(1.0, 0.3), torch.zeros(4)).tolist()
    assert ties == [0.5, 0.5, 0.0, 0.0]  # equal masses: the lower token ids are kept, deterministically
    hot = probs(SamplingParams(4.0, 0.6), logits)  # temperature first, then the cut on the flattened distribution
    assert (hot > 0).sum() == 3 and float(hot.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("bad, message", [
    (SamplingParams(-1.0), "temperature must be a finite number >= 0"),
    (SamplingParams(math.nan), "temperature"), (SamplingParams(math.inf), "temperature"),
    (SamplingParams(1.0, 0.0), r"top_p must be in \(0, 1\]"), (SamplingParams(1.0, 1.5), "top_p"),
    (SamplingParams(1.0, math.nan), "top_p"), (SamplingParams(1.0, 1.0, -1), "seed"),
    (SamplingParams(1.0, 1.0, 1 << 64), "seed"),
])
def test_validate(bad: SamplingParams, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        bad.validate()
    ok = SamplingParams(0.7, 0.9, (1 << 64) - 1)
    assert ok.validate() is ok


# ---- the acceptance rule, exactly ----

def rule_distribution(p: torch.Tensor, children: Sequence[int]) -> torch.Tensor:
    """The output distribution of `choose` worked out from the rule's numbers: child i after i - 1 rejections,
    else the normalised residual."""
    odds, rest = acceptance(p, children)
    out = torch.zeros_like(p)
    reach = 1.0  # probability that the walk over the children gets this far
    for x, a in zip(children, odds):
        out[x] += reach * a
        reach *= 1 - a
    if float(rest.sum()) > 0:
        out += reach * rest / rest.sum()
    else:
        assert reach == 0  # nothing left to draw from: some child was sure to be accepted
    return out


@pytest.mark.parametrize("children", [[], [2], [0], [2, 0], [0, 2], [5, 0, 2], [3, 5, 1], [1, 2, 3, 4, 5, 0],
                                      [0, 1, 2, 3, 4, 5], [3, 1, 5]])
def test_rule_is_exact_for_every_child_order(children: list[int]) -> None:
    p = torch.tensor([0.05, 0.0, 0.6, 0.1, 0.0, 0.25], dtype=torch.float64)  # 1 and 4: cut by top-p, say
    torch.testing.assert_close(rule_distribution(p, children), p, atol=1e-15, rtol=0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=8).filter(lambda w: sum(w) > 1e-3), st.randoms())
def test_rule_is_exact_property(weights: list[float], rnd) -> None:  # type: ignore[no-untyped-def]
    p = torch.tensor(weights, dtype=torch.float64)
    p /= p.sum()
    children = rnd.sample(range(len(weights)), rnd.randint(0, len(weights)))
    torch.testing.assert_close(rule_distribution(p, children), p, atol=1e-12, rtol=0)
    assert choose(p, children, torch.Generator().manual_seed(rnd.randint(0, 99))) in {
        i for i, w in enumerate(p.tolist()) if w > 0}  # never a token of probability 0


# ---- the statistical test on a tiny model ----

def exact(lm: LoadedLM, params: SamplingParams) -> tuple[Probs, Probs]:
    """(P(continuation) of every LENGTH-token continuation with P > 0, the next-token distribution after every
    shorter positive prefix as {prefix + (token,): p}), from plain forwards, one prefix at a time."""
    s = Session(lm)
    full: Probs = {(): 1.0}
    step: Probs = {}
    for _ in range(LENGTH):
        grown: Probs = {}
        for prefix, mass in full.items():
            p = probs(params, s.logits_after(CTX + list(prefix))).tolist()
            for t, q in enumerate(p):
                if q > 0:
                    grown[prefix + (t,)] = mass * q
                step[prefix + (t,)] = q
        full = grown
    return full, step


class HandDrafts:
    """Trees drafted from the exact next-token distributions: at each node the two likeliest tokens, the
    least likely one still possible and one the nucleus cut (up to four children, in an order that varies by
    node); the likely ones get children of their own, down to the last sampled position."""

    def __init__(self, step: Probs) -> None:
        self.step = step

    def children(self, prefix: tuple[int, ...]) -> list[int]:
        ranked = sorted(range(V), key=lambda t: -self.step[prefix + (t,)])
        possible = [t for t in ranked if self.step[prefix + (t,)] > 0]
        kids = list(dict.fromkeys(ranked[:2] + possible[-1:] + ranked[-1:]))
        turn = (len(prefix) + sum(prefix)) % len(kids)
        return kids[turn:] + kids[:turn]

    def propose(self, kind: str, context: Sequence[int], budget: int) -> DraftTree:
        tokens: list[int] = []
        parents: list[int] = []

        def grow(prefix: tuple[int, ...], node: int) -> None:
            if len(prefix) >= LENGTH:
                return
            for t in self.children(prefix):
                tokens.append(t)
                parents.append(node)
                if self.step[prefix + (t,)] > 0.15:
                    grow(prefix + (t,), len(tokens) - 1)

        grow(tuple(context[len(CTX):]), -1)
        return DraftTree.from_arrays(np.array(tokens, dtype=np.int64), np.array(parents, dtype=np.int64))


def draw(engine: LmEngine, drafts: HandDrafts | None, n: int, seed: int = 0) -> tuple[Counter[tuple[int, ...]], int]:
    """n sampled continuations (one seeded request each) and the LM forwards spent, drafted or plain."""
    backends = Backends(engine, {}, None, None, drafts)  # type: ignore[arg-type]  # only lm and drafts are used
    sid = engine.open()
    counts: Counter[tuple[int, ...]] = Counter()
    forwards = 0
    for i in range(n):
        params = SamplingParams(T, TOP_P, seed + i)
        e = (engine.step(sid, CTX, LENGTH, False, sampling=params) if drafts is None
             else drafted_decode(backends, sid, CTX, LENGTH, False, "hand", 64, params))
        counts[tuple(e.tokens)] += 1
        forwards += e.forwards
    engine.close(sid)
    return counts, forwards


def chi_square(counts: Counter[tuple[int, ...]], probs: Probs) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom; cells merged, least likely first, until each bin expects
    at least 5. A sample outside the support fails at once."""
    n = sum(counts.values())
    assert set(counts) <= set(probs), f"impossible continuations drawn: {set(counts) - set(probs)}"
    bins: list[list[tuple[int, ...]]] = [[]]
    for k in sorted(probs, key=lambda k: probs[k]):
        if n * sum(probs[j] for j in bins[-1]) >= 5:
            bins.append([])
        bins[-1].append(k)
    if len(bins) > 1 and n * sum(probs[j] for j in bins[-1]) < 5:
        bins[-2] += bins.pop()
    stat = 0.0
    for b in bins:
        want = n * sum(probs[k] for k in b)
        stat += (sum(counts[k] for k in b) - want) ** 2 / want
    return stat, len(bins) - 1


def threshold(df: int, alpha: float = ALPHA) -> float:
    """The chi-square (1 - alpha) quantile by Wilson-Hilferty (within 1% for df >= 10)."""
    z = math.sqrt(2) * _erfinv(1 - 2 * alpha)  # the standard normal's (1 - alpha) quantile
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _erfinv(y: float) -> float:
    return float(torch.erfinv(torch.tensor(y, dtype=torch.float64)))


@pytest.fixture(scope="module")
def truth(lm: LoadedLM) -> tuple[Probs, Probs]:
    return exact(lm, SamplingParams(T, TOP_P))


def test_the_tiny_model_is_a_real_test(truth: tuple[Probs, Probs]) -> None:
    full, step = truth
    assert abs(sum(full.values()) - 1) < 1e-9
    cut = [p for p, q in step.items() if len(p) == 1 and q == 0]
    assert 0 < len(cut) < V - 2  # the nucleus removes some tokens, not all but two
    assert 30 <= len(full) and max(full.values()) < 0.5  # many continuations, none dominant
    tree = HandDrafts(step).propose("hand", CTX, 64)
    assert len(tree.tokens) >= 8 and max(tree.depth) >= 2


def test_drafted_and_plain_sampling_match_the_exact_distribution(engine: LmEngine, truth: tuple[Probs, Probs],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    full, step = truth
    for name, drafts in (("drafted", HandDrafts(step)), ("plain", None)):
        counts, forwards = draw(engine, drafts, N)
        stat, df = chi_square(counts, full)
        with capsys.disabled():
            print(f"\n{name} sampling: chi2 {stat:.1f}, df {df}, threshold {threshold(df):.1f} (alpha {ALPHA}), "
                  f"{N * LENGTH / forwards:.2f} tokens per forward")
        assert stat < threshold(df), f"{name} sampling: chi2 {stat:.1f} > {threshold(df):.1f} (df {df})"
        if drafts is not None:
            assert N * LENGTH / forwards > 1.5  # the drafts were accepted, not just verified


def threshold_acceptance(p: torch.Tensor, children: Sequence[int], gen: torch.Generator) -> int:
    """Typical acceptance (REST's and Medusa's sampling mode, simplified): a plausible child is taken outright."""
    return next((x for x in children if float(p[x]) >= 0.1), int(torch.multinomial(p, 1, generator=gen)))


def no_renormalising(p: torch.Tensor, children: Sequence[int], gen: torch.Generator) -> int:
    """The rule without renormalising after a rejection: later children come out too rarely."""
    rest = p.clone()
    for x in children:
        if float(torch.rand((), dtype=torch.float64, generator=gen)) < float(p[x]):
            return x
        rest[x] = 0
    return int(torch.multinomial(rest, 1, generator=gen))


@pytest.mark.parametrize("wrong", [threshold_acceptance, no_renormalising])
def test_the_test_rejects_wrong_rules(engine: LmEngine, truth: tuple[Probs, Probs], wrong,  # type: ignore[no-untyped-def]
                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    full, step = truth
    monkeypatch.setattr(sampling, "choose", wrong)
    counts, _ = draw(engine, HandDrafts(step), N // 4)
    stat, df = chi_square(counts, full)
    with capsys.disabled():
        print(f"\n{wrong.__name__} ({N // 4} samples): chi2 {stat:.1f}, df {df}, threshold {threshold(df):.1f}")
    assert stat > threshold(df)  # with a quarter of the samples


# ---- determinism, greedy unchanged, and the edge cases of the walk ----

def test_seeded_steps_replay_and_greedy_is_unchanged(lm: LoadedLM, engine: LmEngine,
                                                     truth: tuple[Probs, Probs]) -> None:
    drafts = HandDrafts(truth[1])
    tree = drafts.propose("hand", CTX, 64)
    params = SamplingParams(T, TOP_P, 7)
    first = tree_step(Session(lm), CTX, tree, max_new=4, sampling=params)
    again = tree_step(Session(lm), CTX, tree, max_new=4, sampling=params)  # a replay, on another session
    assert first.tokens == again.tokens and all(math.isnan(g) for g in first.gaps)
    seeds = {tuple(tree_step(Session(lm), CTX, tree, max_new=4, sampling=SamplingParams(T, TOP_P, s)).tokens)
             for s in range(20)}
    assert len(seeds) > 3
    # greedy: no sampling, temperature 0 and plain greedy decoding all give the same tokens and gaps
    ref = Session(lm).greedy(CTX, 4, frozenset())
    for how in (None, SamplingParams(), SamplingParams(0.0, 0.5, 3)):
        out = tree_step(Session(lm), CTX, tree, max_new=4, sampling=how)
        base = tree_step(Session(lm), CTX, tree, max_new=4)
        assert out.tokens == base.tokens == ref.tokens[: len(out.tokens)] and out.gaps == base.gaps
    # a nucleus this small keeps the argmax only: sampling, drafted or not, is greedy decoding
    sharp = SamplingParams(T, 1e-9, 1)
    backends = Backends(engine, {}, None, None, drafts)  # type: ignore[arg-type]
    sid = engine.open()
    assert engine.step(sid, CTX, 8, False, sampling=sharp).tokens == Session(lm).greedy(CTX, 8, frozenset()).tokens
    assert drafted_decode(backends, sid, CTX, 3, False, "hand", 64, sharp).tokens == ref.tokens[:3]
    engine.close(sid)


def test_sampled_stop_and_cap(lm: LoadedLM, truth: tuple[Probs, Probs]) -> None:
    tree = HandDrafts(truth[1]).propose("hand", CTX, 64)
    params = SamplingParams(T, TOP_P, 11)
    full = tree_step(Session(lm), CTX, tree, max_new=LENGTH, sampling=params)
    assert len(full.tokens) >= 2, "seed 11 was picked for an accepted node; pick another if the model changes"
    s = Session(lm)
    capped = tree_step(s, CTX, tree, max_new=1, sampling=params)
    assert capped.tokens == full.tokens[:1] and s.ids == CTX + capped.tokens  # the accepted node stays cached
    stopped = tree_step(Session(lm), CTX, tree, max_new=LENGTH, stop=frozenset(full.tokens[:1]), sampling=params)
    assert stopped.tokens == full.tokens[:1] and stopped.stopped


def test_sliding_window_fallback_samples_one_token() -> None:
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                        query_pre_attn_scalar=8, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention"],
                                        max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                                        initializer_range=0.3, tie_word_embeddings=False)
    gemma = LoadedLM("tiny", transformers.Gemma3ForCausalLM(cfg).eval(), None, torch.device("cpu"), torch.float32)
    ctx = list(range(3, 10))  # 7 tokens + 2 nodes reach the window (8): one plain sampled token instead
    params = SamplingParams(T, TOP_P, 5)
    e = tree_step(Session(gemma), ctx, np.array([3, 4]), np.array([-1, 0]), max_new=3, sampling=params)
    assert e.tokens == sample(Session(gemma), ctx, 1, frozenset(), params).tokens and math.isnan(e.gaps[0])


# ---- the wire ----

def test_wire_round_trip() -> None:
    for params in (SamplingParams(0.8, 0.95, 5), SamplingParams(1.5), SamplingParams(0.5, 1.0, (1 << 64) - 1)):
        assert sampling_from_proto(lm_pb2.StepRequest(**sampling_to_proto(params))) == params
    assert sampling_to_proto(SamplingParams()) == {} and sampling_from_proto(lm_pb2.StepRequest()) is None


@pytest.mark.asyncio
async def test_step_rejects_bad_sampling_over_grpc(lm_rpc: Callable[[str], Any]) -> None:
    sid = (await lm_rpc("OpenSession")(lm_pb2.OpenSessionRequest(), timeout=5)).session_id
    ok = await lm_rpc("Step")(lm_pb2.StepRequest(session_id=sid, tokens=CTX, max_new_tokens=3, temperature=T, top_p=0.9,
                                                 seed=3), timeout=5)
    assert len(ok.tokens) == 3 and all(math.isnan(g) for g in ok.gaps)
    for bad, message in ((dict(temperature=-1.0), "temperature must be a finite number >= 0"),
                         (dict(temperature=1.0, top_p=0.0), "top_p must be in (0, 1]")):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await lm_rpc("Step")(lm_pb2.StepRequest(session_id=sid, tokens=CTX, max_new_tokens=3, **bad), timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in (e.value.details() or "")
