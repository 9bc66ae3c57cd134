"""Redis connections for the stream transport: a plain `redis://` URL, or Redis Sentinel for failover.

A `redis+sentinel://[:password@]host:port[,host:port...]/<primary>[/<db>]` URL connects through Redis Sentinel to
the current primary. Then every write (a request, a reply with its ack) is retried through a failover and followed,
on its connection, by WAIT for one replica, so a primary that dies after acknowledging a write has already passed it
on: no request is lost (tests/k8s/test_k8s_redis_sentinel.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

import redis
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import BusyLoadingError, MasterDownError, ReadOnlyError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.sentinel import Sentinel as SyncSentinel

log = logging.getLogger(__name__)

SENTINEL_SCHEME = "redis+sentinel"
# What a Sentinel failover looks like to a writer while a replica is promoted: the write is retried.
FAILOVER_ERRORS = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, BusyLoadingError, MasterDownError)
FAILOVER_RETRY_S = 0.25  # pause between retries of a write during a failover
FAILOVER_MAX_S = 60.0  # a worker gives up writing a reply after this (its entry stays pending: claimed later)
WAIT_REPLICA_MS = 1000  # how long a write waits for one replica to hold it
DEGRADED_S = 10.0  # after a WAIT no replica answered, writes skip WAIT this long


def sentinel_address(url: str) -> tuple[list[tuple[str, int]], str, str | None, int] | None:
    """(sentinels, primary name, password, db) of a `redis+sentinel://` URL; None for any other URL. The password
    is both the sentinels' and the data nodes'."""
    scheme, _, rest = url.partition("://")
    if scheme != SENTINEL_SCHEME:
        return None
    netloc, _, path = rest.partition("/")
    auth, _, hosts = netloc.rpartition("@")
    password = unquote(auth.partition(":")[2]) or None
    nodes = [(h.partition(":")[0], int(h.partition(":")[2] or 26379)) for h in hosts.split(",") if h]
    name, _, db = path.partition("/")
    if not nodes or not name:
        raise ValueError(f"{url!r}: want {SENTINEL_SCHEME}://[:password@]host:port[,host:port...]/<primary>[/<db>]")
    return nodes, name, password, int(db or 0)


def connect(url: str, max_connections: int) -> aioredis.Redis:
    sentinel = sentinel_address(url)
    if sentinel is not None:  # connections follow the primary: each new one asks the sentinels where it is
        nodes, name, password, db = sentinel
        secret = password or None  # None: no AUTH (sentinels and primary share the password)
        return Sentinel(nodes, sentinel_kwargs={"password": secret, "socket_connect_timeout": 2},
                        socket_connect_timeout=2, db=db, password=secret).master_for(name)
    # A connection the pool kept across a Redis restart is closed at the other end: its next command fails once
    # ("Connection closed by server"), then works on a new connection. One immediate retry on a connection error
    # hides that (found by bench/chaos.py: replies left for a claim, requests failed UNAVAILABLE, minutes after a
    # restart); while Redis is down the retry fails too and the error reaches the caller. A retried write that had
    # reached Redis before the connection broke is written twice: at-least-once, as a claimed entry is.
    retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=None, retry=retry)
    return aioredis.Redis.from_pool(pool)


def sync_connect(url: str, timeout_s: float = 2.0) -> redis.Redis:
    """A synchronous client of the same Redis (or Sentinel primary), for readers off the event loop: the metrics
    endpoint's XINFO GROUPS at scrape time. Short timeouts: a scrape never hangs on Redis."""
    sentinel = sentinel_address(url)
    if sentinel is not None:
        nodes, name, password, db = sentinel
        secret = password or None
        return SyncSentinel(nodes, sentinel_kwargs={"password": secret, "socket_connect_timeout": timeout_s},
                            socket_connect_timeout=timeout_s, socket_timeout=timeout_s, db=db,
                            password=secret).master_for(name)
    return redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)


@dataclass
class Failover:
    """A Sentinel client's write policy: retry through a failover, WAIT for a replica. While no replica answers
    (one was lost and not yet replaced) writes skip WAIT for `DEGRADED_S`, so they don't each wait its timeout."""

    degraded_until: float = 0.0

    @staticmethod
    def of(url: str) -> Failover | None:
        return Failover() if sentinel_address(url) is not None else None


async def write(redis: aioredis.Redis, fill: Callable[[Pipeline], object], failover: Failover | None,
                 max_s: float = FAILOVER_MAX_S) -> None:
    """Send the commands `fill` queues, in one round trip. With failover (Sentinel): retry through a failover, and
    WAIT on the same connection until a replica holds them (a lone primary is logged, not refused)."""
    end = time.monotonic() + max_s
    while True:
        pipe = redis.pipeline(transaction=False)
        fill(pipe)
        wait = failover is not None and time.monotonic() >= failover.degraded_until
        if wait:
            pipe.execute_command("WAIT", 1, WAIT_REPLICA_MS)
        try:
            got = await pipe.execute()
        except FAILOVER_ERRORS as e:
            if failover is None or time.monotonic() > end:
                raise
            log.warning("redis write failed (failover?), retrying in %.2f s: %s", FAILOVER_RETRY_S, e)
            await asyncio.sleep(FAILOVER_RETRY_S)
            continue
        if failover is not None and wait and got[-1] < 1:
            failover.degraded_until = time.monotonic() + DEGRADED_S
            log.warning("no replica acknowledged a write within %d ms: writes are not safe from a failover (next "
                        "check in %.0f s)", WAIT_REPLICA_MS, DEGRADED_S)
        return
