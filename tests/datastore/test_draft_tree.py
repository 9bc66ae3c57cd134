"""Draft trie: the kept prefixes are the budget most frequent ones, closed under ancestors, in BFS order."""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import pytest

from services.common.errors import InvalidRequest
from services.datastore.draft_tree import DraftTree


def _brute(conts: list[list[int]], budget: int, weights: list[float] | None = None) -> dict[tuple[int, ...], float]:
    counts: dict[tuple[int, ...], float] = defaultdict(float)
    for i, c in enumerate(conts):
        for d in range(1, len(c) + 1):
            counts[tuple(c[:d])] += 1.0 if weights is None else weights[i]
    ranked = sorted(counts, key=lambda p: (-counts[p], len(p), p))
    return {p: counts[p] for p in ranked[:budget] if counts[p] > 0}


def _check_invariants(tree: DraftTree, budget: int) -> None:
    n = len(tree)
    assert n <= budget
    for i in range(n):
        p = int(tree.parents[i])
        assert p < i  # a parent precedes its children
        assert tree.depth[i] == (1 if p < 0 else tree.depth[p] + 1)
        if p >= 0:
            assert tree.counts[p] >= tree.counts[i]
    paths = [tuple(tree.path_tokens(i)) for i in range(n)]
    assert len(set(paths)) == n
    assert all(p[:-1] in set(paths) for p in paths if len(p) > 1)  # closed under ancestors
    keys = [(len(p), p) for p in paths]
    assert keys == sorted(keys)  # BFS: by depth, then token path


@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force(seed):
    rng = random.Random(seed)
    vocab = rng.choice([2, 3, 5])
    conts = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 8))] for _ in range(rng.randrange(0, 60))]
    weights = [rng.choice([0.0, 0.5, 1.0, 2.0]) for _ in conts] if seed % 2 else None
    for budget in (1, 5, 16, 64, 1000):
        tree = DraftTree.from_continuations(conts, budget=budget, weights=weights)
        _check_invariants(tree, budget)
        expected = _brute(conts, budget, weights)
        got = {tuple(tree.path_tokens(i)): float(tree.counts[i]) for i in range(len(tree))}
        assert got == pytest.approx(expected)


def test_tie_breaking():
    assert [t.path_tokens(i) for t in [DraftTree.from_continuations([[5], [3], [4]], budget=2)]
            for i in range(len(t))] == [[3], [4]]  # equal counts: smaller tokens first
    tree = DraftTree.from_continuations([[1, 2], [3]], budget=2)  # equal counts: shorter first
    assert [tree.path_tokens(i) for i in range(len(tree))] == [[1], [3]]
    tree = DraftTree.from_continuations([[1, 9], [1, 2], [1, 2, 7], [4, 4], [4]], budget=4)
    assert [tree.path_tokens(i) for i in range(len(tree))] == [[1], [4], [1, 2], [1, 9]]  # then [1, 9] < [4, 4]
    assert tree.counts.tolist() == [3, 2, 2, 1]


def test_order_of_continuations_does_not_matter():
    rng = random.Random(11)
    conts = [[rng.randrange(4) for _ in range(rng.randrange(1, 6))] for _ in range(80)]
    a = DraftTree.from_continuations(conts, budget=20)
    shuffled = conts[:]
    rng.shuffle(shuffled)
    b = DraftTree.from_continuations(shuffled, budget=20)
    for field in ("tokens", "parents", "depth", "counts"):
        assert getattr(a, field).tolist() == getattr(b, field).tolist()


def test_ancestor_mask_children_paths():
    rng = random.Random(2)
    conts = [[rng.randrange(3) for _ in range(rng.randrange(1, 7))] for _ in range(50)]
    tree = DraftTree.from_continuations(conts, budget=30)
    n = len(tree)
    mask = tree.ancestor_mask()
    assert mask.shape == (n, n) and mask.dtype == np.bool_
    for i in range(n):
        seen = {i}
        j = int(tree.parents[i])
        while j >= 0:
            seen.add(j)
            j = int(tree.parents[j])
        assert set(np.flatnonzero(mask[i]).tolist()) == seen
    for i in range(-1, n):
        kids = tree.children(i)
        assert kids == [j for j in range(n) if tree.parents[j] == i]
        for j in kids:
            assert tree.child(i, int(tree.tokens[j])) == j
    assert tree.child(-1, 99) is None
    paths = tree.paths()
    leaves = [i for i in range(n) if not tree.children(i)]
    assert [p[-1] for p in paths] == leaves
    for p in paths:
        assert tree.parents[p[0]] == -1
        assert all(tree.parents[b] == a for a, b in zip(p, p[1:]))


def test_empty_trees():
    for conts in ([], [[]], [[], []]):
        tree = DraftTree.from_continuations(conts)
        assert len(tree) == 0
        assert tree.ancestor_mask().shape == (0, 0)
        assert tree.paths() == [] and tree.children(-1) == []
    assert len(DraftTree.from_continuations([[1, 2]], budget=0)) == 0
    assert len(DraftTree.from_continuations([[1, 2]], weights=[0.0])) == 0


def test_from_block_and_bad_input():
    block = np.array([[1, 2, -1], [1, 3, 4], [-1, -1, -1]])
    a = DraftTree.from_block(block, budget=8)
    b = DraftTree.from_continuations([[1, 2], [1, 3, 4], []], budget=8)
    assert a.tokens.tolist() == b.tokens.tolist() and a.parents.tolist() == b.parents.tolist()
    assert a.tokens.tolist() == [1, 2, 3, 4] and a.parents.tolist() == [-1, 0, 0, 2]
    with pytest.raises(InvalidRequest):
        DraftTree.from_continuations([[1]], weights=[-1.0])
    with pytest.raises(InvalidRequest):
        DraftTree.from_continuations([[1]], weights=[1.0, 2.0])
    for bad in ([[1, -5]], [[1, -1, 2]]):
        with pytest.raises(InvalidRequest):
            DraftTree.from_continuations(bad)


def test_large_tokens_and_many_continuations():
    rng = np.random.default_rng(0)
    block = rng.integers(0, 3, size=(5000, 10)) + 2**31 - 4  # 32-bit token ids
    tree = DraftTree.from_block(block, budget=64)
    _check_invariants(tree, 64)
    assert len(tree) == 64 and int(tree.tokens.max()) < 2**31
