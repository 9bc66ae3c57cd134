"""The speculation loop of RaLMSpec, shared by both granularities: documents every few tokens (iterative RaLM,
`ralmspec.py`) and neighbours at every token (KNN-LM, `knn_generation.py`).

A granularity says what one step is: form a query key from the context, guess its retrieval result from the
request's cache, decode with the guess, verify many keys in one batched search, tell whether a guess decodes
like the truth would, and cache verified results. The loop owns everything else:

One round:
  1) speculate: s steps, each = key -> cache guess -> decode one step with it;
  2) verify: one batched search of the s keys on the real index; cache what the verified steps retrieved;
  3) first step whose guess disagrees with its truth, j: keep steps < j, redo step j with the truth, drop the
     rest (the LM's KV cache follows the token sequence, so the rollback is a crop, not a rebuild).
A kept step saw exactly the baseline's context and decoded with a result equivalent to the baseline's, so the
emitted tokens equal the baseline's.
Asynchronous: round r+1 is speculated while round r is verified on a worker thread (FAISS, Lucene and torch
release the GIL); a failed verification of round r discards round r+1, which was built on a wrong guess.
OS³ picks s each round (`os3.py`), and may pick a plain step (retrieve for real, then decode).
A plain step costs what the baseline's step costs: the granularity's own search (not the verifier's hop), and
its bookkeeping (the shadow cache lookup that measures γ, the cache insert of what it retrieved) runs on a
bookkeeping thread while the LM decodes, as does a round's cache insert; the next step joins it before
touching the cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from services.common.bounds import Bound
from services.common.errors import InvalidRequest
from services.common.tracing import ContextExecutor
from services.gateway.os3 import OS3, CostMemory, OS3Config
from services.retriever.types import PASSAGE_K

K = TypeVar("K")  # a step's query key
G = TypeVar("G")  # a guess (what the cache returned), or the truth in the same form
T = TypeVar("T")  # what verification returns for one key


@dataclass(frozen=True)
class SpecConfig:
    stride: int = 3  # fixed speculation stride s (steps per verification) when OS³ is off (the paper's 3)
    prefetch: bool = False  # +P
    prefetch_k: int = 20
    os3: bool = False  # +S
    asynchronous: bool = False  # +A
    gamma_cap: float | None = None  # OS³'s cap on γ; None: the granularity's (`Granularity.gamma_cap`)
    gamma_window: int = 5
    max_stride: int = 16

    def validate(self) -> None:
        Bound(1, self.max_stride).check("speculation stride", self.stride)
        PASSAGE_K.check("prefetch_k", self.prefetch_k)  # the verifier's search depth
        if self.gamma_cap is not None and not 0.0 < self.gamma_cap < 1.0:
            raise InvalidRequest(f"gamma cap must be in (0, 1), got {self.gamma_cap}")


PRESETS: dict[str, SpecConfig] = {  # the paper's ablation
    "ralmspec": SpecConfig(),
    "+P": SpecConfig(prefetch=True),
    "+S": SpecConfig(os3=True),
    "+A": SpecConfig(asynchronous=True),
    "+PSA": SpecConfig(prefetch=True, os3=True, asynchronous=True),
}


class Granularity(Protocol[K, G, T]):
    """One speculation step's mechanics. `tokens` is everything decoded so far (verified or not). `gamma_cap`:
    OS³'s default cap on γ, by how well its `a` prices a wrong guess (OS³ redoes one step of mean cost a)."""

    gamma_cap: float

    def done(self, tokens: list[int]) -> bool: ...

    def key(self, tokens: list[int]) -> K:
        """The query formed from the context so far."""
        ...

    def guess(self, key: K) -> G | None:
        """The cache's answer (None: the cache has nothing)."""
        ...

    def decode(self, key: K, guess: G | None, tokens: list[int]) -> tuple[list[int], list[float]]:
        """One step's tokens and their top-2 gaps, decoded with `guess` after `tokens`."""
        ...

    def verify(self, keys: list[K], guesses: list[G | None]) -> list[T]:
        """The true retrieval result of each key, in one batched call (guesses: [] or one per key)."""
        ...

    def retrieve(self, key: K) -> T:
        """The true retrieval result of one key by the baseline's own call (a plain step's critical path)."""
        ...

    def agrees(self, key: K, guess: G | None, truth: T, emitted: list[int] | None) -> bool:
        """Whether decoding with `guess` emits what decoding with the truth emits; `emitted`: what decoding with
        `guess` did emit (None: the guess was not decoded, as with a plain step's shadow guess)."""
        ...

    def correct(self, truth: T) -> G:
        """The truth as a guess (what the baseline decodes with)."""
        ...

    def remember(self, truths: list[T]) -> None:
        """Cache what verified steps retrieved (and prefetched)."""
        ...

    def cache_size(self) -> int: ...


@dataclass
class Step(Generic[K, G]):
    start: int  # len(tokens) when the step began
    key: K
    guess: G | None  # what the step decoded with (a guess until verified)
    emitted: list[int] = field(default_factory=list)  # the tokens it decoded


@dataclass
class _Verdict(Generic[T]):
    truths: list[T]
    seconds: float


@dataclass
class LoopResult:
    tokens: list[int] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    retrieval_s: float = 0.0  # cache lookups of plain steps + verification waits on the critical path
    retrievals: int = 0  # steps whose retrieval was verified (or done for real)
    stats: dict[str, Any] = field(default_factory=dict)


Emit = Callable[[list[int]], None]


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)  # this thread's OpenMP team, which FAISS shares with torch


def verification_pool(workers: int, name: str = "verify") -> ThreadPoolExecutor:
    """Threads for asynchronous verification (and, named "books", for plain steps' bookkeeping). Each runs its
    searches on one OpenMP thread: a new thread starts with OpenMP's default team (every core), so a FAISS search
    beside the decoding thread oversubscribed the cores and busy-waiting OpenMP threads halved the LM's speed
    (KNN-LM +A, measured: 0.45x of the baseline). Tasks run in their submitter's context (the request id)."""
    return ContextExecutor(max_workers=workers, thread_name_prefix=name, initializer=_one_thread)


class SpeculationLoop(Generic[K, G, T]):
    """One request's speculative decoding over a granularity; `run` is the round loop."""

    def __init__(self, g: Granularity[K, G, T], spec: SpecConfig, pool: ThreadPoolExecutor,
                 clock: Callable[[], None] = lambda: None, emit: Emit | None = None,
                 books: ThreadPoolExecutor | None = None, busy: Callable[[], bool] = lambda: False,
                 costs: CostMemory | None = None) -> None:
        """`pool`: asynchronous verification; `books`: plain steps' bookkeeping (None: inline, on the critical
        path); `busy`: the server is loaded, so speculation pauses (plain steps without bookkeeping, the
        baseline's steps) until it is not: vLLM's `speculative_disable_by_batch_size`, checked every round;
        `costs`: a and b from earlier requests of the same workload (OS³ starts from them, and learns this one's)."""
        spec.validate()
        self.g, self.spec, self.pool, self.clock, self.emit, self.books = g, spec, pool, clock, emit, books
        self.busy = busy
        self.paused = 0  # plain steps taken because the server was busy
        self._book: Future[bool | None] | None = None  # the last plain step's bookkeeping: would its guess agree?
        self.os3 = OS3(OS3Config(window=spec.gamma_window, gamma_cap=spec.gamma_cap or g.gamma_cap,
                                 max_stride=spec.max_stride, initial_stride=spec.stride,
                                 asynchronous=spec.asynchronous))
        self.costs = costs
        if costs is not None and spec.os3:
            costs.seed(self.os3)
        self.res = LoopResult()
        self.speculated = self.matched = self.rounds = self.rollbacks = self.calls = self.plain_steps = 0
        self.strides: list[int] = []  # steps speculated in each round
        self.accepted: list[int] = []  # steps accepted in each round (before its first mismatch)
        self.shadow_lookups = self.shadow_hits = 0  # plain steps' shadow guesses checked / right
        self.retrieval_work_s = 0.0  # every search's own time (plain steps' and verifications'), hidden or not
        self.spec_s = 0.0  # key + cache lookup of speculation steps
        # Seconds on the request's critical path by phase: key (KNN-LM: the LM forward; RaLM: the encoder), join
        # (waiting for a plain step's bookkeeping), lookup (cache guesses), search (plain steps), decode, wait
        # (verification), settle (checking + caching verified results), redo (the rollback's corrected step).
        self.timeline: dict[str, float] = {}
        self.released = 0  # tokens handed to `emit` (all verified)

    # -- steps -----------------------------------------------------------------------------------------
    def lap(self, phase: str, since: float) -> float:
        """Add the time since `since` to `phase`; return now (the next phase's start)."""
        now = time.perf_counter()
        self.timeline[phase] = self.timeline.get(phase, 0.0) + now - since
        return now

    def done(self) -> bool:
        return self.g.done(self.res.tokens)

    def decode(self, key: K, guess: G | None) -> Step[K, G]:
        res = self.res
        tokens, gaps = self.g.decode(key, guess, res.tokens)
        step = Step(len(res.tokens), key, guess, tokens)
        res.tokens += tokens
        res.gaps += gaps
        res.steps.append(step)
        return step

    def truncate(self, step: Step[K, G]) -> None:
        """Drop `step` and everything after it (the rollback)."""
        res = self.res
        res.tokens, res.gaps = res.tokens[: step.start], res.gaps[: step.start]
        res.steps = [s for s in res.steps if s.start < step.start]

    def speculate(self, s: int) -> list[Step[K, G]]:
        steps: list[Step[K, G]] = []
        while len(steps) < s and not self.done():
            if steps:
                self.clock()  # the deadline and cancellation between the LM steps of a round (run checks the first)
            t0 = time.perf_counter()
            key = self.g.key(self.res.tokens)
            t = self.lap("key", t0)
            self.join_books()  # the cache must hold what earlier plain steps retrieved
            t = self.lap("join", t)
            guess = self.g.guess(key)
            t = self.lap("lookup", t)
            self.spec_s += t - t0
            steps.append(self.decode(key, guess))
            self.os3.observe_speculation(self.lap("decode", t) - t0)
        return steps

    def next_stride(self) -> int:
        """Steps in the next round; 0 = a plain retrieval step (OS³ found speculation not worth it, or the server
        is busy)."""
        if self.busy():
            self.paused += 1
            return 0
        return self.os3.next_stride() if self.spec.os3 else self.spec.stride

    def verify(self, keys: list[K], guesses: list[G | None]) -> _Verdict[T]:
        t = time.perf_counter()
        truths = self.g.verify(keys, guesses)
        return _Verdict(truths, time.perf_counter() - t)

    def plain_step(self, first: bool = False) -> None:
        """Retrieve for real, then decode: every step before OS³ has evidence, and every step it does not
        speculate. Only the key and the baseline's own search are on the critical path; the shadow guess (which
        keeps γ current) and the cache insert run on the bookkeeping thread while the step decodes."""
        t0 = time.perf_counter()
        key = self.g.key(self.res.tokens)  # KNN-LM: the LM forward, already counted as LM time
        t = self.lap("key", t0)
        self.join_books()  # overlapped with the key (KNN-LM) or the previous decode (RaLM)
        t_join = t
        t = self.lap("join", t)
        t_join = t - t_join  # bookkeeping, not this step's cost: kept out of a
        truth = self.g.retrieve(key)
        seconds = self.lap("search", t) - t
        self.res.retrieval_s += seconds
        self.retrieval_work_s += seconds
        self.res.retrievals += 1
        self.calls += 1
        self.os3.observe_verification(seconds, 1)
        t = time.perf_counter()
        # else no γ could make speculation pay, or the server is busy: the plain step is then the baseline's
        watch = (not self.spec.os3 or self.os3.worth_watching()) and not self.busy()
        if watch and self.books is None:
            self._absorb(self._bookkeeping(key, truth))
            t = self.lap("settle", t)
        elif watch and self.books is not None:
            self._book = self.books.submit(self._bookkeeping, key, truth)
        self.decode(key, self.g.correct(truth))
        t = self.lap("decode", t)
        if not first:  # the first step's prompt prefill is no speculation cost: keep it out of `a`
            self.os3.observe_plain(t - t0 - seconds - t_join)
        self.plain_steps += 1
        self.release(len(self.res.tokens))

    def _bookkeeping(self, key: K, truth: T) -> bool | None:
        """A plain step's cache work: would the cache's guess have agreed with the truth (None: no guess), then
        cache the truth (the guess first: after the insert it would find the truth itself)."""
        guess = self.g.guess(key)
        self.g.remember([truth])
        return None if guess is None else self.g.agrees(key, guess, truth, None)

    def cache(self, truths: list[T]) -> None:
        """Cache verified results: on the bookkeeping thread when there is one (the next guess joins it first)."""
        if self.books is None:
            self.g.remember(truths)
            return
        self.join_books()
        self._book = self.books.submit(self._remember, truths)

    def _remember(self, truths: list[T]) -> None:
        self.g.remember(truths)

    def _absorb(self, agreed: bool | None) -> None:
        if agreed is not None:
            self.shadow_lookups += 1
            self.shadow_hits += int(agreed)
            self.os3.observe_round(1, int(agreed))

    def join_books(self) -> None:
        """Wait for the last plain step's bookkeeping (its errors surface here)."""
        if self._book is not None:
            book, self._book = self._book, None
            self._absorb(book.result())

    def release(self, upto: int) -> None:
        """Hand the verified tokens before position `upto` to `emit`."""
        if self.emit and upto > self.released:
            self.emit(self.res.tokens[self.released : upto])
        self.released = max(self.released, upto)

    def settle(self, steps: list[Step[K, G]], verdict: _Verdict[T]) -> Step[K, G] | None:
        """Apply a verification: cache the verified results, count, and return the first wrong step (already
        redone with its truth), or None when every guess was right."""
        t = time.perf_counter()
        truths = verdict.truths
        bad = next((i for i, (st, tr) in enumerate(zip(steps, truths))
                    if not self.g.agrees(st.key, st.guess, tr, st.emitted)), None)
        verified = len(steps) if bad is None else bad + 1  # keys after a mismatch were built on a wrong guess
        self.cache(truths[:verified])
        self.res.retrievals += len(steps)
        self.calls += 1
        self.os3.observe_verification(verdict.seconds, len(steps))
        matched = len(steps) if bad is None else bad
        self.os3.observe_round(len(steps), matched)
        self.speculated += len(steps)
        self.matched += matched
        self.rounds += 1
        self.strides.append(len(steps))
        self.accepted.append(matched)
        self.retrieval_work_s += verdict.seconds
        t = self.lap("settle", t)
        if bad is None:
            return None
        self.rollbacks += 1
        wrong = steps[bad]
        self.truncate(wrong)
        redone = self.decode(wrong.key, self.g.correct(truths[bad]))
        self.lap("redo", t)
        return redone

    # -- the round loop --------------------------------------------------------------------------------
    def run(self) -> LoopResult:
        try:
            out = self._run()
        finally:
            if self._book is not None:  # the cache closes after this: no insert may outlive the request
                self._book.exception()
        if self.costs is not None and self.spec.os3:
            self.costs.learn(self.os3)
        return out

    def _run(self) -> LoopResult:
        self.plain_step(first=True)  # 0) the first step retrieves for real (the cache is empty)
        pending: tuple[list[Step[K, G]], Future[_Verdict[T]]] | None = None
        while not (self.done() and pending is None):
            self.clock()
            if self._book is not None and self._book.done():
                self.join_books()  # the evidence in hand (KNN-LM joins after its next key, not here)
            s = 0 if self.done() else self.next_stride()
            if s == 0 and pending is None:
                self.plain_step()
                continue
            # 1) speculate a round (async: on top of the round still being verified)
            steps = self.speculate(s) if s else []
            if not self.spec.asynchronous:
                verdict = self.verify([st.key for st in steps], [st.guess for st in steps])
                self.res.retrieval_s += verdict.seconds
                self.timeline["wait"] = self.timeline.get("wait", 0.0) + verdict.seconds
                self.settle(steps, verdict)  # 2) + 3)
                self.release(len(self.res.tokens))
                continue
            if pending is not None:
                prev, future = pending
                pending = None
                t = time.perf_counter()
                verdict = future.result()
                self.res.retrieval_s += self.lap("wait", t) - t  # only the wait is on the critical path
                if self.settle(prev, verdict) is not None:
                    self.release(len(self.res.tokens))
                    continue  # `steps` were built on a wrong guess: settle() dropped them
                self.release(steps[0].start if steps else len(self.res.tokens))
            if steps:
                pending = (steps, self.pool.submit(self.verify, [st.key for st in steps], [st.guess for st in steps]))
        self.join_books()
        self.release(len(self.res.tokens))
        self.res.stats.update(spec_accuracy=self.matched / self.speculated if self.speculated else 1.0,
                              speculated=self.speculated, matched=self.matched, rounds=self.rounds,
                              rollbacks=self.rollbacks, mean_stride=sum(self.strides) / max(1, len(self.strides)),
                              spec_s=self.spec_s, cache_size=self.g.cache_size(), retrieval_calls=self.calls,
                              plain_steps=self.plain_steps, paused_steps=self.paused,
                              timeline_s=dict(self.timeline),
                              # for the gateway's metrics (services/common/metrics.py: observe_speculation)
                              round_strides=list(self.strides), round_accepted=list(self.accepted),
                              shadow_lookups=self.shadow_lookups, shadow_hits=self.shadow_hits,
                              critical_retrieval_s=self.res.retrieval_s, retrieval_work_s=self.retrieval_work_s)
        return self.res
