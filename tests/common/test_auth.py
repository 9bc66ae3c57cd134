"""Bearer tokens: the rules of a token file, the interceptor, and a walk over every RPC of every contract, each
served with its real request and reply types: no token or a wrong one gets UNAUTHENTICATED with the same message and
never reaches the handler; the right one does; health and reflection stay open."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common import auth, env
from services.common.contracts import SERVICES
from services.common.errors import InvalidRequest
from services.common.grpc_server import start_server
from services.common.ops import Operation, ServiceDef
from services.common.serving import ServeSettings

# Fixed, not `new_token()`: parametrize ids embed them, and xdist workers must collect the same ids.
API, CLUSTER = "api-token-0123456789abcdefghij", "cluster-token-0123456789abcdef"


def test_new_tokens_are_long_and_distinct():
    tokens = {auth.new_token() for _ in range(100)}
    assert len(tokens) == 100 and all(len(t) >= 43 for t in tokens)


def test_token_file_rules(tmp_path: Path):
    f = tmp_path / "tokens"
    f.write_text(f"# clients\n\n{API}\n  {CLUSTER}  \n")
    assert auth.read_tokens(f) == [API, CLUSTER]
    for text, says in [("# none\n\n", "holds no token"), ("secret\n", "shorter than 16"),
                       ("has a space in it, long\n", "spaces")]:
        f.write_text(text)
        with pytest.raises(ValueError, match=says):
            auth.read_tokens(f)
    with pytest.raises(ValueError, match="cannot read the token file"):
        auth.read_tokens(tmp_path / "missing")


@pytest.mark.parametrize("sent,ok", [
    (None, False), ("", False), (API, False), (f"Basic {API}", False), (f"Bearer {API}x", False),
    (f"Bearer {CLUSTER}", False), (f"Bearer {API}", True), (f"bearer {API}", True), (f"Bearer  {API} ", True)])
def test_allows_only_an_accepted_bearer_token(sent, ok):
    md = [] if sent is None else [(auth.METADATA_KEY, sent)]
    assert auth.Auth.of([API]).allows(md) is ok
    assert auth.Auth.off().allows(md)


def test_authentication_is_on_unless_turned_off(monkeypatch, tmp_path: Path):
    for var in (env.AUTH, env.API_TOKENS_FILE, env.CLUSTER_TOKEN_FILE):
        monkeypatch.delenv(var.name, raising=False)
    with pytest.raises(InvalidRequest, match="RALMSPEC_CLUSTER_TOKEN_FILE is not set.*RALMSPEC_AUTH=off"):
        ServeSettings.from_env()
    with pytest.raises(InvalidRequest, match="RALMSPEC_API_TOKENS_FILE is not set"):
        ServeSettings.from_env(public=True)
    monkeypatch.setenv(env.AUTH.name, "maybe")
    with pytest.raises(InvalidRequest, match="must be on or off"):
        ServeSettings.from_env()
    monkeypatch.setenv(env.AUTH.name, "off")
    assert not ServeSettings.from_env().auth.on
    monkeypatch.setenv(env.AUTH.name, "on")
    (tmp_path / "api").write_text(API + "\n")
    (tmp_path / "cluster").write_text(CLUSTER + "\n")
    monkeypatch.setenv(env.API_TOKENS_FILE.name, str(tmp_path / "api"))
    monkeypatch.setenv(env.CLUSTER_TOKEN_FILE.name, str(tmp_path / "cluster"))
    monkeypatch.setenv(env.REDIS_URL.name, f"redis://:{CLUSTER}@10.0.0.1:6379/0")
    internal, public = ServeSettings.from_env(), ServeSettings.from_env(public=True)
    assert internal.auth.allows(auth.metadata(CLUSTER)) and not internal.auth.allows(auth.metadata(API))
    assert public.auth.allows(auth.metadata(API)) and not public.auth.allows(auth.metadata(CLUSTER))
    assert public.auth.token == CLUSTER  # what the gateway would present to the other services
    assert public.redis_url.startswith(f"redis://:{CLUSTER}@")
    for s in (public, internal):  # settings get printed: no secret in them
        assert API not in repr(s) and CLUSTER not in repr(s)


def _bound(service: ServiceDef, reached: list[str]) -> ServiceDef:
    """`service` with a handler per operation that records the call and answers an empty reply."""

    def handler(op: Operation):  # noqa: ANN202
        async def unary(request: Message) -> Message:
            reached.append(op.name)
            return op.reply()

        async def stream(request: Message) -> AsyncIterator[Message]:
            reached.append(op.name)
            yield op.reply()

        return stream if op.streaming else unary

    return service.bind(**{name: handler(op) for name, op in service.ops.items()})


def _call(ch: grpc.aio.Channel, service: ServiceDef, op: Operation):  # noqa: ANN202
    if op.streaming:
        async def stream() -> list[bytes]:
            return [r async for r in ch.unary_stream(service.method(op.name))(b"", timeout=10)]
        return stream()
    return ch.unary_unary(service.method(op.name))(b"", timeout=10)


@pytest.mark.asyncio
@pytest.mark.parametrize("name", sorted(SERVICES))
async def test_every_rpc_refuses_an_unauthenticated_call(name: str):
    service, reached = SERVICES[name], []
    token = API if name == "gateway" else CLUSTER
    server = await start_server([_bound(service, reached)], 0, auth=auth.Auth.of([token]))
    target = f"127.0.0.1:{server.port}"
    try:
        for sent in (None, auth.new_token(), API if token == CLUSTER else CLUSTER):  # none, unknown, the other kind
            async with auth.aio_channel(target, sent) as ch:
                for op in service.ops.values():
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await _call(ch, service, op)
                    assert (e.value.code(), e.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, auth.REFUSED), \
                        f"{service.method(op.name)} with {'no' if sent is None else 'a wrong'} token"
                assert reached == []  # refused before any handler ran
                health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no token
                listed = [r async for r in reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)]
                assert service.full_name in {s.name for s in listed[0].list_services_response.service}
        async with auth.aio_channel(target, token) as ch:
            for op in service.ops.values():
                await _call(ch, service, op)
        assert reached == list(service.ops)  # the right token reaches every handler
    finally:
        await server.stop(0)
