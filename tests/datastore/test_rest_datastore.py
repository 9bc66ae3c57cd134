"""REST datastore: suffix array order, lookup against brute force, on-disk format."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import numpy as np
import pytest

from services.common.errors import InvalidRequest, Unavailable
from services.datastore.rest_datastore import (
    FORMAT_VERSION,
    RestDatastore,
    build_from_texts,
    concat_passages,
    suffix_array,
)


def _random_passages(rng: random.Random, vocab: int, n_passages: int, max_len: int) -> list[list[int]]:
    return [[rng.randrange(vocab) for _ in range(rng.randrange(max_len + 1))] for _ in range(n_passages)]


def _suffix_key(tokens: list[int], p: int) -> list[tuple[int, int]]:
    """A suffix up to its separator; each separator a distinct symbol below every token."""
    out = []
    for i in range(p, len(tokens)):
        if tokens[i] == -1:
            out.append((-1, i))
            break
        out.append((tokens[i], 0))
    return out


def _sorted_suffixes(tokens: list[int]) -> list[int]:
    return sorted((p for p, t in enumerate(tokens) if t != -1), key=lambda p: _suffix_key(tokens, p))


def _brute_lookup(tokens: list[int], context: list[int], max_suffix: int, min_suffix: int, continuation: int):
    """(L, matches in suffix order, continuation per match incl. empty ones)."""
    order = _sorted_suffixes(tokens)
    for length in range(min(max_suffix, len(context)), min_suffix - 1, -1):
        pat = context[len(context) - length:]
        matches = [p for p in order if tokens[p:p + length] == pat]
        if matches:
            conts = []
            for p in matches:
                nxt = tokens[p + length:p + length + continuation]
                conts.append(nxt[: nxt.index(-1)] if -1 in nxt else nxt)
            return length, matches, conts
    return 0, [], []


@pytest.mark.parametrize("seed", range(6))
def test_suffix_array_matches_sorted(seed):
    rng = random.Random(seed)
    for _ in range(40):
        passages = _random_passages(rng, rng.choice([1, 2, 3, 5]), rng.randrange(6), 15)
        tokens = concat_passages(passages, 5)
        assert suffix_array(tokens).tolist() == _sorted_suffixes(tokens.tolist())


def test_suffix_array_repeats_and_progress():
    passages = [[1] * 50, [1] * 50, [2, 1] * 30, [1] * 49]  # long repeats: many doubling rounds
    tokens = concat_passages(passages, 3)
    seen: list[tuple[int, int]] = []
    sa = suffix_array(tokens, lambda done, total: seen.append((done, total)))
    assert sa.tolist() == _sorted_suffixes(tokens.tolist())
    assert sa.dtype == np.int32
    assert seen[-1] == (len(tokens), len(tokens))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_suffix_array_needs_trailing_separator():
    with pytest.raises(InvalidRequest):
        suffix_array(np.array([1, 2], dtype=np.int32))
    assert suffix_array(np.zeros(0, np.int32)).tolist() == []


@pytest.mark.parametrize("seed", range(4))
def test_lookup_equals_brute_force(seed):
    rng = random.Random(100 + seed)
    vocab = rng.choice([2, 3, 4])
    passages = _random_passages(rng, vocab, 12, 40)
    store = RestDatastore.build(passages, vocab_size=vocab + 1)
    tokens = store.tokens.tolist()
    for _ in range(60):
        n_ctx = rng.randrange(0, 20)
        context = [rng.randrange(vocab + 1) for _ in range(n_ctx)]  # token `vocab` never occurs
        if rng.random() < 0.3 and len(tokens) > 20:  # a context copied from the corpus
            start = rng.randrange(len(tokens) - 20)
            context = [t for t in tokens[start:start + rng.randrange(1, 20)] if t != -1]
        max_suffix, min_suffix, cont = rng.choice([(16, 2, 10), (5, 3, 4), (3, 1, 1)])
        got = store.lookup(context, max_suffix=max_suffix, min_suffix=min_suffix, max_matches=10**6,
                           continuation=cont)
        length, matches, conts = _brute_lookup(tokens, context, max_suffix, min_suffix, cont)
        assert got.suffix_len == length
        assert got.n_occurrences == len(matches)
        kept = [(p, c) for p, c in zip(matches, conts) if c]
        assert got.positions.tolist() == [p for p, _ in kept]
        assert got.continuations == [c for _, c in kept]
        assert got.block.shape == (len(kept), cont)
        assert (got.lengths >= 1).all()


def test_lookup_thins_matches_by_even_stride():
    rng = random.Random(3)
    passages = _random_passages(rng, 2, 20, 60)
    store = RestDatastore.build(passages, vocab_size=2)
    tokens = store.tokens.tolist()
    length, matches, _ = _brute_lookup(tokens, [0, 1], 16, 2, 10)
    assert length == 2 and len(matches) > 40
    got = store.lookup([0, 1], max_matches=7, continuation=3)
    assert got.n_occurrences == len(matches)
    expected = [matches[(i * len(matches)) // 7] for i in range(7)]
    kept = [p for p in expected if tokens[p + 2] != -1]
    assert got.positions.tolist() == kept
    assert store.lookup([0, 1], max_matches=7, continuation=3).positions.tolist() == kept  # deterministic


def test_lookup_edges():
    store = RestDatastore.build([[1, 2, 3], [4, 5, 1, 2, 6]], vocab_size=10)
    assert store.lookup([2]).suffix_len == 0  # shorter than min_suffix
    assert store.lookup([]).continuations == []
    assert store.lookup([7, 8]).suffix_len == 0  # no match
    longest = store.lookup([5, 1, 2])  # L=3 beats L=2
    assert (longest.suffix_len, longest.n_occurrences, longest.continuations) == (3, 1, [[6]])
    end = store.lookup([2, 3])  # at a passage's end: the only continuation is empty, dropped
    assert (end.suffix_len, end.n_occurrences, end.continuations) == (2, 1, [])
    cut = store.lookup([9, 1, 2], continuation=5)  # 9 absent: L=2 wins; continuations cut at separators
    assert (cut.suffix_len, cut.continuations) == (2, [[3], [6]])
    cross = store.lookup([3, 4])  # spans a passage boundary: never matches
    assert cross.suffix_len == 0
    assert store.lookup([1, 2], continuation=0).n_occurrences == 2
    with pytest.raises(InvalidRequest):
        store.lookup([1, -1])
    assert store.count([1, 2]) == 2 and store.count([2, 3, 4]) == 0


def test_vocab_checks():
    with pytest.raises(InvalidRequest):
        RestDatastore.build([[1, 70000]], vocab_size=70000)
    big = RestDatastore.build([[1, 70000, 2**31 - 1]], vocab_size=2**31)  # 32-bit ids, beyond REST's 16
    assert big.lookup([1, 70000]).continuations == [[2**31 - 1]]


def test_save_load_roundtrip_memmap(tmp_path: Path):
    rng = random.Random(5)
    store = RestDatastore.build(_random_passages(rng, 3, 10, 30), vocab_size=3)
    path = tmp_path / "rest.bin"
    size = store.save(path)
    assert size == path.stat().st_size
    assert not path.with_name("rest.bin.tmp").exists()
    loaded = RestDatastore.load(path)
    assert isinstance(loaded.tokens.base, np.memmap) and isinstance(loaded.sa.base, np.memmap)
    assert loaded.tokens.tolist() == store.tokens.tolist() and loaded.sa.tolist() == store.sa.tolist()
    assert (loaded.vocab_size, loaded.n_passages) == (3, store.n_passages)
    for ctx in ([0, 1], [2, 2, 1], [1, 0, 2, 2]):
        assert loaded.lookup(ctx).continuations == store.lookup(ctx).continuations
    wide = RestDatastore(store.tokens, store.sa.astype(np.int64), 3)  # int64 positions (corpora >= 2**31)
    wide.save(path)
    again = RestDatastore.load(path)
    assert again.sa.dtype == np.int64 and again.sa.tolist() == store.sa.tolist()


def test_load_rejects_bad_files(tmp_path: Path):
    path = tmp_path / "rest.bin"
    with pytest.raises(Unavailable, match="rebuild"):
        RestDatastore.load(path)
    RestDatastore.build([[1, 2, 3]], vocab_size=4).save(path)
    raw = path.read_bytes()
    path.write_bytes(b"NOTREST!" + raw[8:])
    with pytest.raises(Unavailable, match="magic.*rebuild"):
        RestDatastore.load(path)
    path.write_bytes(raw[:8] + struct.pack("<I", FORMAT_VERSION + 1) + raw[12:])
    with pytest.raises(Unavailable, match="version.*rebuild"):
        RestDatastore.load(path)
    path.write_bytes(raw[:-4])
    with pytest.raises(Unavailable, match="rebuild"):
        RestDatastore.load(path)
    path.write_bytes(raw[:10])
    with pytest.raises(Unavailable, match="magic"):
        RestDatastore.load(path)


def test_build_from_texts(tmp_path: Path):
    texts = ["the cat sat", "", "the cat ran", "a cat sat down"]
    words = sorted({w for t in texts for w in t.split()})

    def encode(text: str) -> list[int]:
        return [words.index(w) for w in text.split()]

    stats = build_from_texts(texts, encode, len(words), tmp_path / "d" / "rest.bin", progress=False)
    assert (stats.n_tokens, stats.n_passages) == (13, 3)
    assert stats.bytes == (tmp_path / "d" / "rest.bin").stat().st_size and stats.build_s >= 0
    store = RestDatastore.load(tmp_path / "d" / "rest.bin")
    got = store.lookup(encode("the cat"))
    assert got.suffix_len == 2
    assert sorted(got.continuations) == sorted([encode("sat"), encode("ran")])


def test_lookup_accepts_numpy_context_and_checks_settings():
    store = RestDatastore.build([[1, 2, 3], [1, 2, 4]], vocab_size=5)
    assert store.lookup(np.array([0, 1, 2], dtype=np.int64)).continuations == store.lookup([0, 1, 2]).continuations
    with pytest.raises(InvalidRequest):
        store.lookup([1, 2], min_suffix=0)
