"""One table of operations per service, shared by both adapters (gRPC servicer and Redis stream worker).

Each operation is written once as `async def handler(request) -> reply` on protobuf messages, or as
`async def handler(request, call) -> reply` when it wants to know the caller's deadline and cancellation (`Call`,
protocol-free: each adapter fills it from its own protocol); the adapters only decode, call, encode and map errors.
`status_of` is the single error mapping every edge uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, cast

from google.protobuf.message import DecodeError, Message

from services.common.errors import DeadlineExceeded, InvalidRequest, NotFound, Overloaded, RalmError, Unavailable

Unary = Callable[..., Awaitable[Message]]  # (request) or (request, call: Call)
ServerStream = Callable[..., AsyncGenerator[Message, None]]  # an async generator: (request) or (request, call)


class Cancelled(RalmError):
    """The caller cancelled the call, or stopped waiting for it: the work it started stops. Maps to CANCELLED."""


@dataclass(frozen=True)
class Call:
    """What a handler may know of the call it serves, whatever the protocol: when the caller stops waiting, and
    whether it has gone. The gRPC adapter fills it from the client's deadline and cancellation, the stream adapter
    from the entry's deadline_ms. Work on other threads polls `check` between steps."""

    deadline: float | None = None  # time.monotonic() past which nobody waits for the reply; None: no deadline
    cancelled: threading.Event = field(default_factory=threading.Event)  # set once the caller has gone
    what: str = "the caller's deadline"  # the deadline, as DeadlineExceeded's message names it

    @classmethod
    def expiring_in(cls, seconds: float, what: str) -> Call:
        return cls(time.monotonic() + seconds, what=what)

    def within(self, seconds: float | None) -> Call:
        """This call with a deadline `seconds` from now, when that comes first (the same cancellation)."""
        if seconds is None:
            return self
        end = time.monotonic() + seconds
        if self.deadline is not None and self.deadline <= end:
            return self
        return replace(self, deadline=end, what=f"its {seconds:g} s deadline")

    def remaining(self) -> float | None:
        """Seconds until the deadline (negative once past); None: no deadline."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check(self) -> None:
        """Raise DeadlineExceeded once the deadline passed, Cancelled once the caller has gone."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded(f"the request ran past {self.what}")
        if self.cancelled.is_set():
            raise Cancelled("the client cancelled the request")

    @contextlib.contextmanager
    def serving(self) -> Iterator[Call]:
        """Run the block on behalf of this call: `Call.current()` returns it there, and in the threads of the
        `ContextExecutor`s the block submits to (a request's verification threads), so that the calls the work
        makes to other services wait no longer than its own caller does (`Call.timeout`)."""
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)

    @staticmethod
    def current() -> Call | None:
        return _CURRENT.get()

    @staticmethod
    def timeout(limit_s: float) -> float:
        """The timeout for a call made now to another service: `limit_s`, or less when the call being served
        ends sooner. Raises DeadlineExceeded (or Cancelled) when it has already ended: nobody waits for the
        reply."""
        served = _CURRENT.get()
        if served is None:
            return limit_s
        served.check()
        left = served.remaining()
        return limit_s if left is None else min(limit_s, left)


_CURRENT: contextvars.ContextVar[Call | None] = contextvars.ContextVar("ralmspec_call", default=None)


def _takes_call(handler: Callable[..., Any]) -> bool:
    """Whether a handler is `(request, call)` rather than `(request)`."""
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in positional for p in inspect.signature(handler).parameters.values()) >= 2


async def _unbound(request: Any) -> Message:
    raise Unavailable("this operation has no handler in this process (a client-side contract)")


@dataclass(frozen=True)
class Operation:
    name: str  # the rpc's method name, e.g. "Step"
    request: type[Message]
    reply: type[Message]
    handler: Unary | ServerStream = _unbound
    streaming: bool = False  # server-streaming (gRPC only; a Redis stream call is request/reply)
    takes_call: bool = field(init=False)  # the handler is (request, call)

    def __post_init__(self) -> None:
        object.__setattr__(self, "takes_call", _takes_call(self.handler))

    def unary(self, request: Message, call: Call) -> Awaitable[Message]:
        """The handler's reply to `request` (told of `call` when it takes it)."""
        handler = cast(Unary, self.handler)
        return handler(request, call) if self.takes_call else handler(request)

    def stream(self, request: Message, call: Call) -> AsyncGenerator[Message, None]:
        """The server-streaming handler's replies to `request` (told of `call` when it takes it)."""
        handler = cast(ServerStream, self.handler)
        return handler(request, call) if self.takes_call else handler(request)

    def parse(self, body: bytes) -> Message:
        """The request message from its wire bytes (both adapters); bytes that are not one are the caller's error."""
        try:
            return self.request.FromString(body)
        except DecodeError as e:  # "Error parsing message with type '...': Wire format was corrupt"
            reason = str(e).rpartition(": ")[2] or "undecodable"
            raise InvalidRequest(f"{self.name}: the request body is not a valid "
                                 f"{self.request.DESCRIPTOR.full_name} message ({reason})") from None


@dataclass(frozen=True)
class ServiceDef:
    full_name: str  # the proto service, e.g. "ralmspec.v1.LmService"
    stream: str  # the Redis stream its workers read, e.g. "ralmspec:lm"
    ops: dict[str, Operation] = field(default_factory=dict)

    @classmethod
    def of(cls, full_name: str, stream: str, *ops: Operation) -> ServiceDef:
        return cls(full_name, stream, {op.name: op for op in ops})

    def bind(self, **handlers: Unary | ServerStream) -> ServiceDef:
        """This contract with its handlers (one per operation, by rpc name)."""
        missing = set(self.ops) - set(handlers)
        extra = set(handlers) - set(self.ops)
        if missing or extra:
            raise ValueError(f"{self.full_name}: handlers missing {sorted(missing)}, unknown {sorted(extra)}")
        ops = {n: replace(op, handler=handlers[n]) for n, op in self.ops.items()}
        return replace(self, ops=ops)

    def method(self, name: str) -> str:
        """gRPC method path: /package.Service/Method."""
        return f"/{self.full_name}/{name}"


# Status names are gRPC's (grpc.StatusCode[...]); the stream transport carries the same names.
OK = "OK"
INVALID_ARGUMENT = "INVALID_ARGUMENT"
NOT_FOUND = "NOT_FOUND"
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
UNAVAILABLE = "UNAVAILABLE"
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
CANCELLED = "CANCELLED"
INTERNAL = "INTERNAL"


class RemoteError(RalmError):
    """An error answered by another service, re-raised with its status (so a gateway passes it on unchanged)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def status_of(exc: BaseException) -> tuple[str, str]:
    """(status name, message for a person) of an exception raised by a handler."""
    if isinstance(exc, RemoteError):
        return exc.code, str(exc)
    for kind, code in ((InvalidRequest, INVALID_ARGUMENT), (NotFound, NOT_FOUND), (Overloaded, RESOURCE_EXHAUSTED),
                       (Unavailable, UNAVAILABLE), (DeadlineExceeded, DEADLINE_EXCEEDED),
                       (asyncio.TimeoutError, DEADLINE_EXCEEDED), (Cancelled, CANCELLED)):
        if isinstance(exc, kind):
            return code, str(exc) or kind.__name__
    return INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def error_of(code: str, message: str) -> RalmError:
    """The exception a client raises for a non-OK reply (inverse of `status_of`)."""
    kinds: dict[str, type[RalmError]] = {INVALID_ARGUMENT: InvalidRequest, NOT_FOUND: NotFound,
                                         RESOURCE_EXHAUSTED: Overloaded, UNAVAILABLE: Unavailable,
                                         DEADLINE_EXCEEDED: DeadlineExceeded, CANCELLED: Cancelled}
    return kinds[code](message) if code in kinds else RemoteError(code, message)
