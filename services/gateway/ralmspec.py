"""RaLMSpec for iterative RaLM: speculative retrieval of documents, one per retrieval stride.

The granularity of the shared speculation loop (`speculation.py`: rounds, batched verification, rollback,
OS³, asynchronous verification) where a step is one retrieval stride: key = the query of the context at the
step's start (`_Query`: its text at once, its retriever key, the encoder's vector or BM25's text, computed on
the encoder thread), guess = the speculation cache's top-1 passage, truth = the real retriever's top-k (top-k > 1
with prefetch: the cache is filled with all of them). A guess agrees when it is the true top-1, so a kept step
decoded with the baseline's document: the emitted tokens equal the baseline iterative RaLM's (`ralm.py`,
kv-reuse).

The encoder is off a speculation step's critical path: the guess looks the cache up with the newest key
already encoded (the step's own when ready, else usually the previous step's: queries of consecutive strides
share most of their tokens),
while this step's key is encoded beside the LM and verified with the true key, so outputs do not change; only
γ may. A plain step (the baseline's) still waits for its key: its search needs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from services.common.ops import Call
from services.gateway.backends import Cache
from services.gateway.os3 import CostMemories
from services.gateway.prefetch import PrefetchPolicy
from services.gateway.ralm import Emit, RalmConfig, RalmEngine, RalmResult
from services.gateway.speculation import PRESETS, SpecConfig, SpeculationLoop, verification_pool
from services.retriever.retriever import Retriever
from services.retriever.types import NO_DOC, Hit, top1

__all__ = ["PRESETS", "SpecConfig", "SpeculativeRalm"]


@dataclass
class _Query:
    """A stride's query: its text, and its retriever key once the encoder thread has it."""

    text: str
    encoded: Future[Any]

    def key(self) -> Any:
        return self.encoded.result()


@dataclass
class _Strides:
    """Granularity: one retrieval stride of iterative RaLM (keys: query keys; guesses: passage ids)."""

    eng: RalmEngine
    ret: Retriever
    prompt_ids: list[int]
    cfg: RalmConfig
    sid: str
    cache: Cache
    prefetch: PrefetchPolicy
    res: RalmResult
    clock: Callable[[], None]  # the request's deadline and cancellation, between the LM steps of a drafted stride
    encoder: Executor  # encodes queries beside the LM (never waits on anything itself: no deadlock)
    # RaLMSpec's code caps γ at 0.6: a wrong document costs a re-prefill, more than the mean step OS³ prices it at
    gamma_cap: float = 0.6

    def __post_init__(self) -> None:
        self.stops = self.eng.stops(self.cfg)
        self.floor = self.eng.query_floor(self.prompt_ids)
        self.known: Any = None  # the newest retriever key already encoded (what guesses look the cache up with)

    def done(self, tokens: list[int]) -> bool:
        return len(tokens) >= self.cfg.max_new_tokens or (bool(tokens) and tokens[-1] in self.stops)

    def key(self, tokens: list[int]) -> _Query:
        text = self.eng.query(self.prompt_ids + tokens, self.cfg, self.floor)
        return _Query(text, self.encoder.submit(lambda: self.ret.embed([text])[0]))

    def _resolved(self, q: _Query) -> Any:
        key = q.key()
        self.known = key
        return key

    def guess(self, key: _Query) -> int | None:
        """The cache's top-1 for this step's key if it is encoded already, else for the newest key that is (only
        the first guess waits for an encoding)."""
        vec = self._resolved(key) if key.encoded.done() or self.known is None else self.known
        hit = self.cache.lookup(vec)
        return hit[0].pid if hit else None

    def decode(self, key: _Query, guess: int | None, tokens: list[int]) -> tuple[list[int], list[float]]:
        t = time.perf_counter()
        e = self.eng.decode_stride(self.sid, NO_DOC if guess is None else guess, self.prompt_ids, tokens, self.cfg,
                                   clock=self.clock)
        self.res.lm_s += time.perf_counter() - t
        self.res.lm_forwards += e.forwards
        self.res.lm_fed_tokens += e.fed
        self.res.drafted += e.drafted
        self.res.draft_accepted += e.draft_accepted
        return e.tokens, e.gaps

    def verify(self, keys: list[_Query], guesses: list[int | None]) -> list[list[Hit]]:
        true_keys = [self._resolved(q) for q in keys]  # on the verification thread (asynchronous) or inline
        return self.eng.backends.verifier.verify(self.ret.name, true_keys,
                                                 [NO_DOC if g is None else g for g in guesses], self.prefetch.depth)

    def retrieve(self, key: _Query) -> list[Hit]:
        return self.ret.search_embedded([self._resolved(key)], self.prefetch.depth)[0]

    def agrees(self, key: _Query, guess: int | None, truth: list[Hit], emitted: list[int] | None) -> bool:
        return guess == self.correct(truth)

    def correct(self, truth: list[Hit]) -> int:
        return top1([truth])[0]

    def remember(self, truths: list[list[Hit]]) -> None:
        self.cache.insert(self.prefetch.passages(truths))

    def cache_size(self) -> int:
        return len(self.cache)


class SpeculativeRalm:
    def __init__(self, engine: RalmEngine, verify_workers: int = 1,
                 busy: Callable[[], bool] = lambda: False) -> None:
        self.engine, self.busy = engine, busy  # busy: speculation pauses (see SpeculationLoop)
        # Asynchronous verification, plain steps' bookkeeping and query encoding run here; one worker each per
        # request in flight.
        self._pool = verification_pool(verify_workers)
        self._books = verification_pool(verify_workers, "books")
        self._encoder = verification_pool(verify_workers, "encode")
        self._costs = CostMemories()  # OS³'s a and b per (retriever, stride, +A, +P), from earlier requests

    def generate(self, prompt: str, cfg: RalmConfig, spec: SpecConfig, retriever: str = "exact",
                 emit: Emit | None = None, call: Call | None = None) -> RalmResult:
        """One request; `emit` receives tokens once verified (never tokens built on an unverified guess); `call`:
        the client's deadline and cancellation."""
        cfg.validate()
        spec.validate()
        on_time = cfg.clock(call)
        eng = self.engine
        t0 = time.perf_counter()
        prompt_ids = eng.encode(prompt)
        eng.check_prompt(prompt_ids, cfg)
        ret = eng.retriever(retriever)
        on_time()  # a deadline already past opens no session and takes no first step
        res = RalmResult([], "", [], [])
        with ExitStack() as opened:  # whatever opened is closed, also when a later open fails
            sid = eng.backends.lm.open()
            opened.callback(eng.backends.lm.close, sid)
            cache = eng.backends.caches.open(retriever)
            opened.callback(cache.close)
            steps = _Strides(eng, ret, prompt_ids, cfg, sid, cache, PrefetchPolicy(spec.prefetch, spec.prefetch_k), res,
                             on_time, self._encoder)
            out = SpeculationLoop(steps, spec, self._pool, on_time, emit, self._books, self.busy,
                                  self._costs((retriever, cfg.stride, spec.asynchronous, spec.prefetch))).run()
        res.tokens, res.gaps = out.tokens, out.gaps
        res.doc_ids = [NO_DOC if st.guess is None else st.guess for st in out.steps]
        res.retrieval_s, res.retrievals = out.retrieval_s, out.retrievals
        res.text = eng.answer(res.tokens, cfg)
        res.stats.update(out.stats)
        res.total_s = time.perf_counter() - t0
        return res
