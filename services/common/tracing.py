"""Request ids: one per public request, in every log line about it and in every call it makes to another service.

The id lives in a contextvar (`REQUEST_ID`), so engine code never passes it around: the gRPC adapter binds the
client's `x-request-id` metadata (checked: `check`) or a new id for each call it serves, the stream adapter binds the
one its entry carries, and `logs.RequestIdFilter` adds it to each log record. asyncio tasks inherit it from the code
that created them (and `run_coroutine_threadsafe` from the calling thread); `ThreadPoolExecutor.submit` and
`loop.run_in_executor` do not, so the services' pools are `ContextExecutor`s. Across processes it travels in the
stream entry's envelope (`transport.py`) and in the `x-request-id` metadata of a gRPC call (`grpc_client.py`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from services.common.errors import InvalidRequest

R = TypeVar("R")

METADATA_KEY = "x-request-id"  # gRPC metadata, both ways: the client's id in, the id used out (initial metadata)
MAX_CHARS = 128  # an id is 1-128 printable ASCII characters: what an HTTP/2 header carries, safe in a log line
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("ralmspec_request_id", default=None)


def new_id() -> str:
    return uuid.uuid4().hex


def valid(rid: str) -> bool:
    return 0 < len(rid) <= MAX_CHARS and all(" " <= c <= "~" for c in rid)


def check(rid: str) -> str:
    """A client's `x-request-id`, or InvalidRequest saying what an id must be."""
    if not valid(rid):
        shown = rid if len(rid) <= 40 else rid[:40] + "..."
        raise InvalidRequest(f"{METADATA_KEY} must be 1-{MAX_CHARS} printable ASCII characters (no control "
                             f"characters); got {len(rid)} characters: {shown!r}")
    return rid


def from_wire(raw: bytes | None) -> str | None:
    """The id a stream entry carries; None when it carries none (an entry from before ids, or a call outside a
    request) or one that is not an id (it would be logged as is)."""
    if not raw:
        return None
    rid = raw.decode("ascii", errors="replace")
    return rid if valid(rid) else None


def current() -> str | None:
    """The request id of the code running now; None outside a request."""
    return REQUEST_ID.get()


@contextlib.contextmanager
def bound(rid: str | None) -> Iterator[str | None]:
    """Run the block as part of request `rid` (None: of no request)."""
    token = REQUEST_ID.set(rid)
    try:
        yield rid
    finally:
        REQUEST_ID.reset(token)


class ContextExecutor(ThreadPoolExecutor):
    """A thread pool whose tasks run in their submitter's contextvars (the request id, an OpenTelemetry span);
    `loop.run_in_executor` calls `submit` too."""

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Future[R]:
        return super().submit(contextvars.copy_context().run, fn, *args, **kwargs)


class CallLog:
    """The adapters' line per call served: INFO for a request's first call in this process (one line per request
    per service, whatever the number of its calls), DEBUG for the others and for calls outside a request.
    Remembers the last `size` ids (a request seen again after `size` others logs INFO again)."""

    def __init__(self, log: logging.Logger, size: int = 4096) -> None:
        self.log, self.size = log, size
        self._ids: OrderedDict[str, None] = OrderedDict()  # used on the event loop only

    def first(self, rid: str | None) -> bool:
        if rid is None:
            return False
        if rid in self._ids:
            self._ids.move_to_end(rid)
            return False
        self._ids[rid] = None
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)
        return True

    def done(self, method: str, code: str, started: float) -> None:
        """Log `method` answered `code`, `started` (time.perf_counter()) ago, for the current request."""
        level = logging.INFO if self.first(current()) else logging.DEBUG
        if self.log.isEnabledFor(level):
            self.log.log(level, "%s %s in %.1f ms", method, code, (time.perf_counter() - started) * 1000)
