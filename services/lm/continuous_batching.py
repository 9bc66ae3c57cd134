"""Continuous batching: one model forward per tick over the pending work of every session on a replica.

Each call (a `Step` or `State`) is a `Work` generator (`ragged.py`) that yields one feed at a time: a decode
token, a prefill chunk (`Session.chunk` tokens at most) or a draft tree. The scheduler thread keeps up to
`max_batch_seqs` calls running; every tick it takes one feed from each running call, within `max_batch_tokens`,
runs them as one ragged forward, and sends each call its result. A call joins at the next tick (no waiting for a
batch to finish) and leaves when its generator returns.

Policy (vLLM's token budget, decode first): single-token feeds of running calls always go (they are what holds
latency), then the larger feeds (prefill chunks, trees) oldest call first while the token budget lasts, and at
least one per tick, so no prefill waits behind a stream of decodes and no decode behind a prefill longer than one
chunk. Calls start in arrival order (FIFO); a call of a session that already has one running waits, so a
session's calls keep the caller's order. `max_batch_seqs = 1` is one call at a time in arrival order, which is
the replica's behaviour without batching.

Admission: past `max_queue` waiting calls, or when the KV slots all sessions hold plus what the queued calls will
add would pass `kv_budget_tokens`, `submit` raises Overloaded (RESOURCE_EXHAUSTED) with a retry hint, before any
work. A waiting call whose deadline has passed, or whose caller has gone, is dropped without running.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from services.common import env
from services.common.errors import DeadlineExceeded, InvalidRequest, Overloaded
from services.common.ops import Cancelled
from services.lm.model import LoadedLM
from services.lm.ragged import Fed, Feed, Work, forward

R = TypeVar("R")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchLimits:
    """Per-tick and per-replica bounds (RALMSPEC_MAX_BATCH_SEQS, _MAX_BATCH_TOKENS, _MAX_QUEUE, _KV_BUDGET_TOKENS)."""

    max_batch_seqs: int = 16
    max_batch_tokens: int = 512
    max_queue: int = 256
    kv_budget_tokens: int = 65_536

    @classmethod
    def from_env(cls) -> BatchLimits:
        return cls(int(env.MAX_BATCH_SEQS.get()), int(env.MAX_BATCH_TOKENS.get()), int(env.MAX_QUEUE.get()),
                   int(env.KV_BUDGET_TOKENS.get())).validate()

    def validate(self, chunk: int = 1) -> BatchLimits:
        if self.max_batch_seqs < 1 or self.max_queue < 0 or self.kv_budget_tokens < 1:
            raise InvalidRequest(f"batch limits must be positive, got {self}")
        if self.max_batch_tokens < max(chunk, self.max_batch_seqs):
            raise InvalidRequest(f"max_batch_tokens ({self.max_batch_tokens}) must hold a prefill chunk ({chunk}) "
                                 f"and a decode token per sequence ({self.max_batch_seqs})")
        return self


@dataclass
class _Call:
    key: str  # the session: calls of one key run one at a time, in order
    work: Work[Any]
    future: Future[Any]
    kv_need: int  # KV slots this call may add (reserved until it ends)
    deadline: float | None  # time.monotonic() after which nobody waits for it
    cancelled: threading.Event | None  # set when the caller has gone
    order: int
    submitted: float = 0.0  # the scheduler's clock at submit (its queue wait ends when it starts running)
    feed: Feed | None = None  # what it needs next (None: not started)


@dataclass
class BatchStats:
    forwards: int = 0
    rows: int = 0  # calls served, summed over forwards
    tokens: int = 0
    refused: int = 0
    expired: int = 0
    busy_s: float = 0.0
    step_s: float = 0.05  # moving average of one forward (the retry hint's unit)


class Scheduler:
    """The replica's one model thread. `submit` from any thread; results arrive on the returned futures."""

    def __init__(self, lm: LoadedLM, limits: BatchLimits, kv_held: Callable[[], int],
                 clock: Callable[[], float] = time.monotonic, *,
                 on_forward: Callable[[int, int, float], None] | None = None,
                 on_start: Callable[[float], None] | None = None) -> None:
        """Hooks (the service's metrics; called on the model thread): `on_forward(rows, tokens, seconds)` after each
        forward, `on_start(waited_s)` when a call leaves the queue to run."""
        self.lm, self.limits, self.kv_held, self.clock = lm, limits, kv_held, clock
        self.on_forward, self.on_start = on_forward, on_start
        self.stats = BatchStats()
        self._waiting: deque[_Call] = deque()
        self._running: list[_Call] = []
        self._reserved = 0  # KV slots promised to waiting and running calls
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="lm-batch", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def submit(self, key: str, work: Work[R], kv_need: int = 0, deadline: float | None = None,
               cancelled: threading.Event | None = None) -> Future[R]:
        fut: Future[R] = Future()
        with self._cond:
            if self._stopped:
                raise Overloaded("this LM replica is shutting down; retry on another one")
            if len(self._waiting) >= self.limits.max_queue:
                self.stats.refused += 1
                raise Overloaded(f"LM replica busy: {len(self._waiting)} calls queued (limit {self.limits.max_queue}); "
                                 f"retry in ~{self._hint_s():.1f} s")
            held = self.kv_held()
            if held + self._reserved + kv_need > self.limits.kv_budget_tokens:
                self.stats.refused += 1
                raise Overloaded(f"LM replica's KV cache budget is spent: {held} tokens held and {self._reserved} "
                                 f"promised of {self.limits.kv_budget_tokens}, this call needs {kv_need}; close idle "
                                 f"sessions or retry in ~{self._hint_s():.1f} s")
            self._reserved += kv_need
            self._waiting.append(_Call(key, work, fut, kv_need, deadline, cancelled, next(self._order), self.clock()))
            self._cond.notify()
        return fut

    def close(self) -> None:
        """Stop after the calls already submitted have finished."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()

    def _hint_s(self) -> float:
        waves = (len(self._waiting) + len(self._running)) / self.limits.max_batch_seqs + 1
        return max(0.1, waves * 8 * self.stats.step_s)  # ~8 forwards a call (a short stride)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._running and not self._stopped:
                    self._cond.wait()
                if self._stopped and not self._waiting and not self._running:
                    return
                started = self._admit()
            for call in started:  # outside the lock: a call's first step (finding its prefix) runs here
                self._advance(call, None)
            feeds = self._pick()
            if feeds:
                self._tick(feeds)

    def _admit(self) -> list[_Call]:
        """Move waiting calls into the running set, oldest first, and return them; drop those past their
        deadline. Holds the lock."""
        busy = {c.key for c in self._running}
        started = []
        for call in list(self._waiting):
            if call.deadline is not None and self.clock() > call.deadline:
                self._waiting.remove(call)
                self.stats.expired += 1
                self._finish(call, error=DeadlineExceeded("the call's deadline passed while it waited for the LM"))
                continue
            if call.cancelled is not None and call.cancelled.is_set():
                self._waiting.remove(call)
                self._finish(call, error=Cancelled("the caller went away while the call waited for the LM"))
                continue
            if len(self._running) >= self.limits.max_batch_seqs:
                break
            if call.key in busy:
                continue
            self._waiting.remove(call)
            busy.add(call.key)
            self._running.append(call)
            started.append(call)
            if self.on_start is not None:
                self.on_start(self.clock() - call.submitted)
        return started

    def _advance(self, call: _Call, fed: Fed | None) -> None:
        """Send the call its result (None: start it); record its next feed, or finish it."""
        try:
            call.feed = next(call.work) if fed is None else call.work.send(fed)
        except StopIteration as done:
            self._finish(call, result=done.value)
        except Exception as exc:  # noqa: BLE001 - the caller gets the error, the replica carries on
            self._finish(call, error=exc)

    def _finish(self, call: _Call, result: Any = None, error: BaseException | None = None) -> None:
        with self._cond:  # re-entrant: Condition wraps an RLock
            if call in self._running:
                self._running.remove(call)
            self._reserved -= call.kv_need
        call.feed = None
        if error is not None:
            call.future.set_exception(error)
        else:
            call.future.set_result(result)

    def _pick(self) -> list[_Call]:
        """This tick's calls: every single-token feed, then larger ones oldest first within the token budget."""
        with self._cond:
            ready = [c for c in self._running if c.feed is not None]
        small = [c for c in ready if len(c.feed.tokens) == 1]  # type: ignore[union-attr]
        budget = self.limits.max_batch_tokens - len(small)
        picked = list(small)
        for c in sorted((c for c in ready if len(c.feed.tokens) > 1), key=lambda c: c.order):  # type: ignore[union-attr]
            n = len(c.feed.tokens)  # type: ignore[union-attr]
            if n <= budget or len(picked) == len(small):
                picked.append(c)
                budget -= n
        return picked

    def _tick(self, calls: list[_Call]) -> None:
        feeds = [c.feed for c in calls]
        t = time.perf_counter()
        try:
            results: list[Fed | BaseException] = list(forward(self.lm, feeds))  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - one bad feed must not take its batch-mates down: retry alone
            if len(calls) == 1:
                results = [exc]
            else:
                log.warning("batched forward failed (%s); running its %d feeds one by one", exc, len(calls))
                results = []
                for f in feeds:
                    try:
                        results.append(forward(self.lm, [f])[0])  # type: ignore[list-item]
                    except Exception as one:  # noqa: BLE001
                        results.append(one)
        dt = time.perf_counter() - t
        st = self.stats
        fed = sum(len(c.feed.tokens) for c in calls if c.feed is not None)
        st.forwards += 1
        st.rows += len(calls)
        st.tokens += fed
        if self.on_forward is not None:
            self.on_forward(len(calls), fed, dt)
        st.busy_s += dt
        st.step_s = 0.9 * st.step_s + 0.1 * dt
        for call, res in zip(calls, results):
            if isinstance(res, BaseException):
                self._finish(call, error=res)
            else:
                self._advance(call, res)
