"""One table of operations per service, shared by both adapters (gRPC servicer and Redis stream worker).

Each operation is written once as `async def handler(request) -> reply` on protobuf messages; the adapters
only decode, call, encode and map errors. `status_of` is the single error mapping every edge uses.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from google.protobuf.message import DecodeError, Message

from services.common.errors import DeadlineExceeded, InvalidRequest, NotFound, Overloaded, RalmError, Unavailable

Unary = Callable[[Any], Awaitable[Message]]
ServerStream = Callable[[Any], AsyncIterator[Message]]


async def _unbound(request: Any) -> Message:
    raise Unavailable("this operation has no handler in this process (a client-side contract)")


@dataclass(frozen=True)
class Operation:
    name: str  # the rpc's method name, e.g. "Step"
    request: type[Message]
    reply: type[Message]
    handler: Unary | ServerStream = _unbound
    streaming: bool = False  # server-streaming (gRPC only; a Redis stream call is request/reply)

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
                       (asyncio.TimeoutError, DEADLINE_EXCEEDED)):
        if isinstance(exc, kind):
            return code, str(exc) or kind.__name__
    return INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def error_of(code: str, message: str) -> RalmError:
    """The exception a client raises for a non-OK reply (inverse of `status_of`)."""
    kinds: dict[str, type[RalmError]] = {INVALID_ARGUMENT: InvalidRequest, NOT_FOUND: NotFound,
                                         RESOURCE_EXHAUSTED: Overloaded, UNAVAILABLE: Unavailable,
                                         DEADLINE_EXCEEDED: DeadlineExceeded}
    return kinds[code](message) if code in kinds else RemoteError(code, message)
