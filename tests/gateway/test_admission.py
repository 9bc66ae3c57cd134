"""The gateway's request pool (`admission.py`) on plain functions: the bound on running and waiting requests, the
refusal with its retry hint, deadlines and cancellation while waiting, and a cancelled request's thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from services.common.errors import DeadlineExceeded, InvalidRequest, Overloaded
from services.common.ops import Call, Cancelled
from services.gateway.admission import RequestPool


def blocked(gate: threading.Event, ran: list[str], name: str) -> Callable[[], str]:
    def fn() -> str:
        ran.append(name)
        assert gate.wait(10), "the test never opened the gate"
        return name

    return fn


async def settle(pool: RequestPool, running: int, waiting: int) -> None:
    """Until the pool holds `running` and `waiting` requests (tasks start on the next loop turns)."""
    for _ in range(500):
        if (pool.running, pool.waiting) == (running, waiting):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"pool at {pool.running} running, {pool.waiting} waiting")


def test_past_the_workers_and_the_queue_a_request_is_refused_with_a_retry_hint():
    async def main() -> None:
        pool, gate, ran = RequestPool(workers=1, max_queue=1), threading.Event(), []
        first = asyncio.create_task(pool.run(blocked(gate, ran, "first"), Call()))
        second = asyncio.create_task(pool.run(blocked(gate, ran, "second"), Call()))
        await settle(pool, 1, 1)
        with pytest.raises(Overloaded) as e:
            await pool.run(blocked(gate, ran, "third"), Call())
        assert str(e.value) == ("gateway busy: 1 running, 1 waiting (RALMSPEC_CONCURRENCY=1, RALMSPEC_MAX_QUEUE=1); "
                                "retry in ~2 s")  # no request finished yet: 1 s each, the running one then the queue
        gate.set()
        assert await first == "first" and await second == "second"
        assert ran == ["first", "second"] and pool.refused == 1 and (pool.running, pool.waiting) == (0, 0)
        pool.close()

    asyncio.run(main())


def test_the_retry_hint_follows_the_mean_request_time():
    pool = RequestPool(workers=2, max_queue=4)
    pool.mean_s, pool.waiting = 3.0, 4
    assert pool.retry_after_s() == 9  # the running requests (3 s), then 4 waiting two at a time (6 s)
    pool.close()


def test_a_request_whose_deadline_passes_in_the_queue_is_dropped_without_running():
    async def main() -> None:
        pool, gate, ran = RequestPool(workers=1, max_queue=4), threading.Event(), []
        first = asyncio.create_task(pool.run(blocked(gate, ran, "first"), Call()))
        await settle(pool, 1, 0)
        t = time.monotonic()
        with pytest.raises(DeadlineExceeded) as e:
            await pool.run(blocked(gate, ran, "late"), Call().within(0.2))
        assert 0.2 <= time.monotonic() - t < 1.0
        assert str(e.value).startswith("the request ran past its 0.2 s deadline after 0.2")
        assert "s in the gateway's queue, before it ran (1 running, 0 waiting)" in str(e.value)
        with pytest.raises(DeadlineExceeded, match="ran past its 1e-09 s deadline$"):  # past on arrival: not queued
            await pool.run(blocked(gate, ran, "past"), Call().within(1e-9))
        gate.set()
        await first
        assert ran == ["first"] and pool.expired == 1
        pool.close()

    asyncio.run(main())


def test_a_request_cancelled_while_waiting_leaves_the_queue_and_never_runs():
    async def main() -> None:
        pool, gate, ran = RequestPool(workers=1, max_queue=1), threading.Event(), []
        first = asyncio.create_task(pool.run(blocked(gate, ran, "first"), Call()))
        waiting = asyncio.create_task(pool.run(blocked(gate, ran, "cancelled"), Call()))
        await settle(pool, 1, 1)
        waiting.cancel()
        await settle(pool, 1, 0)  # its place is free at once
        after = asyncio.create_task(pool.run(blocked(gate, ran, "after"), Call()))
        await settle(pool, 1, 1)
        gate.set()
        assert await first == "first" and await after == "after"
        assert waiting.cancelled() and ran == ["first", "after"]
        pool.close()

    asyncio.run(main())


def test_a_cancelled_running_request_holds_its_thread_until_the_controller_stops():
    async def main() -> None:
        pool, stopped = RequestPool(workers=1, max_queue=0), threading.Event()
        call = Call()

        def controller() -> None:  # checks its call between steps, like the engines
            while True:
                time.sleep(0.01)
                try:
                    call.check()
                except Cancelled:
                    stopped.set()
                    raise

        task = asyncio.create_task(pool.run(controller, call))
        await settle(pool, 1, 0)
        task.cancel()  # what the gRPC adapter sees when the client cancels ...
        call.cancelled.set()  # ... and what it tells the handler's work
        await asyncio.sleep(0)
        assert pool.running == 1  # still on its thread: a newcomer would find no free worker
        await asyncio.to_thread(stopped.wait, 5)
        await settle(pool, 0, 0)
        assert await pool.run(lambda: "next", Call()) == "next"
        pool.close()

    asyncio.run(main())


def test_bad_bounds_are_refused():
    with pytest.raises(InvalidRequest, match="RALMSPEC_CONCURRENCY"):
        RequestPool(workers=0, max_queue=1)


def test_a_request_s_calls_to_other_services_wait_no_longer_than_the_request():
    """The pool runs a request on behalf of its Call: the request's thread and the threads it hands work to (a
    verification pool) cap every call's timeout at the time the request has left, and refuse once it ended."""
    from services.common.tracing import ContextExecutor

    assert Call.current() is None and Call.timeout(120.0) == 120.0  # outside a request: the service's limit
    verifier = ContextExecutor(1)

    def request() -> tuple[float, float, float]:
        on_thread = Call.timeout(120.0)
        in_verifier = verifier.submit(Call.timeout, 120.0).result()
        return on_thread, in_verifier, Call.timeout(0.5)

    async def main() -> None:
        pool = RequestPool(workers=1, max_queue=0)
        on_thread, in_verifier, short = await pool.run(request, Call.expiring_in(5.0, "its deadline"))
        assert 4.0 < on_thread <= 5.0 and 4.0 < in_verifier <= on_thread and short == 0.5
        assert await pool.run(lambda: Call.timeout(3.0), Call()) == 3.0  # no deadline: the limit
        ended = Call.expiring_in(0.05, "its 0.05 s deadline")

        def late() -> float:
            time.sleep(0.1)
            return Call.timeout(120.0)

        with pytest.raises(DeadlineExceeded, match="ran past its 0.05 s deadline"):
            await pool.run(late, ended)
        pool.close()

    asyncio.run(main())
    verifier.shutdown()
