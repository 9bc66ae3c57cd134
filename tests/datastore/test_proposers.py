"""Draft proposers: prompt lookup against brute force, REST proposer, merged proposals in one tree."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from services.datastore.draft_tree import DraftTree
from services.datastore.proposers import Merged, PromptLookup, Proposer, RestProposer
from services.datastore.rest_datastore import RestDatastore


def _brute_prompt_lookup(ctx: list[int], max_suffix: int, min_suffix: int, continuation: int,
                         max_matches: int) -> list[list[int]]:
    n = len(ctx)
    for length in range(min(max_suffix, n - 1), min_suffix - 1, -1):
        pat = ctx[n - length:]
        starts = [p for p in range(n - length) if ctx[p:p + length] == pat]  # one token must follow
        if starts:
            return [ctx[p + length:p + length + continuation] for p in starts[:max_matches]]
    return []


@pytest.mark.parametrize("seed", range(5))
def test_prompt_lookup_equals_brute_force(seed):
    rng = random.Random(seed)
    for _ in range(80):
        vocab = rng.choice([2, 3, 6])
        ctx = [rng.randrange(vocab) for _ in range(rng.randrange(0, 60))]
        max_suffix, min_suffix, cont, max_matches = rng.choice([(16, 2, 10, 64), (4, 1, 3, 2), (6, 3, 5, 1000)])
        got = PromptLookup(max_suffix=max_suffix, min_suffix=min_suffix, continuation=cont,
                           max_matches=max_matches).propose(ctx)
        assert got == _brute_prompt_lookup(ctx, max_suffix, min_suffix, cont, max_matches)


def test_prompt_lookup_finds_the_document():
    doc = list(range(100, 130))
    ctx = doc + [7, 8, 9] + doc[5:12]  # the answer copies the document placed before the prompt
    assert PromptLookup(continuation=4).propose(ctx) == [doc[12:16]]
    assert PromptLookup().propose([1]) == [] and PromptLookup().propose([1, 2, 3]) == []


def test_rest_proposer_and_merged():
    store = RestDatastore.build([[1, 2, 3, 4], [1, 2, 3, 5], [9, 1, 2, 7]], vocab_size=10)
    rest = RestProposer(store, continuation=2)
    ctx = [6, 1, 2]
    assert rest.propose(ctx) == store.lookup(ctx, continuation=2).continuations
    assert sorted(map(list, rest.propose(ctx))) == [[3, 4], [3, 5], [7]]
    prompt = PromptLookup(continuation=2)
    ctx2 = [1, 2, 8, 0, 1, 2]
    assert prompt.propose(ctx2) == [[8, 0]]
    proposers: list[Proposer] = [rest, prompt]
    merged = Merged(proposers).propose(ctx2)
    assert merged == list(rest.propose(ctx2)) + list(prompt.propose(ctx2))
    tree = DraftTree.from_continuations(merged, budget=4)
    assert [tree.path_tokens(i) for i in range(len(tree))] == [[3], [7], [8], [3, 4]]
    assert Merged([]).propose(ctx2) == []


class _Fixed:
    def __init__(self, conts: list[Sequence[int]]) -> None:
        self.conts = conts

    def propose(self, context: Sequence[int]) -> list[Sequence[int]]:
        return list(self.conts)


def test_merged_keeps_order_and_duplicates():
    merged = Merged([_Fixed([[1], [2, 3]]), _Fixed([]), _Fixed([[1]])])
    assert merged.propose([0]) == [[1], [2, 3], [1]]
    tree = DraftTree.from_continuations(merged.propose([0]))
    assert tree.counts.tolist() == [2, 1, 1]
