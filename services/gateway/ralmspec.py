"""RaLMSpec: speculative retrieval with batched verification, prefetch, OS³ and asynchronous verification.

The emitted tokens equal the baseline iterative RaLM's (`ralm.py`, kv-reuse): each step's query is formed
from the context at its start, and a step is kept only when every step before it guessed the true document,
so a kept step saw exactly the baseline's context and document.

One round:
  1) speculate: s steps, each = query -> cache top-1 (the guess) -> decode one retrieval stride with it;
  2) verify: one batched search of the s query keys on the real index; cache the verified passages;
  3) first mismatch at step j: keep steps < j, redo step j with the true document, drop the rest
     (the KV cache is cropped to the kept prefix, not rebuilt).
Asynchronous: round r+1 is speculated while round r is verified on a worker thread (FAISS, Lucene and torch
release the GIL); a failed verification of round r discards round r+1, which was built on a wrong guess.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import InvalidRequest
from services.gateway.backends import Cache
from services.gateway.os3 import OS3, OS3Config
from services.gateway.prefetch import PrefetchPolicy
from services.gateway.ralm import Emit, RalmConfig, RalmEngine, RalmResult
from services.retriever.retriever import Retriever
from services.retriever.types import Hit
from services.verifier.verification import NO_DOC, first_mismatch, top1


@dataclass(frozen=True)
class SpecConfig:
    stride: int = 3  # fixed speculation stride s (steps per verification) when OS³ is off (the paper's 3)
    prefetch: bool = False  # +P
    prefetch_k: int = 20
    os3: bool = False  # +S
    asynchronous: bool = False  # +A
    gamma_cap: float = 0.6
    gamma_window: int = 5
    max_stride: int = 16

    def validate(self) -> None:
        if not 1 <= self.stride <= self.max_stride:
            raise InvalidRequest(f"speculation stride must be in 1..{self.max_stride}, got {self.stride}")
        if self.prefetch_k <= 0:
            raise InvalidRequest(f"prefetch k must be positive, got {self.prefetch_k}")
        if not 0.0 < self.gamma_cap < 1.0:
            raise InvalidRequest(f"gamma cap must be in (0, 1), got {self.gamma_cap}")


PRESETS: dict[str, SpecConfig] = {  # the paper's ablation
    "ralmspec": SpecConfig(),
    "+P": SpecConfig(prefetch=True),
    "+S": SpecConfig(os3=True),
    "+A": SpecConfig(asynchronous=True),
    "+PSA": SpecConfig(prefetch=True, os3=True, asynchronous=True),
}


@dataclass
class _Step:
    start: int  # len(generated) when the step began
    key: Any  # the query key (dense vector or BM25 text)
    pid: int  # the document the step decoded with (a guess until verified)


@dataclass
class _Verdict:
    hits: list[list[Hit]]
    seconds: float


@dataclass
class _State:
    """Everything decoded so far; verified or not. Truncating it is the rollback."""

    tokens: list[int] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    steps: list[_Step] = field(default_factory=list)

    def truncate(self, step: _Step) -> None:
        """Drop `step` and everything after it."""
        self.tokens, self.gaps = self.tokens[: step.start], self.gaps[: step.start]
        self.steps = [s for s in self.steps if s.start < step.start]


class SpeculativeRalm:
    def __init__(self, engine: RalmEngine, verify_workers: int = 1) -> None:
        self.engine = engine
        # Asynchronous verification runs here; one worker per request in flight at once.
        self._pool = ThreadPoolExecutor(max_workers=verify_workers, thread_name_prefix="verify")

    def generate(self, prompt: str, cfg: RalmConfig, spec: SpecConfig, retriever: str = "exact",
                 emit: Emit | None = None) -> RalmResult:
        """One request; `emit` receives tokens once verified (never tokens built on an unverified guess)."""
        cfg.validate()
        spec.validate()
        eng = self.engine
        t0 = time.perf_counter()
        prompt_ids = eng.encode(prompt)
        eng.check_prompt(prompt_ids, cfg)
        ret = eng.retriever(retriever)
        sid = eng.backends.lm.open()
        cache = eng.backends.caches.open(retriever)
        try:
            res = _Run(eng, ret, prompt_ids, cfg, spec, sid, cache, self._pool, emit).execute()
        finally:
            cache.close()
            eng.backends.lm.close(sid)
        res.total_s = time.perf_counter() - t0
        return res


class _Run:
    """One request's speculative decoding (state + timers); `execute` is the round loop."""

    def __init__(self, eng: RalmEngine, ret: Retriever, prompt_ids: list[int], cfg: RalmConfig,
                 spec: SpecConfig, sid: str, cache: Cache, pool: ThreadPoolExecutor, emit: Emit | None) -> None:
        self.eng, self.ret, self.prompt_ids, self.cfg, self.spec = eng, ret, prompt_ids, cfg, spec
        self.sid, self.cache, self.pool, self.emit = sid, cache, pool, emit
        self.stops = eng.stops(cfg)
        self.prefetch = PrefetchPolicy(spec.prefetch, spec.prefetch_k)
        self.os3 = OS3(OS3Config(window=spec.gamma_window, gamma_cap=spec.gamma_cap, max_stride=spec.max_stride,
                                 initial_stride=spec.stride, asynchronous=spec.asynchronous))
        self.state = _State()
        self.res = RalmResult([], "", [], [])
        self.speculated = self.matched = self.rounds = self.rollbacks = self.calls = self.plain_steps = 0
        self.strides: list[int] = []
        self.spec_s = 0.0  # query embedding + cache lookup of speculation steps
        self.released = 0  # tokens handed to `emit` (all verified)

    # -- steps -----------------------------------------------------------------------------------------
    def done(self) -> bool:
        t = self.state.tokens
        return len(t) >= self.cfg.max_new_tokens or (bool(t) and t[-1] in self.stops)

    def key(self) -> Any:
        """The key of the query formed from the context so far."""
        return self.ret.embed([self.eng.query(self.prompt_ids + self.state.tokens, self.cfg)])[0]

    def decode(self, key: Any, pid: int) -> _Step:
        """Decode one retrieval stride with document `pid` in front of the context."""
        st = self.state
        step = _Step(len(st.tokens), key, pid)
        t = time.perf_counter()
        e = self.eng.decode_stride(self.sid, pid, self.prompt_ids, st.tokens, self.cfg)
        self.res.lm_s += time.perf_counter() - t
        self.res.lm_forwards += e.forwards
        self.res.lm_fed_tokens += e.fed
        st.tokens += e.tokens
        st.gaps += e.gaps
        st.steps.append(step)
        return step

    def speculate(self, s: int) -> list[_Step]:
        steps: list[_Step] = []
        while len(steps) < s and not self.done():
            t = time.perf_counter()
            key = self.key()
            hit = self.cache.lookup(key)
            self.spec_s += time.perf_counter() - t
            steps.append(self.decode(key, hit[0].pid if hit else NO_DOC))
            self.os3.observe_speculation(time.perf_counter() - t)
        return steps

    def next_stride(self) -> int:
        """Steps in the next round; 0 = a plain retrieval step (OS³ found speculation not worth it)."""
        return self.os3.next_stride() if self.spec.os3 else self.spec.stride

    def plain_step(self, first: bool = False) -> None:
        """Retrieve for real, then decode: the first step of a request (the cache is empty), and every step
        OS³ does not speculate. The cache is still consulted (shadow guess) so that γ stays current."""
        t = time.perf_counter()
        key = self.key()
        guess = self.cache.lookup(key)
        verdict = self.verify([key], [])
        self.res.retrieval_s += time.perf_counter() - t
        self.res.retrievals += 1
        self.calls += 1
        true = top1(verdict.hits)[0]
        self.cache.insert(self.prefetch.passages(verdict.hits))
        if guess:
            self.os3.observe_round(1, int(guess[0].pid == true))
        self.os3.observe_verification(verdict.seconds)
        self.decode(key, true)
        if not first:  # the first step's prompt prefill is no speculation cost: keep it out of `a`
            self.os3.observe_speculation(time.perf_counter() - t - verdict.seconds)
        self.plain_steps += 1
        self.release(len(self.state.tokens))

    def verify(self, keys: list[Any], guesses: list[int]) -> _Verdict:
        t = time.perf_counter()
        hits = self.eng.backends.verifier.verify(self.ret.name, keys, guesses, self.prefetch.depth)
        return _Verdict(hits, time.perf_counter() - t)

    def release(self, upto: int) -> None:
        """Hand the verified tokens before position `upto` to `emit`."""
        if self.emit and upto > self.released:
            self.emit(self.state.tokens[self.released : upto])
        self.released = max(self.released, upto)

    def settle(self, steps: list[_Step], verdict: _Verdict) -> _Step | None:
        """Apply a verification: cache the verified passages, count, and return the first wrong step
        (already redone with its true document), or None when every guess was right."""
        true = top1(verdict.hits)
        bad = first_mismatch([s.pid for s in steps], verdict.hits)
        verified = len(steps) if bad is None else bad + 1  # queries after a mismatch were built on a wrong guess
        self.cache.insert(self.prefetch.passages(verdict.hits[:verified]))
        self.res.retrievals += len(steps)
        self.calls += 1
        self.os3.observe_verification(verdict.seconds)
        matched = len(steps) if bad is None else bad
        self.os3.observe_round(len(steps), matched)
        self.speculated += len(steps)
        self.matched += matched
        self.rounds += 1
        self.strides.append(len(steps))
        if bad is None:
            return None
        self.rollbacks += 1
        wrong = steps[bad]
        self.state.truncate(wrong)
        return self.decode(wrong.key, true[bad])

    # -- the round loop --------------------------------------------------------------------------------
    def execute(self) -> RalmResult:
        self.plain_step(first=True)  # 0) the first step retrieves for real (the cache is empty), prefetching its top-k
        pending: tuple[list[_Step], Future[_Verdict]] | None = None
        on_time = self.cfg.clock()
        while not (self.done() and pending is None):
            on_time()
            s = 0 if self.done() else self.next_stride()
            if s == 0 and pending is None:
                self.plain_step()
                continue
            # 1) speculate a round (async: on top of the round still being verified)
            steps = self.speculate(s) if s else []
            if not self.spec.asynchronous:
                verdict = self.verify([st.key for st in steps], [st.pid for st in steps])
                self.res.retrieval_s += verdict.seconds
                self.settle(steps, verdict)  # 2) + 3)
                self.release(len(self.state.tokens))
                continue
            if pending is not None:
                prev, future = pending
                pending = None
                t = time.perf_counter()
                verdict = future.result()
                self.res.retrieval_s += time.perf_counter() - t  # only the wait is on the critical path
                if self.settle(prev, verdict) is not None:
                    self.release(len(self.state.tokens))
                    continue  # `steps` were built on a wrong guess: settle() dropped them
                self.release(steps[0].start if steps else len(self.state.tokens))
            if steps:
                pending = (steps, self.pool.submit(self.verify, [st.key for st in steps], [st.pid for st in steps]))
        self.release(len(self.state.tokens))
        return self.finish()

    def finish(self) -> RalmResult:
        res, st = self.res, self.state
        res.tokens, res.gaps = st.tokens, st.gaps
        res.doc_ids = [s.pid for s in st.steps]
        res.text = self.eng.answer(res.tokens, self.cfg)
        res.stats.update(spec_accuracy=self.matched / self.speculated if self.speculated else 1.0,
                         speculated=self.speculated, matched=self.matched, rounds=self.rounds,
                         rollbacks=self.rollbacks, mean_stride=sum(self.strides) / max(1, len(self.strides)),
                         spec_s=self.spec_s, cache_size=len(self.cache), retrieval_calls=self.calls,
                         plain_steps=self.plain_steps)
        return res
