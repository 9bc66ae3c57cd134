"""Cross-request coalescing: concurrent calls with the same group key share one batched call, and each caller gets
back its own slice of the results.

Pure asyncio (no index, no model), so both the retriever replica (`Search`, `SearchKnn` -> one FAISS or Lucene
call) and the verifier (`Verify`, `VerifyKnn` -> one retriever call) use it.

Rules:
- window 0 turns coalescing off: each submit is its own call, with no waiting.
- Without `slots` (the verifier): a batch opens at its first caller and closes `window_ms` later.
- With `slots` (the retriever: its pool threads), no timer: a caller that finds one of its group's `slots`
  free takes it alone, at once; callers that find every slot busy join one batch, which goes when a slot frees.
  They could not have started earlier, so their company costs no time. On this CPU waiting for company while a
  slot was free never paid, and merging callers that could have run side by side on free threads lost that
  parallelism (bench/results/coalescing.md): coalescing pays on a busy replica.
- Either way a batch closes at once when it holds `max_batch` items; a caller that would push it past
  `max_batch` closes it and opens the next one; a caller with `max_batch` items or more runs alone.
- Only callers with equal group keys share a batch. The key must hold everything that makes a call valid or
  invalid as a whole (retriever and k, vector size), and callers validate their own items before submitting:
  then a batch fails only for a reason every member would have failed for alone, and that error goes to each.
- A caller cancelled before its batch runs (deadline, disconnect) leaves the batch; a batch left empty is not run.
- A batch runs as part of its callers' request (`tracing.py`) when they all serve one; a merged batch, of none.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from services.common import env, tracing

K = TypeVar("K", bound=Hashable)
I = TypeVar("I")  # noqa: E741 - item
R = TypeVar("R")

MAX_BATCH = 1024  # queries in one batched call (also the most one Search / SearchKnn call may send)
WINDOW_MS = 2.0  # the window measured in bench/results/coalescing.md (the verifier's default is now 0: it lost)


@dataclass(frozen=True)
class CoalesceSettings:
    window_ms: float = WINDOW_MS  # how long a batch waits for company (without slots); 0 = off
    max_batch: int = MAX_BATCH  # items that close a batch at once

    @classmethod
    def from_env(cls, var: env.EnvVar = env.COALESCE_MS) -> CoalesceSettings:
        """From `var`: RALMSPEC_COALESCE_MS (the retriever: > 0 = on) or RALMSPEC_VERIFY_WINDOW_MS (the verifier)."""
        ms = float(var.get())
        if not 0 <= ms <= 1000:
            raise ValueError(f"{var.name} must be in [0, 1000] ms, got {ms}")
        return cls(window_ms=ms)


@dataclass
class _Caller(Generic[I, R]):
    items: Sequence[I]
    future: asyncio.Future[list[R]]
    request_id: str | None = field(default_factory=tracing.current)


@dataclass
class _Batch(Generic[K, I, R]):
    key: K
    callers: list[_Caller[I, R]] = field(default_factory=list)
    size: int = 0  # items of all callers
    timer: asyncio.TimerHandle | None = None  # its window (no slots); None while it waits for a free slot


@dataclass
class CoalesceStats:
    calls: int = 0  # submits
    batches: int = 0  # batched calls run (each one `run`)
    items: int = 0  # items sent in those calls

    @property
    def mean_batch(self) -> float:
        """Mean items per batched call."""
        return self.items / self.batches if self.batches else 0.0


class Coalescer(Generic[K, I, R]):
    """`await submit(key, items)` -> one result per item, computed by `run(key, all items of the batch)`, which
    must return one result per item, in order. `slots`: batched calls of one group that may run at once (the
    threads behind `run`); None = no limit."""

    def __init__(self, run: Callable[[K, list[I]], Awaitable[list[R]]],
                 settings: CoalesceSettings = CoalesceSettings(), slots: int | None = None) -> None:
        if settings.window_ms < 0 or settings.max_batch < 1 or (slots is not None and slots < 1):
            raise ValueError(f"bad coalescing settings {settings}, slots {slots}")
        self.run = run
        self.window_s = settings.window_ms / 1000
        self.max_batch = settings.max_batch
        self.slots = slots
        self.stats = CoalesceStats()
        self._open: dict[K, _Batch[K, I, R]] = {}  # the batch still taking callers, per key
        self._in_flight: dict[K, int] = {}  # batched calls launched and not finished, per key
        self._tasks: set[asyncio.Task[None]] = set()  # strong references until each batch is done

    async def submit(self, key: K, items: Sequence[I]) -> list[R]:
        self.stats.calls += 1
        if not items:
            return []
        alone = self.slots is not None and not self._busy(key) and key not in self._open  # a free slot: take it
        if self.window_s == 0 or len(items) >= self.max_batch or alone:
            self._started(key, len(items))
            try:
                return await self._checked(key, list(items))
            finally:
                self._finished(key)
        batch = self._open.get(key)
        if batch is not None and batch.size + len(items) > self.max_batch:
            self._launch(batch)
            batch = None
        if batch is None:
            batch = self._open[key] = _Batch(key)
            if self.slots is None:
                batch.timer = asyncio.get_running_loop().call_later(self.window_s, self._window_passed, batch)
            # (with slots, every slot is busy: it takes callers until one frees, `_finished`)
        caller: _Caller[I, R] = _Caller(items, asyncio.get_running_loop().create_future())
        batch.callers.append(caller)
        batch.size += len(items)
        if batch.size >= self.max_batch:
            self._launch(batch)
        return await caller.future

    def _busy(self, key: K) -> bool:
        return self.slots is not None and self._in_flight.get(key, 0) >= self.slots

    def _window_passed(self, batch: _Batch[K, I, R]) -> None:
        batch.timer = None
        self._launch(batch)

    def _launch(self, batch: _Batch[K, I, R]) -> None:
        """Stop taking callers and run the batch (once: only the open batch launches)."""
        if self._open.get(batch.key) is not batch:
            return
        del self._open[batch.key]
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        callers = [c for c in batch.callers if not c.future.done()]  # cancelled callers leave
        if not callers:
            return
        self._started(batch.key, sum(len(c.items) for c in callers))
        ids = {c.request_id for c in callers}
        context = contextvars.copy_context()  # whichever caller or timer launched it, the batch is all its callers'
        context.run(tracing.REQUEST_ID.set, ids.pop() if len(ids) == 1 else None)
        task = asyncio.get_running_loop().create_task(self._run(batch.key, callers), context=context)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: K, callers: list[_Caller[I, R]]) -> None:
        try:
            results = await self._checked(key, [it for c in callers for it in c.items])
        except asyncio.CancelledError:  # the server is stopping
            for c in callers:
                c.future.cancel()
            raise
        except Exception as e:  # the batch's error is each caller's
            for c in callers:
                if not c.future.done():
                    c.future.set_exception(e)
            return
        finally:
            self._finished(key)
        at = 0
        for c in callers:
            if not c.future.done():
                c.future.set_result(results[at : at + len(c.items)])
            at += len(c.items)

    async def _checked(self, key: K, items: list[I]) -> list[R]:
        results = await self.run(key, items)
        if len(results) != len(items):
            raise RuntimeError(f"a batched call returned {len(results)} results for {len(items)} items")
        return results

    def _started(self, key: K, n: int) -> None:
        self.stats.batches += 1
        self.stats.items += n
        self._in_flight[key] = self._in_flight.get(key, 0) + 1

    def _finished(self, key: K) -> None:
        """A batched call of `key` ended: a batch that waits for a slot goes now."""
        self._in_flight[key] -= 1
        if not self._in_flight[key]:
            del self._in_flight[key]
        waiting = self._open.get(key)
        if waiting is not None and waiting.timer is None:
            self._launch(waiting)
