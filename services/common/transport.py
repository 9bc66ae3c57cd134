"""Request/reply over Redis streams: the stream adapter for a `ServiceDef` (the gRPC servicer is the other).

Wire format (every field a Redis stream field, values bytes):

    request, XADDed to the service's stream (e.g. "ralmspec:lm"), MAXLEN ~ client maxlen:
        op           method name, e.g. b"Step"
        id           correlation id, uuid4 hex
        reply_to     the caller's reply stream, "ralmspec:reply:<name>:<uuid4 hex>"
        deadline_ms  absolute unix epoch ms after which nobody waits for the reply; b"0" = none (a handler
                     that takes a `Call` sees it as the call's deadline)
        body         the operation's request protobuf, serialized
        request_id   optional: the id of the public request this call serves (`tracing.py`), which the worker binds
                     while it handles the entry; absent in calls outside a request and in entries from before it
        traceparent  optional: the caller's OpenTelemetry span (W3C trace context), when export is on (`otel.py`)
    reply, XADDed to reply_to, MAXLEN ~ worker maxlen, the stream EXPIREd REPLY_TTL_S after each reply:
        id           the request's correlation id
        code         status name from ops.py: b"OK", b"INVALID_ARGUMENT", ...
        message      for a person; empty when OK
        body         the operation's reply protobuf when OK, else empty

Workers of one service share a consumer group (default: the stream's name), so each request is served by one
replica. A request is XACKed only after its reply is written; entries a dead consumer read but never acked are
XAUTOCLAIMed by a live one after `claim_idle_ms` (at-least-once: handlers are idempotent). Deadlines compare
wall clocks of caller and worker hosts, so those clocks are assumed NTP-synced.

Poison messages: an entry delivered more than `max_deliveries` times (XPENDING's delivery count: its handler
crashed its replica, or never got its reply written, on every try) is not run again: a claim moves it, with its
fields plus `dead_from`, `dead_entry` and `deliveries`, to the dead-letter stream "<stream>:dead"
(`dead_letter_stream`), answers its caller INTERNAL, and acks it.

Redis with failover (`redis+sentinel://` URLs): connections and the write policy live in `redis_conn.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import Message
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError, ResponseError

from services.common import metrics, otel, tracing
from services.common.errors import DeadlineExceeded, InvalidRequest, Overloaded, Unavailable
from services.common.ops import (
    DEADLINE_EXCEEDED,
    INTERNAL,
    INVALID_ARGUMENT,
    OK,
    Call,
    Operation,
    ServiceDef,
    error_of,
    status_of,
)
from services.common.redis_conn import Failover, connect, write

log = logging.getLogger(__name__)

REPLY_TTL_S = 3600  # an abandoned reply stream (its caller died) vanishes an hour after its last reply
RETRY_S = 1.0  # pause after a Redis error before reading again
CLIENT_CONNECTIONS = 64  # a client's pool: its reply reader + concurrent XADDs (more wait for a free one)

MAX_ENTRY_BYTES = 64 * 1024 * 1024  # a request body past this is refused (INVALID_ARGUMENT), as gRPC's limit does
Fields = dict[bytes, bytes]
Reply = tuple[str, str, bytes]  # (code, message, body)


COUNTERS = ("served", "claimed", "replayed", "dead")  # cluster-wide metrics, one Redis hash each per consumer group


def counter_key(counter: str, group: str) -> str:
    """Redis hash: consumer (or client) name -> its count of `counter` for a consumer group: "served" (entries
    answered and acked), "claimed" (entries taken over from an idle, likely dead, consumer), "replayed" (calls a
    client sent again because the replica pinning their session or cache was lost), "dead" (entries moved to the
    dead-letter stream)."""
    assert counter in COUNTERS, counter
    return f"ralmspec:{counter}:{group}"


def dead_letter_stream(stream: str) -> str:
    return f"{stream}:dead"


def _parent(fields: Fields) -> dict[str, str]:
    """An entry's trace context, the parent of the span that handles it (`otel.py`); {} when it carries none."""
    parent = fields.get(otel.TRACEPARENT.encode())
    return {} if parent is None else {otel.TRACEPARENT: parent.decode("ascii", errors="replace")}


def _now_ms() -> int:
    return int(time.time() * 1000)


def _entries(got: Any) -> list[tuple[str, bytes, Fields]]:
    """(stream, entry id, fields) of an XREAD/XREADGROUP answer: [[stream, entries]] or {stream: entries}."""
    pairs = got.items() if isinstance(got, dict) else got or []
    return [(stream.decode(), entry_id, fields) for stream, entries in pairs for entry_id, fields in entries or []]


class StreamWorker:
    """Serves one `ServiceDef` from its Redis stream(s): read → decode → handler → reply → ack."""

    def __init__(self, redis_url: str, service: ServiceDef, consumer: str, *, streams: Sequence[str] | None = None,
                 group: str | None = None, concurrency: int = 8, claim_idle_ms: int = 30_000,
                 maxlen: int = 10_000, block_ms: int = 1000, max_deliveries: int = 3) -> None:
        self.service = service
        self.consumer = consumer  # unique per replica, e.g. "<host>:<pid>"
        self.streams = list(streams) if streams is not None else [service.stream]
        self.group = group or service.stream
        self.concurrency = concurrency  # entries handled at once
        self.claim_idle_ms = claim_idle_ms  # an unacked entry idle this long belongs to a dead consumer
        self.maxlen = maxlen  # approximate cap of each reply stream
        self.block_ms = block_ms  # longest XREADGROUP wait (under redis-py's 5 s socket timeout): bounds `drain`
        self.max_deliveries = max_deliveries  # past it a claimed entry is poison: dead-lettered, not run
        self.redis = connect(redis_url, concurrency + 4)
        self.failover = Failover.of(redis_url)  # Sentinel: replies retried through a failover, WAITed
        self.served = 0  # entries answered (any code) and acked
        self.claimed = 0  # entries taken over from idle consumers
        self.dead = 0  # entries this replica moved to a dead-letter stream
        self._sem = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight: dict[tuple[str, bytes], asyncio.Task[None]] = {}  # (stream, entry id) → its task
        self._stop = asyncio.Event()
        self._finished = asyncio.Event()
        self._running = False
        self._calls = tracing.CallLog(log)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def run(self) -> None:
        """Serve until `stop`/`drain`; then finish in-flight entries (replied and acked) and return."""
        loop = asyncio.get_running_loop()
        self._running, groups_ready, next_claim = True, False, 0.0
        self._stop.clear()
        self._finished.clear()
        try:
            while not self._stop.is_set():
                try:
                    if not groups_ready:
                        await self._create_groups()
                        groups_ready = True
                    # 1) take over entries of dead consumers; keep our own in-flight entries from looking dead
                    if loop.time() >= next_claim:
                        await self._heartbeat()
                        await self._claim()
                        next_claim = loop.time() + self.claim_idle_ms / 2000
                    # 2) read new entries, as many as there are free slots
                    free = self.concurrency - len(self._tasks)
                    wait_ms = max(1, min(self.block_ms, int((next_claim - loop.time()) * 1000)))
                    if free <= 0:
                        await asyncio.wait(self._tasks, timeout=wait_ms / 1000, return_when=asyncio.FIRST_COMPLETED)
                        continue
                    got = await self.redis.xreadgroup(self.group, self.consumer, {s: ">" for s in self.streams},
                                                      count=free, block=wait_ms)
                    # 3) handle each entry in its own task
                    for stream, entry_id, fields in _entries(got):
                        self._spawn(stream, entry_id, fields)
                except RedisError as e:
                    log.warning("worker %s: redis error, retrying in %.0f s: %s", self.consumer, RETRY_S, e)
                    groups_ready = False  # a restarted Redis lost its groups
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), RETRY_S)
        finally:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.redis.aclose()
            self._running = False
            self._finished.set()

    def stop(self) -> None:
        """Stop reading new entries (safe from a signal handler); `run` returns once in-flight work is done."""
        self._stop.set()

    async def drain(self) -> None:
        """Stop reading and wait until every entry already read is replied and acked (graceful SIGTERM)."""
        self.stop()
        if self._running:
            await self._finished.wait()
        elif self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _create_groups(self) -> None:
        for stream in self.streams:
            try:  # id "0": requests queued before any worker existed are served too
                await self.redis.xgroup_create(stream, self.group, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    async def _heartbeat(self) -> None:
        """Reset the idle time of our in-flight entries (XCLAIM JUSTID) so a slow handler isn't taken over."""
        for stream in self.streams:
            ids: list[Any] = [entry_id for (s, entry_id) in self._in_flight if s == stream]
            if ids:
                await self.redis.xclaim(stream, self.group, self.consumer, 0, ids, justid=True)

    async def _claim(self) -> None:
        for stream in self.streams:
            cursor: bytes | str = "0-0"
            while (free := self.concurrency - len(self._tasks)) > 0:
                # [next cursor, [(entry id, fields)], [ids of deleted entries]]; Redis 6.2 gives (None, None)
                got = await self.redis.xautoclaim(stream, self.group, self.consumer, self.claim_idle_ms, cursor,
                                                  count=free)
                cursor, entries = got[0], got[1]
                claimed = 0
                for entry_id, fields in entries:
                    if entry_id is not None and (stream, entry_id) not in self._in_flight:
                        if await self._dead_letter_if_poison(stream, entry_id, fields):
                            continue
                        claimed += 1
                        log.info("worker %s: claimed %s %s from an idle consumer", self.consumer, stream, entry_id)
                        self._spawn(stream, entry_id, fields)
                if claimed:
                    self.claimed += claimed
                    await self.redis.hincrby(counter_key("claimed", self.group), self.consumer, claimed)
                if cursor in (b"0-0", "0-0"):
                    break

    def _reply_and_ack(self, pipe: Pipeline, stream: str, entry_id: bytes, fields: Fields, answer: Reply,
                       counter: str) -> None:
        """Queue on `pipe` the entry's reply (when it names a reply stream), its ack, and this consumer's count of
        `counter` ("served" or "dead": who did what, everywhere)."""
        reply_to = fields.get(b"reply_to")
        if reply_to:
            code, message, body = answer
            pipe.xadd(reply_to, {b"id": fields.get(b"id", b""), b"code": code, b"message": message, b"body": body},
                      maxlen=self.maxlen, approximate=True)
            pipe.expire(reply_to, REPLY_TTL_S)
        pipe.xack(stream, self.group, entry_id)
        pipe.hincrby(counter_key(counter, self.group), self.consumer, 1)

    async def _dead_letter_if_poison(self, stream: str, entry_id: bytes, fields: Fields) -> bool:
        """Move the just-claimed entry to the dead-letter stream when it was delivered more than `max_deliveries`
        times, answering its caller INTERNAL; True when it did."""
        pending = await self.redis.xpending_range(stream, self.group, min=entry_id, max=entry_id, count=1)
        deliveries = int(pending[0]["times_delivered"]) if pending else 0
        if deliveries <= self.max_deliveries:
            return False
        dead = dead_letter_stream(stream)
        op = fields.get(b"op", b"?").decode(errors="replace")
        message = (f"{self.service.full_name} {op} failed on each of its {deliveries - 1} deliveries (its replica "
                   f"crashed or could not reply): not retried; kept in the dead-letter stream {dead}")

        def move(pipe: Pipeline) -> None:
            kept: dict[Any, Any] = {**fields, b"dead_from": stream, b"dead_entry": entry_id,
                                    b"deliveries": deliveries - 1}
            pipe.xadd(dead, kept, maxlen=self.maxlen, approximate=True)
            self._reply_and_ack(pipe, stream, entry_id, fields, (INTERNAL, message, b""), "dead")

        await write(self.redis, move, self.failover)
        self.dead += 1
        log.error("worker %s: %s %s (%s) dead-lettered to %s after %d deliveries", self.consumer, stream,
                  entry_id.decode(errors="replace"), op, dead, deliveries - 1,
                  extra={"request_id": tracing.from_wire(fields.get(b"request_id"))})
        return True

    def _spawn(self, stream: str, entry_id: bytes, fields: Fields) -> None:
        task = asyncio.create_task(self._handle(stream, entry_id, fields))
        self._tasks.add(task)
        self._in_flight[(stream, entry_id)] = task
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, stream: str, entry_id: bytes, fields: Fields) -> None:
        try:
            async with self._sem:
                tracing.REQUEST_ID.set(tracing.from_wire(fields.get(b"request_id")))  # this entry's task only
                started = time.perf_counter()
                method = f"{self.service.full_name}/{fields.get(b'op', b'?').decode(errors='replace')}"
                with otel.span(method, "consumer", _parent(fields)):
                    code, message, body = await self._answer(fields)
                self._calls.done(method, code, started)
                metrics.observe_rpc("stream", self.service.full_name, self._op_label(fields), code, started)
                if not fields.get(b"reply_to"):
                    log.warning("worker %s: entry %s %s has no reply_to; acked unanswered", self.consumer, stream,
                                entry_id)
                await write(self.redis, lambda pipe: self._reply_and_ack(pipe, stream, entry_id, fields,
                                                                         (code, message, body), "served"),
                            self.failover)
                self.served += 1
        except Exception:  # unacked: another consumer (or our own claim) retries it after claim_idle_ms
            log.exception("worker %s: could not answer %s %s", self.consumer, stream, entry_id)
        finally:
            self._in_flight.pop((stream, entry_id), None)

    def _op_label(self, fields: Fields) -> str:
        """The entry's operation as a metric label: its name when the service has it (bounded label values)."""
        name = fields.get(b"op", b"").decode(errors="replace")
        return name if name in self.service.ops else "unknown"

    async def _answer(self, fields: Fields) -> Reply:
        name = fields.get(b"op", b"").decode(errors="replace")
        op = self.service.ops.get(name)
        if op is None:
            return INVALID_ARGUMENT, f"unknown operation {name} for service {self.service.full_name}", b""
        if op.streaming:
            return INVALID_ARGUMENT, f"{name} of {self.service.full_name} is server-streaming: call it over gRPC", b""
        try:
            deadline_ms = int(fields.get(b"deadline_ms", b"0") or 0)
        except ValueError:
            return INVALID_ARGUMENT, f"{name}: deadline_ms is not an integer", b""
        if len(fields.get(b"body", b"")) > MAX_ENTRY_BYTES:
            return INVALID_ARGUMENT, f"{name}: the request body is over the {MAX_ENTRY_BYTES} byte limit", b""
        left_ms = deadline_ms - _now_ms()
        if deadline_ms and left_ms <= 0:
            return DEADLINE_EXCEEDED, f"{name}: deadline passed before a worker took the request", b""
        call = Call.expiring_in(left_ms / 1000, "the caller's deadline") if deadline_ms else Call()
        try:
            reply = await op.unary(op.parse(fields.get(b"body", b"")), call)
        except Exception as e:
            code, message = status_of(e)  # INTERNAL is a bug: logged with its traceback; the rest are answers
            log.log(logging.ERROR if code == INTERNAL else logging.INFO, "%s %s failed (id=%s): %s",
                    self.service.full_name, name, fields.get(b"id", b"").decode(errors="replace"), message,
                    exc_info=code == INTERNAL)
            return code, message, b""
        return OK, "", reply.SerializeToString()


class StreamClient:
    """Calls operations over Redis streams; one reply stream and one reader task per client."""

    def __init__(self, redis_url: str, *, name: str = "client", maxlen: int = 10_000,
                 default_timeout_s: float = 60.0, max_pending: int = 1024, block_ms: int = 1000) -> None:
        self.redis = connect(redis_url, CLIENT_CONNECTIONS)
        self.failover = Failover.of(redis_url)  # Sentinel: requests retried through a failover, WAITed
        self.name = name  # this client's name in the counters (`counter_key`)
        self.reply_stream = f"ralmspec:reply:{name}:{uuid.uuid4().hex}"
        self.maxlen = maxlen  # approximate cap of each request stream
        self.default_timeout_s = default_timeout_s
        self.max_pending = max_pending  # calls in flight before `call` raises Overloaded
        self.block_ms = block_ms
        self._pending: dict[str, asyncio.Future[Reply]] = {}  # correlation id → its reply
        self._reader: asyncio.Task[None] | None = None
        self._closing = False  # stops the reader even where 3.11's wait_for (inside redis-py) swallows a cancel

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def start(self) -> StreamClient:
        if self._reader is None:
            self._closing = False
            self._reader = asyncio.create_task(self._read_replies())
        return self

    async def __aenter__(self) -> StreamClient:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def call(self, stream: str, op: Operation, request: Message, *, timeout_s: float | None = None) -> Message:
        """Send `request` to `stream` and return its `op.reply`; raises the named error of a non-OK reply."""
        if op.streaming:
            raise InvalidRequest(f"{op.name} is server-streaming: call it over gRPC")
        if len(self._pending) >= self.max_pending:
            metrics.CLIENT_OVERLOADED.labels(stream).inc()
            raise Overloaded(f"{len(self._pending)} calls already in flight (max_pending={self.max_pending})")
        await self.start()
        timeout = self.default_timeout_s if timeout_s is None else timeout_s
        cid = uuid.uuid4().hex
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[cid] = future
        fields: dict[Any, Any] = {b"op": op.name, b"id": cid, b"reply_to": self.reply_stream,
                                  b"deadline_ms": _now_ms() + int(timeout * 1000),
                                  b"body": request.SerializeToString()}
        if (rid := tracing.current()) is not None:
            fields[b"request_id"] = rid
        with otel.span(f"{stream}/{op.name}", "client"):
            fields.update({k.encode(): v for k, v in otel.carrier().items()})
            code, message, body = await self._send(stream, op, fields, future, timeout)
        if code != OK:
            raise error_of(code, message)
        return op.reply.FromString(body)

    async def _send(self, stream: str, op: Operation, fields: dict[Any, Any], future: asyncio.Future[Reply],
                    timeout: float) -> Reply:
        """XADD the request, then wait for its reply until `timeout` s from now."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        try:
            async with asyncio.timeout_at(end):
                await write(self.redis, lambda pipe: pipe.xadd(stream, fields, maxlen=self.maxlen, approximate=True),
                             self.failover, timeout)
            # asyncio.wait, not a cancelling timeout: the deadline holds even if the XADD swallowed its cancel
            await asyncio.wait({future}, timeout=max(0.0, end - loop.time()))
            if not future.done():
                raise TimeoutError
            return future.result()
        except TimeoutError:
            raise DeadlineExceeded(f"{op.name} on {stream}: no reply within {timeout:g} s") from None
        except RedisError as e:
            raise Unavailable(f"{op.name} on {stream}: redis unreachable: {e}") from e
        finally:
            self._pending.pop(fields[b"id"], None)

    async def count(self, counter: str, group: str, n: int = 1) -> None:
        """Add `n` to this client's `counter` for `group` (`counter_key`); a metric never fails its caller."""
        try:
            await self.redis.hincrby(counter_key(counter, group), self.name, n)
        except RedisError as e:
            log.warning("client %s: could not count %s for %s: %s", self.name, counter, group, e)

    async def close(self) -> None:
        """Stop the reader, fail pending calls with Unavailable and delete the reply stream."""
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(Unavailable(f"client {self.reply_stream} closed"))
        with contextlib.suppress(RedisError):
            await self.redis.delete(self.reply_stream)
        await self.redis.aclose()

    async def _read_replies(self) -> None:
        last: bytes | str = "0-0"  # the stream is ours alone, so read it from its start
        while not self._closing:
            try:
                got = await self.redis.xread({self.reply_stream: last}, count=256, block=self.block_ms)
                entries = _entries(got)
                for _stream, entry_id, f in entries:
                    last = entry_id
                    future = self._pending.get(f.get(b"id", b"").decode())
                    if future is not None and not future.done():  # else a late reply after a timeout
                        future.set_result((f.get(b"code", b"").decode(), f.get(b"message", b"").decode(),
                                           f.get(b"body", b"")))
                if entries:
                    await self.redis.xdel(self.reply_stream, *(entry_id for _, entry_id, _ in entries))
            except RedisError as e:
                if not self._closing:
                    log.warning("client %s: redis error, retrying in %.0f s: %s", self.reply_stream, RETRY_S, e)
                    await asyncio.sleep(RETRY_S)
