"""KNN-LM serving: the baseline (a real datastore search at every token) and RaLMSpec's speculative version.

Baseline, per token: h, logits = the LM's final hidden state and logits after the context; neighbours = the
datastore's k nearest entries to h; token = argmax of λ·p_kNN + (1 − λ)·p_LM (`services/lm/knnlm.py`).

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from services.common.errors import InvalidRequest
from services.gateway.ralm import Emit, RalmResult
from services.gateway.speculation import SpecConfig, SpeculationLoop, verification_pool
from services.lm.engine import LmEngine, StopSets
from services.lm.knnlm import KnnLmConfig, next_token

Neighbours = tuple[np.ndarray, np.ndarray]  # (squared L2 distances [m] float32 ascending, entry ids [m] int64)


class KnnLmBackend(Protocol):
    """The LM as KNN-LM needs it: the final hidden state and the logits after a sequence."""

    def open(self) -> str: ...

    def state(self, sid: str, seq: Sequence[int]) -> tuple[np.ndarray, torch.Tensor]:
        """(hidden [d] float32, logits [vocab] float32) after `seq`; the session keeps its KV cache."""
        ...

    def close(self, sid: str) -> bool: ...


class Datastore(Protocol):
    values: np.ndarray  # [N] the token that followed each entry's context

    def search(self, queries: np.ndarray, k: int, index: str = "exact") -> tuple[np.ndarray, np.ndarray]: ...

    def successors(self, ids: np.ndarray, n: int) -> np.ndarray: ...


class Cache(Protocol):
    def insert(self, ids: np.ndarray) -> int: ...

    def lookup(self, query: np.ndarray, k: int) -> Neighbours: ...

    def __len__(self) -> int: ...


@dataclass
class LocalKnnLm:
    """In-process KnnLmBackend over an LmEngine's sessions."""

    engine: LmEngine

    def open(self) -> str:
        return self.engine.open()

    def state(self, sid: str, seq: Sequence[int]) -> tuple[np.ndarray, torch.Tensor]:
        hidden, logits = self.engine.session(sid).state_after(seq)
        return hidden.numpy(), logits

    def close(self, sid: str) -> bool:
        return self.engine.close(sid)


@dataclass(frozen=True)
class KnnRequest:
    max_new_tokens: int = 64
    stop_at_newline: bool = False  # language modelling: only EOS stops
    knn: KnnLmConfig = KnnLmConfig()
    successors: int = 10  # entries cached after each verified neighbour with prefetch (the paper's n)

    def validate(self) -> None:
        self.knn.validate()
        if self.max_new_tokens <= 0:
            raise InvalidRequest(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.successors <= 0:
            raise InvalidRequest(f"successors must be positive, got {self.successors}")


@dataclass
class _Key:
    hidden: np.ndarray  # [d] float32: the datastore query
    logits: torch.Tensor  # [vocab]: p_LM


class KnnLmEngine:
    """KNN-LM requests over one LM backend, one datastore and a per-request cache factory."""

    def __init__(self, tokenizer: object, lm: KnnLmBackend, datastore: Datastore, new_cache: type | None = None,
                 stops: StopSets | None = None, verify_workers: int = 1) -> None:
        self.tok, self.lm, self.ds = tokenizer, lm, datastore
        if new_cache is None:
            from services.datastore.knn_cache import KnnCache

            new_cache = KnnCache
        self.new_cache = new_cache
        self.stop_sets = stops or StopSets.of(tokenizer)
        self._pool = verification_pool(verify_workers)

    def encode(self, text: str) -> list[int]:
        ids = list(self.tok(text, add_special_tokens=False).input_ids)  # type: ignore[operator]
        if not ids:
            raise InvalidRequest("the prompt is empty")
        return ids

    def neighbours(self, hidden: np.ndarray, knn: KnnLmConfig) -> list[Neighbours]:
        """The true neighbours of each row of hidden [q, d], in one batched search."""
        dists, ids = self.ds.search(np.ascontiguousarray(hidden, dtype=np.float32), knn.k, knn.index)
        return [(dists[i], ids[i]) for i in range(len(ids))]

    def token(self, key: _Key, found: Neighbours | None, knn: KnnLmConfig) -> tuple[int, float]:
        if found is None:
            return next_token(key.logits, np.empty(0, np.float32), np.empty(0, np.int64), knn)
        dists, ids = found
        values = np.where(ids >= 0, self.ds.values[np.maximum(ids, 0)], -1)
        return next_token(key.logits, dists, values, knn)

    def _finish(self, res: RalmResult, t0: float) -> RalmResult:
        res.text = str(self.tok.decode(res.tokens, skip_special_tokens=True))  # type: ignore[attr-defined]
        res.total_s = time.perf_counter() - t0
        return res

    def generate(self, prompt: str, req: KnnRequest) -> RalmResult:
        """The baseline: one real search per token."""
        req.validate()
        t0 = time.perf_counter()
        prompt_ids = self.encode(prompt)
        stops = self.stop_sets.get(req.stop_at_newline)
        res = RalmResult([], "", [], [])
        sid = self.lm.open()
        try:
            while len(res.tokens) < req.max_new_tokens and not (res.tokens and res.tokens[-1] in stops):
                t = time.perf_counter()
                hidden, logits = self.lm.state(sid, prompt_ids + res.tokens)
                t1 = time.perf_counter()
                found = self.neighbours(hidden[None], req.knn)[0]
                res.lm_s += t1 - t
                res.retrieval_s += time.perf_counter() - t1
                res.retrievals += 1
                tok, gap = self.token(_Key(hidden, logits), found, req.knn)
                res.tokens.append(tok)
                res.gaps.append(gap)
        finally:
            self.lm.close(sid)
        return self._finish(res, t0)

    def speculate(self, prompt: str, req: KnnRequest, spec: SpecConfig, emit: Emit | None = None) -> RalmResult:
        """RaLMSpec for KNN-LM: the same tokens as `generate`, with batched verification of cached guesses."""
        req.validate()
        spec.validate()
        t0 = time.perf_counter()
        prompt_ids = self.encode(prompt)
        res = RalmResult([], "", [], [])
        sid = self.lm.open()
        try:
            steps = _TokenSteps(self, prompt_ids, req, sid, self.new_cache(self.ds),
                                req.successors if spec.prefetch else 1, res)
            out = SpeculationLoop(steps, spec, self._pool, emit=emit).run()
        finally:
            self.lm.close(sid)
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
    cache: Cache
    successors: int  # entries cached after each verified neighbour
    res: RalmResult

    def __post_init__(self) -> None:
        self.stops = self.eng.stop_sets.get(self.req.stop_at_newline)

    def done(self, tokens: list[int]) -> bool:
        return len(tokens) >= self.req.max_new_tokens or (bool(tokens) and tokens[-1] in self.stops)

    def key(self, tokens: list[int]) -> _Key:
        t = time.perf_counter()
        hidden, logits = self.eng.lm.state(self.sid, self.prompt_ids + tokens)
        self.res.lm_s += time.perf_counter() - t
        self.res.lm_forwards += 1
        return _Key(hidden, logits)

    def guess(self, key: _Key) -> Neighbours | None:
        return self.cache.lookup(key.hidden, self.req.knn.k) if len(self.cache) else None

    def decode(self, key: _Key, guess: Neighbours | None, tokens: list[int]) -> tuple[list[int], list[float]]:
        tok, gap = self.eng.token(key, guess, self.req.knn)
        return [tok], [gap]

    def verify(self, keys: list[_Key], guesses: list[Neighbours | None]) -> list[Neighbours]:
        return self.eng.neighbours(np.stack([k.hidden for k in keys]), self.req.knn)

    def agrees(self, key: _Key, guess: Neighbours | None, truth: Neighbours) -> bool:
        knn = self.req.knn
        return self.eng.token(key, guess, knn)[0] == self.eng.token(key, truth, knn)[0]

    def correct(self, truth: Neighbours) -> Neighbours:
        return truth

    def remember(self, truths: list[Neighbours]) -> None:
        ids = np.concatenate([ids for _, ids in truths])
        self.cache.insert(self.eng.ds.successors(ids, self.successors))

    def cache_size(self) -> int:
        return len(self.cache)
