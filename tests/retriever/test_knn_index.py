"""KNN-LM datastore: keys are the unbatched final hidden states, layout and successors respect passages, search
equals brute force (and is batch-independent), the build resumes after an interruption."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
import pytest
import torch
import transformers

from services.common.errors import InvalidRequest, Unavailable
from services.lm.model import LoadedLM
from services.retriever import knn_build
from services.retriever.knn_build import build
from services.retriever.knn_index import FORMAT_VERSION, KnnDatastore, exact_distances

VOCAB = 97


class WordTokenizer:
    """One id per whitespace-separated word (a fixed vocabulary of 'w0'..'w96'); no special tokens exist."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        assert add_special_tokens is False  # the decoder tokenizes prompts without them
        return SimpleNamespace(input_ids=[int(w[1:]) for w in text.split()])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forwards on one intra-op thread: on two shared cores a second thread mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   initializer_range=0.1, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def _texts(seed: int, n: int, max_words: int) -> list[str]:
    rng = random.Random(seed)
    texts = [" ".join(f"w{rng.randrange(VOCAB)}" for _ in range(rng.randrange(max_words + 1))) for _ in range(n)]
    texts[3] = "w5"  # one token: no entry
    texts[4] = texts[5]  # a duplicate passage: identical keys, ties broken by entry id
    return texts


@pytest.fixture(scope="module")
def built(model, tmp_path_factory) -> tuple[Path, list[str], dict]:
    texts = _texts(0, 40, 30)
    folder = tmp_path_factory.mktemp("knn")
    stats = build((model, WordTokenizer()), texts, folder, batch_tokens=64, max_len=24, progress=False)
    return folder, texts, stats


@pytest.fixture(scope="module")
def store(built) -> KnnDatastore:
    return KnnDatastore.load(built[0])


def _single_hidden(model, ids: list[int]) -> np.ndarray:
    with torch.inference_mode():
        out = model(torch.tensor([ids]), output_hidden_states=True)
        h = out.hidden_states[-1][0]
        torch.testing.assert_close(model.lm_head(h), out.logits[0])  # the state the LM head reads
    return h.numpy()


def test_keys_values_text_equal_unbatched(model, built, store):
    _, texts, stats = built
    tok = WordTokenizer()
    i = 0
    for p, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False).input_ids[:24]
        if len(ids) < 2:
            continue
        n = len(ids) - 1
        expect = _single_hidden(model, ids)[:n]  # state after tokens 0..j
        np.testing.assert_allclose(store.gather(np.arange(i, i + n)), expect, rtol=2e-3, atol=2e-3)
        assert store.values[i : i + n].tolist() == ids[1:]
        assert store.text[i : i + n].tolist() == [p] * n
        i += n
    assert store.size == i == stats["entries"] and store.dim == 32
    assert isinstance(store.keys, np.memmap) and store.keys.dtype == np.float16
    assert stats["passages"] == 40 and stats["bytes"] > store.keys.nbytes
    assert 0 < stats["fp16_max_rel_error"] < 1e-3


def test_successors_stay_in_the_passage(store):
    text = np.asarray(store.text)
    ids = np.array([[0, 5, -1], [store.size - 1, 17, 5]])
    got = store.successors(ids, 3)
    expect = sorted({j for i in (0, 5, 17, store.size - 1) for j in range(i + 1, i + 4)
                     if j < store.size and text[j] == text[i]})
    assert got.tolist() == expect and got.dtype == np.int64
    assert store.successors(np.array([-1]), 3).tolist() == [] and store.successors(np.array([0]), 0).tolist() == []
    ends = np.append(np.flatnonzero(np.diff(text)), store.size - 1)  # last entry of each passage
    assert store.successors(ends, 5).tolist() == []


def _brute(store: KnnDatastore, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    keys = np.asarray(store.keys, dtype=np.float64)
    ids = np.arange(store.size)
    out_d, out_i = np.full((len(queries), k), np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
    for r, q in enumerate(queries.astype(np.float64)):
        d = ((keys - q) ** 2).sum(1)
        best = np.lexsort((ids, d))[:k]
        out_d[r, : len(best)], out_i[r, : len(best)] = d[best], ids[best]
    return out_d, out_i


def _queries(store: KnnDatastore, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = store.gather(rng.integers(0, store.size, n))
    return (rows + rng.normal(0, 0.3, rows.shape)).astype(np.float32)


@pytest.mark.parametrize("k", [1, 10, 100, 10_000])
@pytest.mark.parametrize("n", [3, 12])  # the fp16 scan (<= SCAN_MAX_BATCH queries) and the float32 index
def test_exact_search_equals_brute_force(store, k, n):
    q = _queries(store, n, k)
    q[0] = store.gather(np.array([store.size // 2]))[0]  # sits on an entry (and its duplicate's twin, if any)
    dist, ids = store.search(q, k)
    bd, bi = _brute(store, q, k)
    np.testing.assert_array_equal(ids, bi)
    np.testing.assert_allclose(dist, bd, rtol=1e-6)
    assert dist.dtype == np.float32 and ids.dtype == np.int64


def test_duplicate_passages_tie_by_entry_id(store, built):
    text = np.asarray(store.text)
    a, b = np.flatnonzero(text == 4), np.flatnonzero(text == 5)
    np.testing.assert_array_equal(store.gather(a), store.gather(b))
    dist, ids = store.search(store.gather(a[2:3]), 2)
    assert ids[0].tolist() == [a[2], b[2]] and dist[0].tolist() == [0.0, 0.0]


def test_search_is_batch_independent(store):
    q = _queries(store, 40, 1)
    dist, ids = store.search(q, 50)
    threshold = faiss.cvar.distance_compute_blas_threshold
    try:
        for t in (threshold, 1):  # the sequential kernel and the BLAS one (dense.configure sets 1)
            faiss.cvar.distance_compute_blas_threshold = t
            for i in (0, 7, 39):
                d1, i1 = store.search(q[i : i + 1], 50)
                assert d1[0].tobytes() == dist[i].tobytes() and i1[0].tolist() == ids[i].tolist()
    finally:
        faiss.cvar.distance_compute_blas_threshold = threshold


def test_faiss_batch_vs_single():
    """The finding the module docstring states (faiss 1.15, d = 576): FAISS's own distances for a batch equal
    each query's alone while nq * d < distance_compute_blas_threshold (128000 by default: up to 222 queries);
    past it, or with the threshold at 1 (services.retriever.dense.configure), FAISS uses BLAS (|x|² + |y|² - 2x·y),
    whose distances differ from the sequential kernel's in the last bits, and whether a BLAS batch equals its
    single queries depends on the shapes (equal here; on the tiny profile's datastore 25% of the distances of
    an 8-query batch differed). `search` re-scores, so it shows none of this."""
    rng = np.random.default_rng(0)
    index = KnnDatastore.from_arrays(rng.normal(0, 1, (5000, 576)), np.zeros(5000), np.zeros(5000))._indexes["exact"]
    q = rng.normal(0, 1, (230, 576)).astype(np.float32)
    threshold = faiss.cvar.distance_compute_blas_threshold
    try:
        faiss.cvar.distance_compute_blas_threshold = 128_000
        single = np.concatenate([index.search(q[i : i + 1], 20)[0] for i in range(len(q))])
        assert index.search(q[:222], 20)[0].tobytes() == single[:222].tobytes()
        assert index.search(q, 20)[0].tobytes() != single.tobytes()  # 230 * 576 >= 128000: BLAS
        faiss.cvar.distance_compute_blas_threshold = 1
        blas = np.concatenate([index.search(q[i : i + 1], 20)[0] for i in range(8)])
        assert blas.tobytes() != single[:8].tobytes()  # even one query alone
        np.testing.assert_allclose(blas, single[:8], rtol=1e-4)
    finally:
        faiss.cvar.distance_compute_blas_threshold = threshold


def test_search_pads_and_checks(store):
    dist, ids = store.search(_queries(store, 2, 3), store.size + 5)
    assert (ids[:, -5:] == -1).all() and np.isinf(dist[:, -5:]).all()
    assert sorted(ids[0, : store.size].tolist()) == list(range(store.size))
    with pytest.raises(InvalidRequest):
        store.search(np.zeros((1, 7), np.float32), 3)
    with pytest.raises(InvalidRequest):
        store.search(np.zeros((1, 32), np.float32), 0)
    with pytest.raises(InvalidRequest):
        store.gather(np.array([store.size]))
    with pytest.raises(InvalidRequest):
        KnnDatastore.from_arrays(np.zeros((3, 4)), np.zeros(3), np.zeros(3), indexes=("hnsw",))


def test_ivf_returns_valid_neighbours(built, store):
    q = _queries(store, 8, 4)
    dist, ids = store.search(q, 20, index="approx")
    assert ((ids >= 0) & (ids < store.size)).all()
    assert (np.diff(dist, axis=1) >= 0).all()
    for r in range(len(q)):  # distances are the exact ones of the returned entries
        np.testing.assert_array_equal(dist[r], exact_distances(store.gather(ids[r]), q[r]).astype(np.float32))
    nlist = built[2]["nlist"]
    full = KnnDatastore.load(built[0], indexes=("approx",), nprobe=nlist)  # every list probed: exact
    np.testing.assert_array_equal(full.search(q, 20, index="approx")[1], store.search(q, 20)[1])
    with pytest.raises(InvalidRequest):
        full.search(q, 20)  # the exact index was not loaded


def test_resume_after_interruption_equals_one_build(model, built, tmp_path, monkeypatch):
    folder, texts, _ = built
    real = knn_build._hidden_states
    calls = []

    def interrupted(m, ids):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(m, ids)

    monkeypatch.setattr(knn_build, "_hidden_states", interrupted)
    out = tmp_path / "knn"
    with pytest.raises(KeyboardInterrupt):
        build((model, WordTokenizer()), texts, out, batch_tokens=64, max_len=24, progress=False)
    assert not (out / "meta.json").exists()
    assert json.loads((out / "progress.json").read_text())["batches_done"] == 2
    with pytest.raises(Unavailable, match="incomplete"):
        KnnDatastore.load(out)
    monkeypatch.setattr(knn_build, "_hidden_states", real)
    lm = LoadedLM("tiny", model, WordTokenizer(), torch.device("cpu"), torch.float32)
    stats = build((model, WordTokenizer()), texts, out, batch_tokens=64, max_len=24, progress=False)
    assert stats["resumed_from"] > 0 and not (out / "progress.json").exists()
    for name in ("keys.npy", "values.npy", "text.npy"):
        assert np.array_equal(np.load(out / name), np.load(folder / name)), name
    assert build(lm, texts, out, batch_tokens=64, max_len=24, progress=False).get("skipped") is None  # new key
    assert build(lm, texts, out, batch_tokens=64, max_len=24, progress=False)["skipped"]


def test_max_tokens_caps_entries(model, tmp_path):
    texts = _texts(1, 30, 30)
    stats = build((model, WordTokenizer()), texts, tmp_path, max_tokens=100, batch_tokens=256, progress=False)
    store = KnnDatastore.load(tmp_path, indexes=())
    assert stats["entries"] == store.size == 100
    last = int(store.text[-1])
    assert stats["passages"] == last + 1
    assert store.values[-1] == WordTokenizer()(texts[last], add_special_tokens=False).input_ids[
        int((np.asarray(store.text) == last).sum())]


def test_a_smaller_build_over_a_prefix_seeds_a_larger_one(model, tmp_path, monkeypatch):
    """default's datastore is large's first passages: a seeded build prefills only the passages the seed does not
    hold whole (its cap cut the last one) and equals an unseeded build; a seed over other passages is ignored."""
    texts = _texts(2, 40, 30)
    tok, kw = WordTokenizer(), {"batch_tokens": 64, "max_len": 24, "progress": False}
    small = build((model, tok), texts[:25], tmp_path / "small", max_tokens=140, **kw)
    full = build((model, tok), texts, tmp_path / "full", **kw)
    other = build((model, tok), texts[1:20], tmp_path / "other", **kw)  # not a prefix: never a seed
    assert small["entries"] == 140 and other["entries"] > 0
    real, prefilled = knn_build._hidden_states, []

    def counting(m, ids):
        prefilled.append(ids.shape[0])
        return real(m, ids)

    monkeypatch.setattr(knn_build, "_hidden_states", counting)
    seeds = [tmp_path / "other", tmp_path / "small", tmp_path / "missing"]
    seeded = build((model, tok), texts, tmp_path / "seeded", seeds=seeds, **kw)
    lengths = [len(tok(t, add_special_tokens=False).input_ids[:24]) for t in texts]
    held = np.bincount(np.load(tmp_path / "small" / "text.npy"))  # entries per passage of the seed
    whole = small["passages"] - 1
    assert held[whole] < lengths[whole] - 1  # the cap cut its last passage: that one is prefilled again
    assert seeded["seeded_from"] == str(tmp_path / "small")
    assert seeded["seeded_entries"] == int(held[:whole].sum())
    assert sum(prefilled) == sum(1 for n in lengths[whole:] if n >= 2)  # each passage not seeded, once
    np.testing.assert_array_equal(np.load(tmp_path / "seeded" / "keys.npy")[: seeded["seeded_entries"]],
                                  np.load(tmp_path / "small" / "keys.npy")[: seeded["seeded_entries"]])
    for name in ("values.npy", "text.npy"):
        assert np.array_equal(np.load(tmp_path / "seeded" / name), np.load(tmp_path / "full" / name)), name
    np.testing.assert_allclose(np.load(tmp_path / "seeded" / "keys.npy").astype(np.float32),
                               np.load(tmp_path / "full" / "keys.npy").astype(np.float32), rtol=2e-3, atol=2e-3)
    assert seeded["entries"] == full["entries"]
    assert build((model, tok), texts, tmp_path / "seeded", seeds=seeds, **kw)["skipped"]


def test_load_rejects_bad_folders(built, tmp_path):
    with pytest.raises(Unavailable, match="rebuild"):
        KnnDatastore.load(tmp_path)
    for name in ("keys.npy", "values.npy", "text.npy", "ivf.index"):
        (tmp_path / name).write_bytes((built[0] / name).read_bytes())
    meta = json.loads((built[0] / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "version": FORMAT_VERSION + 1}))
    with pytest.raises(Unavailable, match="version"):
        KnnDatastore.load(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "entries": meta["entries"] + 1}))
    with pytest.raises(Unavailable, match="meta.json"):
        KnnDatastore.load(tmp_path)
