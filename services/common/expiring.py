"""Per-client state a replica holds by id (LM sessions, speculation caches), expired when idle.

A client that died (a gateway killed mid-request) never closes what it opened: an entry unused for `idle_s`
expires, so a replica's memory and its bound on entries are not held by the dead forever.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from services.common.errors import NotFound, Overloaded

V = TypeVar("V")


@dataclass
class _Held(Generic[V]):
    value: V
    used: float  # clock time of the last open or get


class ExpiringTable(Generic[V]):
    """Values by a new random id, at most `capacity` of them. An entry not used for `idle_s` is expired: `get`
    answers NotFound saying so, and `add` drops every expired entry before refusing a full table (Overloaded).
    Thread-safe (the LM engine's steps run on a worker thread)."""

    def __init__(self, what: str, capacity: int, idle_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 1 or not idle_s > 0:
            raise ValueError(f"a {what} table needs capacity >= 1 and idle_s > 0, got {capacity}, {idle_s}")
        self.what, self.capacity, self.idle_s, self.clock = what, capacity, idle_s, clock
        self._held: dict[str, _Held[V]] = {}
        self._expired: OrderedDict[str, None] = OrderedDict()  # recently expired ids (at most `capacity`)
        self._lock = threading.Lock()

    def add(self, value: V) -> str:
        with self._lock:
            self._expire(self.clock())
            if len(self._held) >= self.capacity:
                raise Overloaded(f"this replica holds {self.capacity} {self.what}s in use already; retry later")
            key = uuid.uuid4().hex
            self._held[key] = _Held(value, self.clock())
            return key

    def get(self, key: str) -> V:
        """The value of `key`, which counts as a use (its idle time starts again)."""
        with self._lock:
            now = self.clock()
            held = self._held.get(key)
            if held is not None and now - held.used > self.idle_s:
                self._drop(key)
                held = None
            if held is None:
                if key in self._expired:
                    raise NotFound(f"{self.what} {key!r} expired after {self.idle_s:g} s unused; open a new one")
                raise NotFound(f"no {self.what} {key!r} on this replica (closed, or opened on another one)")
            held.used = now
            return held.value

    def pop(self, key: str) -> bool:
        """Forget `key` (a close); False when it was not held (already closed, expired or never opened here)."""
        with self._lock:
            return self._held.pop(key, None) is not None

    def __len__(self) -> int:
        return len(self._held)

    def values(self) -> list[V]:
        """The values held now (expired ones included until the next add or get drops them)."""
        with self._lock:
            return [h.value for h in self._held.values()]

    def _expire(self, now: float) -> None:
        for k in [k for k, h in self._held.items() if now - h.used > self.idle_s]:
            self._drop(k)

    def _drop(self, key: str) -> None:
        del self._held[key]
        self._expired[key] = None
        while len(self._expired) > self.capacity:
            self._expired.popitem(last=False)
