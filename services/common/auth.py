"""Bearer-token authentication of gRPC calls: who may call a server, and what a client presents.

A call carries `authorization: Bearer <token>` metadata. The gateway (the public edge) accepts the API tokens of
`RALMSPEC_API_TOKENS_FILE` (one a line; blank lines and `#` comments skipped), every other service only the cluster
token of `RALMSPEC_CLUSTER_TOKEN_FILE`. grpc.health.v1 and server reflection stay open (probes, grpcurl). A call
without a token and a call with a wrong one get the same answer, UNAUTHENTICATED "missing or invalid bearer token",
before its body is parsed: nothing says which part was wrong. Accepted tokens are kept as SHA-256 digests and
compared in constant time; no token is ever logged (a refused call is logged with its peer and method only).

Authentication is on unless `RALMSPEC_AUTH=off`: a service with it on and no token file refuses to start.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from services.common import env, metrics

log = logging.getLogger(__name__)

METADATA_KEY = "authorization"
SCHEME = "Bearer "
REFUSED = "missing or invalid bearer token"
MIN_TOKEN_CHARS = 16  # a token a person typed as "secret" is refused at start-up
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                 "grpc.reflection.v1.ServerReflection")


def new_token() -> str:
    """A fresh token: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", errors="surrogateescape")).digest()


def read_tokens(path: Path) -> list[str]:
    """The tokens in a file, one a line; blank lines and lines starting with `#` are skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read the token file {path}: {e.strerror}") from e
    tokens = [t for t in (line.strip() for line in lines) if t and not t.startswith("#")]
    if not tokens:
        raise ValueError(f"the token file {path} holds no token")
    short = sum(len(t) < MIN_TOKEN_CHARS for t in tokens)
    if short:
        raise ValueError(f"the token file {path} holds {short} token(s) shorter than {MIN_TOKEN_CHARS} characters")
    if any(not t.isascii() or any(c.isspace() for c in t) for t in tokens):
        raise ValueError(f"the token file {path} holds a token with spaces or non-ASCII characters")
    return tokens


@dataclass(frozen=True)
class Auth:
    """Who a process lets in (`accepted`, None = authentication off) and the token it presents to other services."""

    accepted: frozenset[bytes] | None  # SHA-256 digests of the accepted tokens
    token: str | None = field(default=None, repr=False)  # the cluster token, sent on calls this process makes

    @classmethod
    def off(cls) -> Auth:
        return cls(None, None)

    @classmethod
    def of(cls, accepted: Iterable[str], token: str | None = None) -> Auth:
        return cls(frozenset(_digest(t) for t in accepted), token)

    @property
    def on(self) -> bool:
        return self.accepted is not None

    @classmethod
    def from_env(cls, public: bool) -> Auth:
        """A service's: `public` (the gateway) accepts the API tokens, any other service the cluster token."""
        if env.AUTH.get() == "off":
            return cls.off()
        if env.AUTH.get() != "on":
            raise ValueError(f"{env.AUTH.name} must be on or off, not {env.AUTH.get()!r}")
        cluster_file = env.CLUSTER_TOKEN_FILE.get()
        cluster = read_tokens(Path(cluster_file))[0] if cluster_file else None
        if public:
            api_file = env.API_TOKENS_FILE.get()
            if not api_file:
                raise ValueError(f"authentication is on and {env.API_TOKENS_FILE.name} is not set: point it at a "
                                 f"file of bearer tokens (one a line), or set {env.AUTH.name}=off to serve without "
                                 "authentication")
            return cls.of(read_tokens(Path(api_file)), cluster)
        if cluster is None:
            raise ValueError(f"authentication is on and {env.CLUSTER_TOKEN_FILE.name} is not set: point it at the "
                             f"file holding the cluster token, or set {env.AUTH.name}=off")
        return cls.of([cluster], cluster)

    def allows(self, metadata: Sequence[tuple[str, Any]] | None) -> bool:
        if self.accepted is None:
            return True
        given = next((v for k, v in metadata or () if k == METADATA_KEY), None)
        if isinstance(given, bytes):
            given = given.decode("latin-1")
        if not isinstance(given, str) or given[:len(SCHEME)].lower() != SCHEME.lower():
            return False
        digest = _digest(given[len(SCHEME):].strip())
        # Every accepted digest is compared (constant time each): the time taken does not say which one is close.
        return sum(hmac.compare_digest(digest, d) for d in self.accepted) > 0


def metadata(token: str | None) -> list[tuple[str, str]]:
    """The metadata a client adds to each call (none without a token)."""
    return [] if token is None else [(METADATA_KEY, SCHEME + token)]


def _service_of(method: str) -> str:
    return method.split("/")[1] if method.count("/") >= 2 else method


class ServerAuth(grpc.aio.ServerInterceptor):
    """Refuses calls without an accepted token, except to OPEN_SERVICES, before their body is read."""

    def __init__(self, auth: Auth) -> None:
        self.auth = auth

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                             Awaitable[grpc.RpcMethodHandler | None]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        method = details.method  # type: ignore[attr-defined]
        if handler is None or _service_of(method) in OPEN_SERVICES or \
                self.auth.allows(details.invocation_metadata):  # type: ignore[attr-defined]
            return handler
        return _refusal(handler, method)


def _refusal(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind that answers UNAUTHENTICATED without parsing the request (raw bytes in)."""
    service, _, op = method.lstrip("/").partition("/")

    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> None:
        log.info("refused an unauthenticated call to %s from %s", method, context.peer())
        metrics.observe_rpc("grpc", service, op, "UNAUTHENTICATED", time.perf_counter())
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSED)

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse)  # type: ignore[arg-type]
    return grpc.stream_stream_rpc_method_handler(refuse)  # type: ignore[arg-type]


# -- clients ----------------------------------------------------------------------------------------------------------
class _AioToken:
    def __init__(self, token: str) -> None:
        self.md = metadata(token)

    def _with(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), *self.md))  # type: ignore


# One class per call kind: grpc.aio files an interceptor under the first kind it implements only.
class _AioUnaryToken(_AioToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: grpc.aio.ClientCallDetails,
                                    request: Any) -> Any:
        return await continuation(self._with(details), request)


class _AioStreamToken(_AioToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: grpc.aio.ClientCallDetails,
                                     request: Any) -> Any:
        return await continuation(self._with(details), request)


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.md = metadata(token)

    def _with(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return details._replace(metadata=[*(details.metadata or ()), *self.md])  # type: ignore[attr-defined]

    def intercept_unary_unary(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._with(details), request)

    def intercept_unary_stream(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._with(details), request)


def aio_channel(target: str, token: str | None = None, credentials: grpc.ChannelCredentials | None = None,
                options: Sequence[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
    """An asyncio channel that sends `token` on every call, over TLS when `credentials` are given."""
    interceptors = None if token is None else [_AioUnaryToken(token), _AioStreamToken(token)]
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)


def channel(target: str, token: str | None = None, credentials: grpc.ChannelCredentials | None = None,
            options: Sequence[tuple[str, Any]] | None = None) -> grpc.Channel:
    """A blocking channel that sends `token` on every call, over TLS when `credentials` are given."""
    ch = grpc.insecure_channel(target, options=options) if credentials is None else \
        grpc.secure_channel(target, credentials, options=options)
    return ch if token is None else grpc.intercept_channel(ch, _SyncToken(token))
