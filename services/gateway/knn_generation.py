"""KNN-LM serving: the baseline (a real datastore search at every token) and RaLMSpec's speculative version.

Baseline, per token: h, logits = the LM's final hidden state and logits after the context; neighbours = the
datastore's k nearest entries to h; token = argmax of λ·p_kNN + (1 − λ)·p_LM (`services/lm/knn_mixing.py`).

Speculative: the token granularity of the shared speculation loop (`speculation.py`). The request's cache
holds the datastore entries that FOLLOW the verified neighbours (entry i+1 continues entry i's text): the
next token's neighbours are mostly the successors of this token's. A step guesses its neighbours by an exact
search of the cache, emits the token they give, and is verified in a batch of s hidden states on the real
index. The paper's relaxed rule: a step is correct when its token equals the token the true neighbours give
(not when the neighbour sets are equal), which still keeps every emitted token equal to the baseline's: a
kept step saw the baseline's context, so its hidden state and logits are the baseline's, and its token is
the one the true neighbours give. Rollback, OS³ and asynchronous verification come with the loop.
Prefetch (+P) caches the n = 10 entries after each neighbour (covers a stride of up to 10 tokens);
without it only the next entry (n = 1).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from services.common.errors import InvalidRequest
from services.common.ops import Call
from services.datastore.knn_cache import check_successors
from services.gateway.os3 import CostMemories
from services.gateway.ralm import DEADLINE_S, MAX_NEW_TOKENS, Emit, RalmResult, deadline_clock
from services.gateway.speculation import SpecConfig, SpeculationLoop, verification_pool
from services.lm.engine import StopSets
from services.lm.knn_mixing import next_token
from services.lm.types import KnnLmConfig
from services.retriever.knn_index import KnnDatastore
from services.retriever.types import Neighbours


class KnnLmBackend(Protocol):
    """The LM as KNN-LM needs it (`LmEngine` in process, `RemoteLm` over the LM service)."""

    def open(self) -> str: ...

    def state(self, sid: str, seq: Sequence[int]) -> tuple[np.ndarray, torch.Tensor]:
        """(hidden [d] float32, logits [vocab] float32) after `seq`; the session keeps its KV cache."""
        ...

    def close(self, sid: str) -> bool: ...


class KnnSearch(Protocol):
    def neighbours(self, queries: np.ndarray, k: int, index: str = "exact") -> list[Neighbours]:
        """The true k nearest entries of each row of queries [q, d] float32, in one batched search."""
        ...


class KnnCache(Protocol):
    """One request's speculation cache (`services/datastore/knn_cache.py`, here or in the datastore service)."""

    def insert_after(self, ids: np.ndarray, n: int) -> int: ...

    def neighbours(self, query: np.ndarray, k: int) -> Neighbours: ...

    def __len__(self) -> int: ...

    def close(self) -> None: ...


@dataclass
class KnnBackends:
    lm: KnnLmBackend
    search: KnnSearch  # the baseline's per-token searches
    verifier: KnnSearch  # speculation's batched verifications (and its plain steps)
    caches: Callable[[], KnnCache]  # a new per-request cache


def local_knn_backends(lm: KnnLmBackend, datastore: KnnDatastore) -> KnnBackends:
    from services.datastore.knn_cache import KnnCache as LocalCache  # the protocol above shares its name

    return KnnBackends(lm, datastore, datastore, lambda: LocalCache(datastore))


# Datastore entries one verified token may add to its request's cache (k neighbours x successors each; the
# defaults 1024 x 10 = 10240). An entry costs its key (d float32: 2.3 KB at d = 576) and a scan in every later
# lookup; a verification of up to 16 tokens at the limit caches <= 262k entries (~600 MB), at 4096 x 64 it was
# up to 4.2M (~9.7 GB). Measured on tiny (40k entries, which caps the cache): inserting a 3-token verification at
# 16384 per token took ~0.2 s, then a lookup 8-15 ms.
MAX_CACHED_PER_TOKEN = 16_384


@dataclass(frozen=True)
class KnnRequest:
    max_new_tokens: int = 64
    stop_at_newline: bool = False  # language modelling: only EOS stops
    knn: KnnLmConfig = KnnLmConfig()
    successors: int = 10  # entries cached after each verified neighbour with prefetch (the paper's n)
    deadline_s: float | None = None  # give up (DEADLINE_EXCEEDED) when a request runs longer than this

    def validate(self, spec: SpecConfig | None = None) -> None:
        """The request's rules; with `spec` (speculation) its cache's cost too."""
        self.knn.validate()
        MAX_NEW_TOKENS.check("max_new_tokens", self.max_new_tokens)
        check_successors(self.successors)
        if self.deadline_s is not None:
            DEADLINE_S.check("deadline_s", self.deadline_s)
        if spec is not None and self.knn.k * self.cached_successors(spec) > MAX_CACHED_PER_TOKEN:
            raise InvalidRequest(
                f"knn.k x knn.successors = {self.knn.k} x {self.successors} = {self.knn.k * self.successors} "
                f"datastore entries cached per verified token; the limit is {MAX_CACHED_PER_TOKEN}: lower k or "
                "successors (successors apply with speculation.prefetch)")

    def cached_successors(self, spec: SpecConfig) -> int:
        """Entries cached after each verified neighbour: `successors` with prefetch (+P), else the next one."""
        return self.successors if spec.prefetch else 1


@dataclass
class _Key:
    hidden: np.ndarray  # [d] float32: the datastore query
    logits: torch.Tensor  # [vocab]: p_LM


class KnnLmEngine:
    """KNN-LM requests over one set of backends (in process or remote: the same tokens either way)."""

    def __init__(self, tokenizer: object, backends: KnnBackends, stops: StopSets | None = None,
                 verify_workers: int = 1, busy: Callable[[], bool] = lambda: False) -> None:
        self.tok, self.backends, self.busy = tokenizer, backends, busy  # busy: speculation pauses
        self.stop_sets = stops or StopSets.of(tokenizer)
        self._pool = verification_pool(verify_workers)
        self._books = verification_pool(verify_workers, "books")
        self._costs = CostMemories()  # OS³'s a and b per (index, k, +A, +P), from earlier requests

    def encode(self, text: str) -> list[int]:
        ids = list(self.tok(text, add_special_tokens=False).input_ids)  # type: ignore[operator]
        if not ids:
            raise InvalidRequest("the prompt is empty")
        return ids

    def decode(self, tokens: Sequence[int]) -> str:
        return str(self.tok.decode(list(tokens), skip_special_tokens=True))  # type: ignore[attr-defined]

    @staticmethod
    def token(key: _Key, found: Neighbours | None, knn: KnnLmConfig) -> tuple[int, float]:
        if found is None:
            return next_token(key.logits, np.empty(0, np.float32), np.empty(0, np.int64), knn)
        return next_token(key.logits, found.dists, found.tokens, knn)

    def _finish(self, res: RalmResult, t0: float) -> RalmResult:
        res.text = self.decode(res.tokens)
        res.total_s = time.perf_counter() - t0
        return res

    def generate(self, prompt: str, req: KnnRequest, emit: Emit | None = None, call: Call | None = None) -> RalmResult:
        """The baseline: one real search per token (`emit` gets each token as it is decided; `call`: the client's
        deadline and cancellation)."""
        req.validate()
        on_time = deadline_clock(req.deadline_s, call)
        t0 = time.perf_counter()
        prompt_ids = self.encode(prompt)
        stops = self.stop_sets.get(req.stop_at_newline)
        lm, knn = self.backends.lm, req.knn
        res = RalmResult([], "", [], [])
        on_time()  # a deadline already past opens no session
        sid = lm.open()
        try:
            while len(res.tokens) < req.max_new_tokens and not (res.tokens and res.tokens[-1] in stops):
                on_time()
                t = time.perf_counter()
                hidden, logits = lm.state(sid, prompt_ids + res.tokens)
                t1 = time.perf_counter()
                found = self.backends.search.neighbours(hidden[None], knn.k, knn.index)[0]
                res.lm_s += t1 - t
                res.retrieval_s += time.perf_counter() - t1
                res.retrievals += 1
                res.lm_forwards += 1
                tok, gap = self.token(_Key(hidden, logits), found, knn)
                res.tokens.append(tok)
                res.gaps.append(gap)
                if emit:
                    emit([tok])
        finally:
            lm.close(sid)
        return self._finish(res, t0)

    def speculate(self, prompt: str, req: KnnRequest, spec: SpecConfig, emit: Emit | None = None,
                  call: Call | None = None) -> RalmResult:
        """RaLMSpec for KNN-LM: the same tokens as `generate`, with batched verification of cached guesses."""
        req.validate(spec)
        spec.validate()
        on_time = deadline_clock(req.deadline_s, call)
        t0 = time.perf_counter()
        prompt_ids = self.encode(prompt)
        res = RalmResult([], "", [], [])
        on_time()  # a deadline already past opens no session and takes no first step
        with ExitStack() as opened:  # whatever opened is closed, also when a later open fails
            sid = self.backends.lm.open()
            opened.callback(self.backends.lm.close, sid)
            cache = self.backends.caches()
            opened.callback(cache.close)
            steps = _TokenSteps(self, prompt_ids, req, sid, cache, req.cached_successors(spec), res)
            out = SpeculationLoop(steps, spec, self._pool, on_time, emit, self._books, self.busy,
                                  self._costs((req.knn.index, req.knn.k, spec.asynchronous, spec.prefetch))).run()
        res.tokens, res.gaps = out.tokens, out.gaps
        res.retrieval_s, res.retrievals = out.retrieval_s, out.retrievals
        res.stats.update(out.stats)
        return self._finish(res, t0)


@dataclass
class _TokenSteps:
    """Granularity: one token of KNN-LM (keys: hidden state + logits; guesses and truths: neighbours)."""

    eng: KnnLmEngine
    prompt_ids: list[int]
    req: KnnRequest
    sid: str
    cache: KnnCache
    successors: int  # entries cached after each verified neighbour
    res: RalmResult
    # A wrong token costs exactly one LM step (what OS³'s a measures), and the token rule is right ~90-100% of the
    # time at 600k entries: the paper's 0.6 cap kept OS³ from ever speculating where it pays.
    gamma_cap: float = 0.95

    def __post_init__(self) -> None:
        self.stops = self.eng.stop_sets.get(self.req.stop_at_newline)

    def done(self, tokens: list[int]) -> bool:
        return len(tokens) >= self.req.max_new_tokens or (bool(tokens) and tokens[-1] in self.stops)

    def key(self, tokens: list[int]) -> _Key:
        t = time.perf_counter()
        hidden, logits = self.eng.backends.lm.state(self.sid, self.prompt_ids + tokens)
        self.res.lm_s += time.perf_counter() - t
        self.res.lm_forwards += 1
        return _Key(hidden, logits)

    def guess(self, key: _Key) -> Neighbours | None:
        return self.cache.neighbours(key.hidden, self.req.knn.k) if len(self.cache) else None

    def decode(self, key: _Key, guess: Neighbours | None, tokens: list[int]) -> tuple[list[int], list[float]]:
        tok, gap = self.eng.token(key, guess, self.req.knn)
        return [tok], [gap]

    def verify(self, keys: list[_Key], guesses: list[Neighbours | None]) -> list[Neighbours]:
        knn = self.req.knn
        return self.eng.backends.verifier.neighbours(np.stack([k.hidden for k in keys]), knn.k, knn.index)

    def retrieve(self, key: _Key) -> Neighbours:
        knn = self.req.knn
        return self.eng.backends.search.neighbours(key.hidden[None], knn.k, knn.index)[0]

    def agrees(self, key: _Key, guess: Neighbours | None, truth: Neighbours, emitted: list[int] | None) -> bool:
        # the paper's relaxed rule: the guessed neighbours may differ as long as they emit the same token
        knn = self.req.knn
        mine = emitted[0] if emitted else self.eng.token(key, guess, knn)[0]
        return mine == self.eng.token(key, truth, knn)[0]

    def correct(self, truth: Neighbours) -> Neighbours:
        return truth

    def remember(self, truths: list[Neighbours]) -> None:
        self.cache.insert_after(np.concatenate([t.ids for t in truths]), self.successors)

    def cache_size(self) -> int:
        return len(self.cache)
