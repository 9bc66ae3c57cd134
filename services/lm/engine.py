"""The LM engine behind the LM service (and the in-process runtime): named decoding sessions on one model.

A session is a KV cache (`decoder.Session`); `step` decodes greedily (or samples, `sampling.py`) after a whole
sequence, reusing the cache's longest common prefix, so a replayed step returns the same tokens (idempotent; a
sampled step when it carries a seed) and a shorter sequence is a rollback. A session unused for
`LmSettings.session_idle_s` expires: a gateway that died never closes its sessions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from services.common import env
from services.common.errors import InvalidRequest
from services.common.expiring import ExpiringTable
from services.lm.continuous_batching import BatchLimits
from services.lm.decoder import PREFILL_CHUNK, Emitted, Session
from services.lm.model import LoadedLM
from services.lm.prefix_cache import PrefixCache
from services.lm.ragged import Work, run
from services.lm.sampling import SamplingParams, sample_work
from services.lm.tree_attention import tree_step_work


@dataclass(frozen=True)
class StopSets:
    """Token ids that end a generation: EOS always; with `at_newline`, every id whose text has a newline."""

    eos: frozenset[int]
    newline: frozenset[int]

    @classmethod
    def of(cls, tokenizer: object) -> StopSets:
        eos = frozenset(t for t in [tokenizer.eos_token_id] if t is not None)  # type: ignore[attr-defined]
        vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
        ids = list(vocab.values())
        texts = tokenizer.batch_decode([[i] for i in ids])  # type: ignore[attr-defined]
        return cls(eos, frozenset(i for i, t in zip(ids, texts) if "\n" in t))

    def get(self, at_newline: bool) -> frozenset[int]:
        return self.eos | self.newline if at_newline else self.eos


@dataclass(frozen=True)
class LmSettings:
    """The LM service's engine settings (read from RALMSPEC_* once at start-up)."""

    max_sessions: int = 256  # sessions (KV caches) one replica holds; more opens answer RESOURCE_EXHAUSTED
    session_idle_s: float = 600.0  # a session unused this long expires (its gateway died without closing it)
    prefill_chunk: int = PREFILL_CHUNK  # a longer prefill is fed in chunks of this many tokens
    batch: BatchLimits = BatchLimits()  # continuous batching and admission (the service's scheduler)
    threads: int = 1  # torch intra-op threads: one keeps the ragged forward batch-invariant (ragged.py)
    batch_invariant: bool = True  # RALMSPEC_BATCH_INVARIANT
    prefix_cache_tokens: int = 8192  # RALMSPEC_PREFIX_CACHE_TOKENS: shared document prefixes kept (0 = off)

    @classmethod
    def from_env(cls) -> LmSettings:
        chunk = int(env.PREFILL_CHUNK.get())
        if chunk < 1:
            raise InvalidRequest(f"RALMSPEC_PREFILL_CHUNK must be positive, got {chunk}")
        return cls(session_idle_s=float(env.LM_SESSION_IDLE_S.get()), prefill_chunk=chunk,
                   batch=BatchLimits.from_env().validate(chunk), threads=int(env.THREADS.get()) or 1,
                   batch_invariant=env.BATCH_INVARIANT.get() != "0",
                   prefix_cache_tokens=max(0, int(env.PREFIX_CACHE_TOKENS.get())))


class LmEngine:
    """Sessions by id, expired when idle. Steps of one session must not run concurrently (the caller's order is
    the session's)."""

    def __init__(self, lm: LoadedLM, stops: StopSets | None = None, settings: LmSettings = LmSettings(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lm = lm
        lm.batch_invariant = settings.batch_invariant
        self.stops = stops or StopSets.of(lm.tokenizer)
        self.vocab: int = getattr(lm.model.config, "vocab_size")  # noqa: B009 - config is untyped
        self.settings = settings
        torch.set_num_threads(settings.threads)  # process-wide: the LM owns its process's torch
        self.sessions = ExpiringTable[Session]("LM session", settings.max_sessions, settings.session_idle_s, clock)
        self.prefixes = PrefixCache(settings.prefix_cache_tokens)  # shared by this engine's sessions

    def open(self, session: Session | None = None) -> str:
        return self.sessions.add(session or Session(self.lm, self.settings.prefill_chunk, self.prefixes))

    def kv_held(self) -> int:
        """KV slots all open sessions hold allocated (tokens)."""
        return sum(s.held for s in self.sessions.values())

    def session(self, sid: str) -> Session:
        return self.sessions.get(sid)

    def step(self, sid: str, seq: Sequence[int], n: int, stop_at_newline: bool, reprefill: bool = False,
             tree: Any = None, sampling: SamplingParams | None = None, prefix: int = 0) -> Emitted:
        """`step_work` run alone."""
        return run(self.lm, self.step_work(sid, seq, n, stop_at_newline, reprefill, tree, sampling, prefix))

    def step_work(self, sid: str, seq: Sequence[int], n: int, stop_at_newline: bool, reprefill: bool = False,
                  tree: Any = None, sampling: SamplingParams | None = None, prefix: int = 0) -> Work[Emitted]:
        """Up to n greedy tokens after `seq`, or sampled ones with `sampling` (temperature > 0). With a draft `tree`
        (`.tokens`, `.parents`), ONE forward verifies it and emits the accepted path plus the model's next token
        (REST), capped at n; sampled acceptance keeps the tokens distributed exactly as plain sampling's.
        `prefix`: the first `prefix` tokens (BOS + a document) are a shared prefix, made the canonical way and
        through the replica's prefix cache (`Session.shared_prefix_work`); 0: none.
        Checks everything (and finds the session) now, before any work: the returned work only decodes."""
        if n <= 0:
            raise InvalidRequest(f"max_new_tokens must be positive, got {n}")
        self._check(seq, n)
        if not 0 <= prefix < len(seq):
            raise InvalidRequest(f"prefix_tokens ({prefix}) must be at least 0 and below the sequence's length "
                                 f"({len(seq)} tokens): the shared prefix is the document in front of the context")
        if sampling is not None and sampling.validate().greedy:
            sampling = None
        stop = self.stops.get(stop_at_newline)
        session = self.session(sid)
        if tree is not None and reprefill:
            raise InvalidRequest("draft trees extend the KV cache; they cannot be combined with re-prefill")
        reuse = not reprefill or prefix > 0  # a re-prefill recomputes the prefix itself, then keeps it

        def work() -> Work[Emitted]:
            forwards, fed = session.forwards, session.fed_tokens
            yield from session.shared_prefix_work(seq, prefix, reuse=not reprefill)
            forwards, fed = session.forwards - forwards, session.fed_tokens - fed
            if tree is not None:
                out = yield from tree_step_work(session, seq, tree, max_new=n, stop=stop, sampling=sampling)
            elif sampling is not None:
                out = yield from sample_work(session, seq, n, stop, sampling, reuse=reuse)
            else:
                out = yield from session.greedy_work(seq, n, stop, reuse=reuse)
            out.forwards, out.fed = out.forwards + forwards, out.fed + fed  # the prefix's feeds count too
            return out

        return work()

    def state(self, sid: str, seq: Sequence[int]) -> tuple[np.ndarray, torch.Tensor]:
        """`state_work` run alone."""
        return run(self.lm, self.state_work(sid, seq))

    def state_work(self, sid: str, seq: Sequence[int]) -> Work[tuple[np.ndarray, torch.Tensor]]:
        """(hidden [d] float32, logits [vocab] float32) after `seq`: KNN-LM's datastore query (the final-norm
        output the LM head reads) and p_LM. The session's KV cache keeps its longest common prefix with `seq`."""
        self._check(seq, 1)  # the token this state predicts needs a position too
        session = self.session(sid)

        def work() -> Work[tuple[np.ndarray, torch.Tensor]]:
            hidden, logits = yield from session.state_after_work(seq)
            return hidden.numpy(), logits

        return work()

    def kv_need(self, sid: str, seq: Sequence[int], n: int, tree_nodes: int = 0) -> int:
        """KV slots a call may add to its session: what `seq` + n new tokens + a tree exceed its allocation by."""
        return max(0, len(seq) + n + tree_nodes - self.session(sid).held)

    def _check(self, seq: Sequence[int], n: int) -> None:
        if not seq:
            raise InvalidRequest("the token sequence is empty: a step needs at least one token")
        if min(seq) < 0 or max(seq) >= self.vocab:
            raise InvalidRequest(f"token ids must be in 0..{self.vocab - 1}")
        if len(seq) + n > self.lm.max_positions:
            raise InvalidRequest(f"{len(seq)} tokens + {n} new exceed the model's {self.lm.max_positions} positions")

    def close(self, sid: str) -> bool:
        return self.sessions.pop(sid)
