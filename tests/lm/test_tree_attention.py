"""Tree verification: the one-forward tree logits equal sequential forwards, and tree decoding equals greedy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers

from services.lm.decoder import Emitted, Session
from services.lm.model import LoadedLM
from services.lm.ragged import run
from services.lm.tree_attention import tree_logits_work, tree_mask, tree_step

Tree = tuple[np.ndarray, np.ndarray]  # tokens [n], parents [n]
Draft = Callable[[np.random.Generator, list[int]], Tree]  # (rng, true continuation from here) -> tree

PROMPTS = [
    "The Normans were the people who in the 10th and 11th centuries gave their name to",
    "Photosynthesis is the process by which plants",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "The capital of France is",
    "Question: Who wrote Pride and Prejudice?\nAnswer:",
    "Once upon a time, in a small village by the sea,",
    "The mitochondria is known as the",
    "In 1969, Neil Armstrong became the first person to",
    "To make a cup of tea, first boil",
    "The three primary colors are",
    "import numpy as np\n\nx = np.",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread(engine):
    """One intra-op thread for this module: on two cores shared with other jobs, two threads spin against each
    other (a real-model step measured 55 ms on one thread, 160-580 ms on two; tiny models 0.7 vs 5 ms). The engine
    opens first because its faiss index sets the OpenMP threads torch shares; that setting is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_lm(model: torch.nn.Module) -> LoadedLM:
    return LoadedLM("tiny", model.eval(), None, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def gpt2() -> LoadedLM:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=256,
                                  bos_token_id=0, eos_token_id=0, initializer_range=0.1,
                                  tie_word_embeddings=False)  # untied: greedy does not just repeat the context
    return tiny_lm(transformers.GPT2LMHeadModel(cfg))


@pytest.fixture(scope="module")
def gemma() -> LoadedLM:
    """Tiny Gemma 3: one sliding-window layer (window 24), one full layer."""
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                        query_pre_attn_scalar=16, sliding_window=24,
                                        layer_types=["sliding_attention", "full_attention"],
                                        max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                                        initializer_range=0.1, tie_word_embeddings=False)
    return tiny_lm(transformers.Gemma3ForCausalLM(cfg))


@pytest.fixture(scope="module")
def real(engine) -> LoadedLM:
    return engine.backends.lm.lm


def vocab(lm: LoadedLM) -> int:
    return int(lm.model.config.vocab_size)  # type: ignore[attr-defined]


def grow(rng: np.random.Generator, n: int, v: int, path: Sequence[int] = (), avoid: int | None = None) -> Tree:
    """n nodes: `path` as a chain from the root, interleaved with random nodes that never duplicate a path token;
    no child of the root carries `avoid`."""
    tokens: list[int] = []
    parents: list[int] = []
    chain, k = -1, 0
    while len(tokens) < n:
        if k < len(path) and (rng.random() < 0.5 or n - len(tokens) <= len(path) - k):
            tokens.append(int(path[k]))
            parents.append(chain)
            chain, k = len(tokens) - 1, k + 1
            continue
        p, t = int(rng.integers(-1, len(tokens))), int(rng.integers(v))
        while t in path or (p == -1 and t == avoid):
            t = (t + 1) % v
        tokens.append(t)
        parents.append(p)
    return np.array(tokens, dtype=np.int64), np.array(parents, dtype=np.int64)


def root_path(tokens: np.ndarray, parents: np.ndarray, i: int) -> list[int]:
    out = []
    while i >= 0:
        out.append(int(tokens[i]))
        i = int(parents[i])
    return out[::-1]


def drafts(v: int, n: int = 12) -> dict[str, Draft]:
    """Tree makers: the true path (1-7 tokens) among random branches; a true prefix then a wrong token;
    random branches only (no root child is the true next token); no tree at all."""

    def truth(rng: np.random.Generator, ref: list[int]) -> Tree:
        return grow(rng, n, v, ref[: int(rng.integers(1, 8))])

    def mixed(rng: np.random.Generator, ref: list[int]) -> Tree:
        j = int(rng.integers(0, 4))
        return grow(rng, n, v, ref[:j] + [(ref[j] if j < len(ref) else 0) ^ 1])

    def wrong(rng: np.random.Generator, ref: list[int]) -> Tree:
        return grow(rng, n, v, avoid=ref[0] if ref else None)

    def empty(rng: np.random.Generator, ref: list[int]) -> Tree:
        return grow(rng, 0, v)

    return {"truth": truth, "mixed": mixed, "wrong": wrong, "empty": empty}


def tree_decode(session: Session, ctx: list[int], total: int, ref: list[int], draft: Draft, seed: int,
                cap: int = 1 << 30, stop: frozenset[int] = frozenset()) -> tuple[list[int], list[float], int]:
    """Tree steps until `total` tokens (or a stop); trees are drafted from the reference continuation `ref`."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    gaps: list[float] = []
    steps = 0
    while len(out) < total:
        tok, par = draft(rng, ref[len(out):])
        e = tree_step(session, ctx + out, tok, par, min(cap, total - len(out)), stop)
        assert 1 <= len(e.tokens) <= min(cap, total - len(out)) and e.forwards <= 1
        assert session.ids == (ctx + out + e.tokens)[: len(session.ids)]  # cache = context + accepted nodes
        out += e.tokens
        gaps += e.gaps
        steps += 1
        if e.stopped:
            break
    return out, gaps, steps


def sequential(lm: LoadedLM, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(torch.tensor([ids])).logits[0, -1].float()


def check_tree_logits(lm: LoadedLM, ctx: list[int], tree: Tree, cached: list[int], atol: float) -> None:
    s = Session(lm)
    if cached:
        s.logits_after(cached)  # part of (or a detour from) ctx is already cached
    root, nodes = run(lm, tree_logits_work(s, ctx, *tree))
    torch.testing.assert_close(root, sequential(lm, ctx), atol=atol, rtol=0)
    assert nodes.shape[0] == len(tree[0])
    for i in range(len(tree[0])):
        torch.testing.assert_close(nodes[i], sequential(lm, ctx + root_path(*tree, i)), atol=atol, rtol=0)


def test_mask_pattern() -> None:
    # past 2 cached, tail 1 uncached, nodes: 0 (root child), 1 (child of 0), 2 (root child)
    mask = tree_mask(2, 1, np.array([-1, 0, -1]))
    assert mask.shape == (4, 6) and mask.dtype == torch.bool
    assert mask.int().tolist() == [[1, 1, 1, 0, 0, 0],
                                   [1, 1, 1, 1, 0, 0],
                                   [1, 1, 1, 1, 1, 0],
                                   [1, 1, 1, 0, 0, 1]]


@pytest.mark.parametrize("seed", range(6))
def test_tree_logits_equal_sequential_tiny(gpt2, gemma, seed) -> None:
    rng = np.random.default_rng(seed)
    for lm in (gpt2, gemma):
        ctx = rng.integers(vocab(lm), size=int(rng.integers(1, 8))).tolist()
        tree = grow(rng, int(rng.integers(1, 14)), vocab(lm))
        cached = [[], ctx, ctx[: len(ctx) // 2], ctx[:-1] + [(ctx[-1] + 1) % vocab(lm), 5]][seed % 4]
        check_tree_logits(lm, ctx, tree, cached, atol=1e-5)


@pytest.mark.parametrize("kind", ["truth", "mixed", "wrong", "empty"])
@pytest.mark.parametrize("model", ["gpt2", "gemma"])
def test_tree_decoding_equals_greedy_tiny(request, model, kind) -> None:
    lm: LoadedLM = request.getfixturevalue(model)
    ctx = np.random.default_rng(7).integers(vocab(lm), size=5).tolist()
    ref = Session(lm).greedy(ctx, 60, frozenset())  # gemma: crosses its window (24) -> greedy fallback
    s = Session(lm)
    out, gaps, steps = tree_decode(s, ctx, 40, ref.tokens, drafts(vocab(lm))[kind], seed=1)
    assert out == ref.tokens[:40]
    if kind == "truth" and model == "gpt2":  # (gemma falls back to plain steps past its window)
        assert steps <= 20  # several tokens per forward
    # the compacted cache serves plain greedy decoding on
    assert s.greedy(ctx + out, 20, frozenset()).tokens == ref.tokens[40:]


def test_compacted_cache_equals_fresh_prefill(gpt2) -> None:
    ctx = list(range(10, 20))
    ref = Session(gpt2).greedy(ctx, 16, frozenset()).tokens
    s = Session(gpt2)
    rng = np.random.default_rng(3)
    e = tree_step(s, ctx, *grow(rng, 16, 97, ref[:5]), max_new=12)
    assert len(e.tokens) >= 6 and e.tokens == ref[: len(e.tokens)]  # >= 5 accepted nodes + the bonus
    assert s.ids == ctx + e.tokens[:-1]
    fresh = Session(gpt2)
    fresh.logits_after(s.ids)
    n = s.store.length
    assert n == fresh.store.length == len(s.ids) and torch.equal(s.store.pos, fresh.store.pos)
    for mine, theirs in zip(s.store.k + s.store.v, fresh.store.k + fresh.store.v):
        torch.testing.assert_close(mine[:, :n], theirs[:, :n], atol=1e-6, rtol=0)  # type: ignore[index]
    torch.testing.assert_close(s.last, fresh.last, atol=1e-5, rtol=0)
    at, before = len(e.tokens), s.forwards
    nxt = tree_step(s, ctx + e.tokens, *grow(rng, 8, 97, ref[at : at + 3]), max_new=4)
    assert nxt.tokens == ref[at : at + 4] and s.forwards - before == 1 and nxt.fed == 1 + 8  # bonus + nodes


def test_max_new_and_stop(gpt2) -> None:
    ctx = list(range(30, 36))
    ref = Session(gpt2).greedy(ctx, 12, frozenset()).tokens
    s = Session(gpt2)
    tree = grow(np.random.default_rng(0), 10, 97, ref[:8])
    e = tree_step(s, ctx, *tree, max_new=3)
    assert e.tokens == ref[:3] and not e.stopped and s.ids == ctx + ref[:3]  # the 3rd token is a node: cached
    before = s.forwards
    assert int(s.logits_after(ctx + ref[:3]).argmax()) == ref[3] and s.forwards == before  # no refeed
    stops = [at for at in (0, 3, 6, 8) if ref[at] not in ref[:at]]  # 8: the stop token is the bonus
    assert len(stops) >= 2
    for at in stops:
        s = Session(gpt2)
        e = tree_step(s, ctx, *tree, max_new=12, stop=frozenset([ref[at]]))
        assert e.stopped and e.tokens == ref[: at + 1] and s.ids == ctx + ref[:at]
    z = tree_step(Session(gpt2), ctx, *tree, max_new=0)
    assert z.tokens == [] and z.forwards == 0


def test_empty_tree_is_a_plain_step(gpt2) -> None:
    ctx = [1, 2, 3]
    s = Session(gpt2)
    e = tree_step(s, ctx, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), max_new=4)
    assert e.tokens == Session(gpt2).greedy(ctx, 1, frozenset()).tokens and e.forwards == 1
    assert s.ids == ctx


def test_tree_object_and_bad_trees(gpt2) -> None:
    ctx = [4, 5, 6]
    ref = Session(gpt2).greedy(ctx, 3, frozenset()).tokens
    tree = SimpleNamespace(tokens=np.array([9, ref[0], ref[1]]), parents=np.array([-1, -1, 1]),
                           depth=np.array([1, 1, 2]))
    assert tree_step(Session(gpt2), ctx, tree, max_new=3).tokens == ref
    with pytest.raises(ValueError, match="earlier node"):
        tree_step(Session(gpt2), ctx, np.array([7, 8]), np.array([1, -1]))
    with pytest.raises(ValueError, match="one parent per token"):
        tree_step(Session(gpt2), ctx, np.array([7, 8]), np.array([-1]))


def test_tree_logits_equal_sequential_real(real, engine) -> None:
    ctx = engine.encode(PROMPTS[0])
    ref = Session(real).greedy(ctx, 4, frozenset()).tokens
    rng = np.random.default_rng(0)
    check_tree_logits(real, ctx, grow(rng, 8, vocab(real), ref[:3]), ctx[:-2], atol=1e-4)


def test_tree_decoding_equals_greedy_real(real, engine, same_tokens) -> None:
    total, more = 10, 2
    kinds = list(drafts(vocab(real)).items())
    steps = 0
    for p, prompt in enumerate(PROMPTS):
        ctx = engine.encode(prompt)
        ref = Session(real).greedy(ctx, total + more, frozenset())
        kind, draft = kinds[p % len(kinds)]
        cap = 3 if p % 3 == 2 else 1 << 30
        at = next((i for i in range(3, total) if ref.tokens[i] not in ref.tokens[:i]), None) if p % 5 == 4 else None
        stop = frozenset() if at is None else frozenset([ref.tokens[at]])
        s = Session(real)
        out, gaps, n = tree_decode(s, ctx, total, ref.tokens, draft, seed=p, cap=cap, stop=stop)
        steps += n
        want = ref.tokens[: total if at is None else at + 1]
        if not same_tokens(Emitted(want, ref.gaps), Emitted(out, gaps), f"tree decoding, prompt {p} ({kind})"):
            continue
        if not stop:  # the compacted cache serves plain greedy decoding on
            on = s.greedy(ctx + out, more, frozenset())
            same_tokens(Emitted(ref.tokens[total:], ref.gaps[total:]), on, f"greedy after tree decoding, prompt {p}")
    assert steps < len(PROMPTS) * total  # the truth/mixed trees saved forwards
