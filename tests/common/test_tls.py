"""TLS with certificates made at test time (`openssl`): gRPC (server TLS, mutual TLS) and Redis over TLS with a
password (`rediss://`), each refusing a plaintext client; the stream transport works over it unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path

import grpc
import pytest
import redis
from google.protobuf.wrappers_pb2 import StringValue
from pki import Pki, make_pki

from services.common import auth, env
from services.common.grpc_server import start_server
from services.common.ops import Operation, ServiceDef
from services.common.redis_server import LocalRedis, RedisTls
from services.common.tls import Tls, client_credentials, redact
from services.common.transport import StreamClient, StreamWorker

TOKEN = auth.new_token()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def echo_service() -> ServiceDef:
    async def echo(req: StringValue) -> StringValue:
        return StringValue(value=req.value)

    return ServiceDef.of("test.Echo", f"test:{uuid.uuid4().hex}", Operation("Echo", StringValue, StringValue, echo))


async def call(target: str, credentials: grpc.ChannelCredentials | None, token: str | None = TOKEN) -> str:
    service = echo_service()
    async with auth.aio_channel(target, token, credentials) as ch:
        reply = await ch.unary_unary(service.method("Echo"), request_serializer=StringValue.SerializeToString,
                                     response_deserializer=StringValue.FromString)(StringValue(value="hi"), timeout=5)
    return reply.value


async def refused(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call(target, credentials)
    return e.value.code()


@pytest.mark.asyncio
async def test_grpc_tls_refuses_plaintext_and_unknown_servers(pki: Pki):
    server = await start_server([echo_service()], 0, auth=auth.Auth.of([TOKEN]),
                                tls=Tls(pki.server_cert, pki.server_key))
    target = f"127.0.0.1:{server.port}"
    try:
        assert await call(target, client_credentials(pki.ca)) == "hi"
        assert await refused(target, None) == grpc.StatusCode.UNAVAILABLE  # plaintext: the handshake fails
        assert await refused(target, client_credentials(pki.other_ca)) == grpc.StatusCode.UNAVAILABLE  # untrusted
        with pytest.raises(grpc.aio.AioRpcError) as e:  # TLS is not authentication: the token is still needed
            await call(target, client_credentials(pki.ca), token=None)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop(0)


@pytest.mark.asyncio
async def test_mutual_tls_refuses_a_client_without_a_certificate(pki: Pki):
    server = await start_server([echo_service()], 0, auth=auth.Auth.of([TOKEN]),
                                tls=Tls(pki.server_cert, pki.server_key, pki.ca, client_auth=True))
    target = f"127.0.0.1:{server.port}"
    try:
        assert await call(target, client_credentials(pki.ca, pki.client_cert, pki.client_key)) == "hi"
        assert await refused(target, client_credentials(pki.ca)) == grpc.StatusCode.UNAVAILABLE
        assert await refused(target, None) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)


def test_tls_settings_from_env(monkeypatch, pki: Pki, tmp_path: Path):
    for var in (env.TLS_CERT, env.TLS_KEY, env.TLS_CA, env.TLS_CLIENT_AUTH):
        monkeypatch.delenv(var.name, raising=False)
    assert Tls.from_env() is None
    monkeypatch.setenv(env.TLS_CERT.name, str(pki.server_cert))
    with pytest.raises(ValueError, match="both RALMSPEC_TLS_CERT and RALMSPEC_TLS_KEY"):
        Tls.from_env()
    monkeypatch.setenv(env.TLS_KEY.name, str(tmp_path / "missing.key"))
    with pytest.raises(ValueError, match="cannot read the TLS key"):
        Tls.from_env()
    monkeypatch.setenv(env.TLS_KEY.name, str(pki.server_key))
    monkeypatch.setenv(env.TLS_CLIENT_AUTH.name, "1")
    with pytest.raises(ValueError, match="needs RALMSPEC_TLS_CA"):
        Tls.from_env()
    monkeypatch.setenv(env.TLS_CA.name, str(pki.ca))
    assert Tls.from_env() == Tls(pki.server_cert, pki.server_key, pki.ca, True)


@pytest.mark.parametrize("client_auth", [False, True])
def test_redis_over_tls_with_a_password(pki: Pki, client_auth: bool):
    password = auth.new_token()
    with LocalRedis(password=password, tls=RedisTls(pki.server_cert, pki.server_key, pki.ca, client_auth)) as server:
        assert server.url.startswith("rediss://") and password not in redact(server.url)
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.close()
        plain = redis.Redis(port=server.port, socket_timeout=1)
        with pytest.raises(redis.ConnectionError):  # the plaintext port is closed; TLS speaks to no plain client
            plain.ping()
        wrong = redis.Redis.from_url(server.url.replace(password, auth.new_token()))
        with pytest.raises(redis.AuthenticationError):
            wrong.ping()
        if client_auth:  # without a client certificate: the handshake fails
            bare = redis.Redis.from_url(server.url.split("&ssl_certfile")[0], socket_timeout=1)
            with pytest.raises(redis.ConnectionError):
                bare.ping()


@pytest.mark.asyncio
async def test_stream_transport_over_tls_with_a_password(pki: Pki):
    with LocalRedis(password=auth.new_token(), tls=RedisTls(pki.server_cert, pki.server_key, pki.ca)) as server:
        service = echo_service()
        worker = StreamWorker(server.url, service, "w1", block_ms=100)
        task = asyncio.create_task(worker.run())
        client = await StreamClient(server.url).start()
        try:
            reply = await client.call(service.stream, service.ops["Echo"], StringValue(value="over tls"), timeout_s=10)
            assert reply.value == "over tls"
        finally:
            await client.close()
            await worker.drain()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def test_redact_hides_passwords():
    assert redact("redis://:s3cret@host:6379/0") == "redis://***@host:6379/0"
    assert redact("rediss://user:s3cret@host:6380/0?ssl_ca_certs=/ca.pem") == "rediss://***@host:6380/0?ssl_ca_certs=/ca.pem"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"
