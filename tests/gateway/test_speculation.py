"""The speculation loop's scheduling on a toy granularity (pure logic: sleeps stand in for the LM and the search)."""

from __future__ import annotations

import time

import pytest

from services.gateway.speculation import SpecConfig, SpeculationLoop, verification_pool


class Toy:
    """Step n's truth is a function of n; the cache guesses it right except at every fifth step."""

    gamma_cap = 0.9  # as KNN-LM: a miss costs one step

    def __init__(self, n: int, lm_s: float, search_s: float) -> None:
        self.n, self.lm_s, self.search_s = n, lm_s, search_s
        self.cache: set[int] = set()
        self.searches = 0

    @staticmethod
    def truth(n: int) -> int:
        return n * 7 % 11

    def done(self, tokens: list[int]) -> bool:
        return len(tokens) >= self.n

    def key(self, tokens: list[int]) -> int:
        time.sleep(self.lm_s)  # as KNN-LM: the key is the LM's hidden state
        return len(tokens)

    def guess(self, key: int) -> int | None:
        if not self.cache:
            return None
        return -1 if key % 5 == 4 else self.truth(key)

    def decode(self, key: int, guess: int | None, tokens: list[int]) -> tuple[list[int], list[float]]:
        return [-2 if guess is None else guess], [1.0]

    def verify(self, keys: list[int], guesses: list) -> list[int]:
        self.searches += 1
        time.sleep(self.search_s)
        return [self.truth(k) for k in keys]

    def retrieve(self, key: int) -> int:
        return self.verify([key], [])[0]

    def agrees(self, key: int, guess: int | None, truth: int, emitted: list[int] | None) -> bool:
        return guess == truth

    def correct(self, truth: int) -> int:
        return truth

    def remember(self, truths: list[int]) -> None:
        self.cache.update(truths)

    def cache_size(self) -> int:
        return len(self.cache)


BASELINE = [Toy.truth(n) for n in range(24)]


@pytest.fixture(scope="module")
def pools():
    verify, books = verification_pool(1), verification_pool(1, "books")
    yield verify, books
    verify.shutdown()
    books.shutdown()


def test_os3_takes_plain_steps_until_it_has_evidence_then_speculates_where_it_pays(pools):
    # a search as slow as the LM step, guesses right 4 times in 5: asynchronous speculation pays
    toy = Toy(24, lm_s=0.01, search_s=0.01)
    res = SpeculationLoop(toy, SpecConfig(os3=True, asynchronous=True), pools[0], books=pools[1]).run()
    assert res.tokens == BASELINE
    assert res.stats["plain_steps"] >= 4  # the first step + min_rounds shadow outcomes before any guess
    assert res.stats["speculated"] > 0 and res.stats["rollbacks"] > 0


def test_os3_never_speculates_where_a_miss_costs_more_than_the_search_saves(pools):
    # synchronous verification of a cheap search: a plain step always wins, so nothing is ever guessed
    toy = Toy(24, lm_s=0.01, search_s=0.001)
    res = SpeculationLoop(toy, SpecConfig(os3=True), pools[0], books=pools[1]).run()
    assert res.tokens == BASELINE
    assert res.stats["speculated"] == 0 and res.stats["plain_steps"] == 24


@pytest.mark.parametrize("books", [True, False])
def test_fixed_stride_speculates_from_the_second_step(pools, books):
    toy = Toy(24, lm_s=0.0, search_s=0.0)
    res = SpeculationLoop(toy, SpecConfig(stride=3), pools[0], books=pools[1] if books else None).run()
    assert res.tokens == BASELINE
    assert res.stats["plain_steps"] == 1 and res.stats["speculated"] >= 23


def test_a_busy_server_pauses_speculation_until_it_is_not(pools):
    # busy for the first 10 rounds: plain steps without shadow lookups (the baseline's), then a fixed stride resumes
    toy = Toy(24, lm_s=0.0, search_s=0.0)
    asked = []

    def busy() -> bool:
        asked.append(1)
        return len(asked) <= 20  # next_stride and plain_step both ask: ~10 paused steps

    looked: list[int] = []
    guess = toy.guess
    toy.guess = lambda key: looked.append(key) or guess(key)  # type: ignore[method-assign]
    res = SpeculationLoop(toy, SpecConfig(stride=3), pools[0], books=pools[1], busy=busy).run()
    assert res.tokens == BASELINE
    paused = res.stats["paused_steps"]
    assert paused >= 8 and res.stats["plain_steps"] >= paused and res.stats["speculated"] > 0
    assert min(looked) >= res.stats["plain_steps"] - 1  # no shadow guess while paused: guesses only after
