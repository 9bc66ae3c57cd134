"""StreamWorker / StreamClient against a real redis-server: replies, errors, deadlines, replicas, claims, drain."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from google.protobuf.wrappers_pb2 import StringValue

from services.common.errors import DeadlineExceeded, InvalidRequest, Overloaded, Unavailable
from services.common.ops import Operation, RemoteError, ServiceDef
from services.common.redis_server import LocalRedis
from services.common.transport import StreamClient, StreamWorker, counter_key, dead_letter_stream


class Fake:
    """A service of StringValue ops on its own stream; `calls` records what handlers completed."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.service = ServiceDef.of(
            "test.Fake", f"test:{uuid.uuid4().hex}",
            Operation("Echo", StringValue, StringValue, self.echo),
            Operation("Fail", StringValue, StringValue, self.fail),
            Operation("Boom", StringValue, StringValue, self.boom),
            Operation("Slow", StringValue, StringValue, self.slow),  # sleeps float(value) s
            Operation("Watch", StringValue, StringValue, self.echo, streaming=True),
        )
        self.stream = self.service.stream

    def op(self, name: str) -> Operation:
        return self.service.ops[name]

    async def echo(self, req: StringValue) -> StringValue:
        self.calls.append(req.value)
        return StringValue(value=req.value)

    async def fail(self, req: StringValue) -> StringValue:
        raise InvalidRequest("bad x")

    async def boom(self, req: StringValue) -> StringValue:
        raise RuntimeError("kaput")

    async def slow(self, req: StringValue) -> StringValue:
        await asyncio.sleep(float(req.value))
        return await self.echo(req)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with LocalRedis() as server:
        yield server.url


@pytest_asyncio.fixture
async def r(url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(url)
    yield client
    await client.aclose()


def worker(url: str, fake: Fake, consumer: str, **kw: Any) -> StreamWorker:
    return StreamWorker(url, fake.service, consumer, block_ms=100, **kw)


@contextlib.asynccontextmanager
async def serving(*workers: StreamWorker) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        yield
    finally:
        for w in workers:
            await w.drain()
        await asyncio.gather(*tasks)


async def wait_until(pred: Callable[[], bool | Awaitable[bool]], timeout_s: float = 3.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        got = pred()
        if await got if inspect.isawaitable(got) else got:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def _eq(value: Awaitable[int], want: int) -> bool:
    return await value == want


async def raw_call(r: aioredis.Redis, stream: str, **fields: Any) -> dict[bytes, bytes]:
    """XADD a hand-made request and return the reply's fields."""
    reply_to = f"test:reply:{uuid.uuid4().hex}"
    await r.xadd(stream, {"id": "raw", "reply_to": reply_to, "deadline_ms": 0, **fields})
    got = await r.xread({reply_to: "0-0"}, count=1, block=3000)
    assert got, "no reply"
    reply: dict[bytes, bytes] = got[0][1][0][1]
    return reply


@pytest.mark.asyncio
async def test_round_trip_and_reply_stream_cleanup(url: str, r: aioredis.Redis) -> None:
    fake = Fake()
    async with serving(worker(url, fake, "w1")), StreamClient(url, block_ms=100) as client:
        reply = await client.call(fake.stream, fake.op("Echo"), StringValue(value="héllo"), timeout_s=3)
        assert isinstance(reply, StringValue) and reply.value == "héllo"
        assert 0 < await r.ttl(client.reply_stream) <= 3600  # an abandoned reply stream expires
        await wait_until(lambda: _eq(r.xlen(client.reply_stream), 0))  # the reader deletes what it read
    assert await r.exists(client.reply_stream) == 0  # close deletes it
    assert fake.calls == ["héllo"]


@pytest.mark.asyncio
async def test_handler_errors_arrive_named_and_worker_survives(url: str) -> None:
    fake = Fake()
    async with serving(worker(url, fake, "w1")), StreamClient(url, block_ms=100) as client:
        with pytest.raises(InvalidRequest, match="^bad x$"):
            await client.call(fake.stream, fake.op("Fail"), StringValue(), timeout_s=3)
        with pytest.raises(RemoteError, match="RuntimeError: kaput") as boom:
            await client.call(fake.stream, fake.op("Boom"), StringValue(), timeout_s=3)
        assert boom.value.code == "INTERNAL"
        reply = await client.call(fake.stream, fake.op("Echo"), StringValue(value="still here"), timeout_s=3)
        assert reply.value == "still here"  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_unknown_streaming_and_undecodable_are_invalid_argument(url: str, r: aioredis.Redis) -> None:
    fake = Fake()
    nope = Operation("Nope", StringValue, StringValue, fake.echo)
    async with serving(worker(url, fake, "w1")), StreamClient(url, block_ms=100) as client:
        with pytest.raises(InvalidRequest, match="unknown operation Nope for service test.Fake"):
            await client.call(fake.stream, nope, StringValue(), timeout_s=3)
        with pytest.raises(InvalidRequest, match="server-streaming"):
            await client.call(fake.stream, fake.op("Watch"), StringValue(), timeout_s=3)
        garbled = await raw_call(r, fake.stream, op="Echo", body=b"\xff\xff\xff")
        assert garbled[b"code"] == b"INVALID_ARGUMENT" and garbled[b"message"] == (
            b"Echo: the request body is not a valid google.protobuf.StringValue message (Wire format was corrupt)")
        streaming = await raw_call(r, fake.stream, op="Watch", body=b"")
        assert streaming[b"code"] == b"INVALID_ARGUMENT" and b"server-streaming" in streaming[b"message"]
    assert fake.calls == []


@pytest.mark.asyncio
async def test_deadline_exceeded(url: str, r: aioredis.Redis) -> None:
    fake = Fake()
    async with serving(worker(url, fake, "w1")), StreamClient(url, block_ms=100) as client:
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=f"Slow on {fake.stream}: no reply within 0.2 s"):
            await client.call(fake.stream, fake.op("Slow"), StringValue(value="0.6"), timeout_s=0.2)
        assert time.monotonic() - t0 < 2.0  # the 0.2 s deadline, not the 0.6 s handler (slack for a loaded CI)
        assert client.pending == 0
        # a request whose deadline passed while queued is answered without running its handler
        expired = await raw_call(r, fake.stream, op="Echo", body=StringValue(value="late").SerializeToString(),
                                 deadline_ms=int(time.time() * 1000) - 1000)
        assert expired[b"code"] == b"DEADLINE_EXCEEDED"
    assert fake.calls == ["0.6"]  # the timed-out Slow ran to its end all the same; "late" never ran


@pytest.mark.asyncio
async def test_two_workers_share_the_group(url: str) -> None:
    fake = Fake()
    w1, w2 = worker(url, fake, "w1", concurrency=4), worker(url, fake, "w2", concurrency=4)
    async with serving(w1, w2), StreamClient(url, block_ms=100) as client:
        values = [f"0.0{i % 3}{i:02d}" for i in range(40)]  # sleeps of 0–30 ms, all distinct
        replies = await asyncio.gather(*(client.call(fake.stream, fake.op("Slow"), StringValue(value=v), timeout_s=4)
                                         for v in values))
    assert [x.value for x in replies] == values  # type: ignore[attr-defined]
    assert w1.served > 0 and w2.served > 0 and w1.served + w2.served == 40
    assert sorted(fake.calls) == sorted(values)


@pytest.mark.asyncio
async def test_dead_consumer_entries_are_reclaimed(url: str, r: aioredis.Redis) -> None:
    fake = Fake()
    await r.xgroup_create(fake.stream, fake.stream, id="0", mkstream=True)
    async with StreamClient(url, block_ms=100) as client:
        calls = [asyncio.create_task(client.call(fake.stream, fake.op("Echo"), StringValue(value=str(i)), timeout_s=4))
                 for i in range(5)]
        await wait_until(lambda: _eq(r.xlen(fake.stream), 5))
        dead = await r.xreadgroup(fake.stream, "dead", {fake.stream: ">"}, count=10)  # read, never acked
        assert len(dead[0][1]) == 5
        live = worker(url, fake, "live", claim_idle_ms=200)
        async with serving(live):
            replies = await asyncio.gather(*calls)
    assert [x.value for x in replies] == ["0", "1", "2", "3", "4"]  # type: ignore[attr-defined]
    assert live.claimed == 5 and live.served == 5
    assert await r.hgetall(counter_key("claimed", fake.stream)) == {b"live": b"5"}  # the cluster-wide counter
    assert (await r.xpending(fake.stream, fake.stream))["pending"] == 0


@pytest.mark.asyncio
async def test_drain_waits_for_in_flight_work(url: str, r: aioredis.Redis) -> None:
    fake = Fake()
    w = worker(url, fake, "w1")
    run = asyncio.create_task(w.run())
    async with StreamClient(url, block_ms=100) as client:
        call = asyncio.create_task(client.call(fake.stream, fake.op("Slow"), StringValue(value="0.4"), timeout_s=3))
        await wait_until(lambda: w.in_flight == 1)
        t0 = time.monotonic()
        await w.drain()
        assert time.monotonic() - t0 > 0.2  # waited for the handler
        assert w.served == 1 and (await r.xpending(fake.stream, fake.stream))["pending"] == 0
        await asyncio.wait_for(run, 1)
        assert (await asyncio.wait_for(call, 1)).value == "0.4"  # type: ignore[attr-defined]
        with pytest.raises(DeadlineExceeded):  # a drained worker reads nothing new
            await client.call(fake.stream, fake.op("Echo"), StringValue(value="after"), timeout_s=0.3)
    assert fake.calls == ["0.4"]


@pytest.mark.asyncio
async def test_maxlen_bounds_the_request_stream(url: str, r: aioredis.Redis) -> None:
    fake = Fake()  # no worker: requests pile up
    async with StreamClient(url, maxlen=50, block_ms=100) as client:
        results = await asyncio.gather(*(client.call(fake.stream, fake.op("Echo"), StringValue(value=str(i)),
                                                     timeout_s=0.5) for i in range(300)), return_exceptions=True)
        assert all(isinstance(x, DeadlineExceeded) for x in results)
        assert client.pending == 0
    assert 50 <= await r.xlen(fake.stream) <= 150  # MAXLEN ~ trims whole nodes (100 entries each)


@pytest.mark.asyncio
async def test_overloaded_and_close_fails_pending(url: str) -> None:
    fake = Fake()  # no worker: calls stay pending
    client = await StreamClient(url, max_pending=2, block_ms=100).start()
    calls = [asyncio.create_task(client.call(fake.stream, fake.op("Echo"), StringValue(), timeout_s=3))
             for _ in range(2)]
    await wait_until(lambda: client.pending == 2)
    with pytest.raises(Overloaded, match="max_pending=2"):
        await client.call(fake.stream, fake.op("Echo"), StringValue(), timeout_s=3)
    await client.close()
    for call in calls:
        with pytest.raises(Unavailable, match="closed"):
            await call


CRASHING_WORKER = Path(__file__).with_name("crashing_worker.py")


def _never(req: StringValue) -> StringValue:
    raise AssertionError("the caller's side never runs a handler")


@pytest.mark.asyncio
async def test_an_entry_that_crashes_every_replica_is_dead_lettered_and_its_caller_answered(
        url: str, r: aioredis.Redis) -> None:
    """Poison: each worker process that takes the `Crash` entry dies (os._exit) before replying; after
    `max_deliveries` (2) such deliveries the next replica's claim moves it to "<stream>:dead" instead of running it,
    its caller gets INTERNAL, and that replica goes on serving."""
    stream, tries = f"test:{uuid.uuid4().hex}", 2
    crash_op, echo_op = Operation("Crash", StringValue, StringValue, _never), Operation("Echo", StringValue,
                                                                                      StringValue, _never)
    await r.xgroup_create(stream, stream, id="0", mkstream=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        async with StreamClient(url, block_ms=100) as client:
            crash = asyncio.create_task(client.call(stream, crash_op, StringValue(value="x"), timeout_s=60))
            for i in range(tries + 1):
                procs.append(subprocess.Popen([sys.executable, str(CRASHING_WORKER), url, stream, f"replica-{i}",
                                               "200", str(tries)], env=env))
                if i < tries:
                    assert await asyncio.to_thread(procs[-1].wait, 30) == 3  # it took the entry and died
            with pytest.raises(RemoteError, match=r"Crash failed on each of its 2 deliveries .* dead-letter") as e:
                await crash
            assert e.value.code == "INTERNAL"
            assert (await client.call(stream, echo_op, StringValue(value="after"), timeout_s=30)).value == "after"
            assert procs[-1].poll() is None  # the replica that dead-lettered it serves on
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)
    dead = await r.xrange(dead_letter_stream(stream))
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields[b"op"] == b"Crash" and fields[b"deliveries"] == b"2" and fields[b"dead_from"] == stream.encode()
    assert (await r.xpending(stream, stream))["pending"] == 0
    assert await r.hgetall(counter_key("dead", stream)) == {f"replica-{tries}".encode(): b"1"}


@pytest.mark.asyncio
async def test_pooled_connections_survive_a_redis_restart() -> None:
    # Found by bench/chaos.py: after redis-server restarted, each connection a worker's or a client's pool had kept
    # failed the first command sent on it ("Connection closed by server"), minutes later: a reply write then left
    # its entry for a claim (RALMSPEC_CLAIM_IDLE_MS late), a request's XADD failed its call UNAVAILABLE.
    fake = Fake()
    with LocalRedis(appendonly=True) as server:
        w = worker(server.url, fake, "w1", concurrency=4, claim_idle_ms=60_000)  # a failed reply is not reclaimed
        async with serving(w), StreamClient(server.url, block_ms=100) as client:

            async def burst() -> list[str]:  # concurrent calls: several pooled connections in use at once
                calls = [client.call(fake.stream, fake.op("Slow"), StringValue(value=f"0.{i}"), timeout_s=10)
                         for i in range(1, 9)]
                return [r.value for r in await asyncio.gather(*calls)]  # type: ignore[attr-defined]

            assert len(await burst()) == 8
            await asyncio.to_thread(server.restart, 0.2)
            await asyncio.sleep(1.5)  # the worker's and the client's readers reconnect (they retry every second)
            assert len(await burst()) == 8
