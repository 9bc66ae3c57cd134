"""The gateway's admission control: a bounded pool of controller threads with a bounded queue in front of it.

A request runs on one of `workers` threads (the controller is synchronous code); up to `max_queue` more wait for
one, first come first served. Past both, a request is refused at once (RESOURCE_EXHAUSTED) with a retry hint: the
time the queue ahead of it takes to clear at the mean request time so far. A request whose deadline passes, or whose
caller cancels, while it waits leaves the queue without running. A running request learns of its caller's
cancellation through its `Call` (the engines check it before each LM step); its thread counts as running until the
controller returns, so the pool never runs more than `workers` requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from services.common.errors import DeadlineExceeded, InvalidRequest, Overloaded
from services.common.ops import Call, Cancelled
from services.common.tracing import ContextExecutor

R = TypeVar("R")
log = logging.getLogger(__name__)

MEAN_WEIGHT = 0.2  # weight of the newest request in the running mean of request times
FIRST_MEAN_S = 1.0  # the mean assumed before any request has finished


class RequestPool:
    """`run(fn, call)`: fn() on one of `workers` threads, after waiting in a queue of at most `max_queue`."""

    def __init__(self, workers: int, max_queue: int) -> None:
        if workers < 1 or max_queue < 0:
            raise InvalidRequest(f"the gateway needs >= 1 worker and a queue of >= 0 (RALMSPEC_CONCURRENCY, "
                                 f"RALMSPEC_MAX_QUEUE); got {workers} and {max_queue}")
        self.workers, self.max_queue = workers, max_queue
        self.running = 0  # requests holding a thread (a cancelled one until its controller returns)
        self.waiting = 0  # requests queued for a thread
        self.refused = 0  # requests answered RESOURCE_EXHAUSTED
        self.expired = 0  # queued requests dropped because their deadline passed
        self.mean_s: float | None = None  # running mean of the time a request holds a thread
        self._threads = ContextExecutor(workers, thread_name_prefix="request")  # the request's id goes along
        self._slots = asyncio.Semaphore(workers)

    async def run(self, fn: Callable[[], R], call: Call) -> R:
        """fn() on a pool thread, once one is free. Raises Overloaded when the pool and its queue are full,
        DeadlineExceeded when `call`'s deadline passes first; cancelling the awaiting task leaves the queue."""
        call.check()  # a deadline already past takes no place in the queue
        if self.running + self.waiting >= self.workers + self.max_queue:
            self.refused += 1
            raise Overloaded(self.busy())
        # 1) wait for a thread (a request cancelled while waiting leaves the queue: Semaphore handles it)
        queued = time.monotonic()
        self.waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), call.remaining())
        except TimeoutError:
            self.expired += 1
            raise DeadlineExceeded(f"the request ran past {call.what} after {time.monotonic() - queued:.2f} s in "
                                   f"the gateway's queue, before it ran ({self.running} running, {self.waiting - 1} "
                                   "waiting)") from None
        finally:
            self.waiting -= 1
        # 2) run; the thread's slot is freed when fn returns, not when the awaiting task is cancelled
        self.running += 1
        loop, started = asyncio.get_running_loop(), time.monotonic()
        try:
            future = self._threads.submit(_serving, call, fn)
        except BaseException:
            self._finished(started, None)
            raise

        def finished(f: Future[R]) -> None:  # on the pool thread
            with contextlib.suppress(RuntimeError):  # the loop closed (shutdown): nobody counts any more
                loop.call_soon_threadsafe(self._finished, started, f)

        future.add_done_callback(finished)
        return await asyncio.wrap_future(future)

    def _finished(self, started: float, future: Future[R] | None) -> None:
        self.running -= 1
        self._slots.release()
        seconds = time.monotonic() - started
        if future is not None and not future.cancelled() and isinstance(future.exception(), Cancelled):
            log.info("a cancelled request stopped after %.2f s", seconds)
        w = MEAN_WEIGHT if self.mean_s is not None else 1.0
        self.mean_s = (1 - w) * (self.mean_s or 0.0) + w * seconds

    def retry_after_s(self) -> int:
        """Whole seconds until the queue ahead of a newcomer clears: the running requests, then the waiting ones
        `workers` at a time, each taking the mean request time (at least 1 s)."""
        mean = self.mean_s if self.mean_s is not None else FIRST_MEAN_S
        return max(1, math.ceil(mean * (1 + self.waiting / self.workers)))

    def busy(self) -> str:
        return (f"gateway busy: {self.running} running, {self.waiting} waiting (RALMSPEC_CONCURRENCY={self.workers}, "
                f"RALMSPEC_MAX_QUEUE={self.max_queue}); retry in ~{self.retry_after_s()} s")

    def close(self) -> None:
        """Wait for the running requests (their callers are gone by now: they stop at their next step)."""
        self._threads.shutdown(wait=True, cancel_futures=True)


def _serving(call: Call, fn: Callable[[], R]) -> R:
    """fn() on behalf of `call` (its calls to other services end by the request's deadline: `Call.timeout`)."""
    with call.serving():
        return fn()
