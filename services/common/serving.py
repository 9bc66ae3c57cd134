"""Run one service process: its gRPC server (health, reflection) and its Redis stream worker, from one table.

Shutdown on SIGTERM/SIGINT is graceful: health goes NOT_SERVING, the worker stops reading and finishes (and
acks) what it holds, gRPC drains in-flight calls, then `on_close` frees the engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from services.common import env, logs, metrics, otel
from services.common.auth import Auth
from services.common.contracts import replica_stream
from services.common.errors import InvalidRequest
from services.common.grpc_server import install_sigterm, start_server
from services.common.ops import ServiceDef
from services.common.redis_conn import sync_connect
from services.common.tls import Tls
from services.common.transport import StreamWorker

log = logging.getLogger(__name__)


def _default_replica() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class ServeSettings:
    """Transport settings every service shares (each service adds its own engine settings)."""

    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)  # may hold a password: never printed
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = 0  # Prometheus /metrics (HTTP); 0 = a free one
    replica: str = field(default_factory=_default_replica)
    concurrency: int = 8
    claim_idle_ms: int = 30_000
    max_deliveries: int = 3
    maxlen: int = 10_000
    call_timeout_s: float = 120.0
    drain_s: float = 30.0
    auth: Auth = field(default_factory=Auth.off)  # the bearer tokens its gRPC calls need
    tls: Tls | None = None  # its gRPC server's certificate (None: plaintext)

    @classmethod
    def from_env(cls, public: bool = False, **overrides: object) -> ServeSettings:
        """`public`: the gateway, which accepts API tokens; any other service accepts the cluster token only. An
        incomplete security set-up (authentication on without a token file, half a TLS pair) raises InvalidRequest,
        naming the variable to set."""
        try:
            auth, tls = Auth.from_env(public), Tls.from_env()
        except ValueError as e:
            raise InvalidRequest(str(e)) from e
        s = cls(auth=auth, tls=tls, redis_url=env.REDIS_URL.get() or cls.redis_url, host=env.HOST.get(),
                port=int(env.PORT.get()), metrics_port=int(env.METRICS_PORT.get()),
                replica=env.REPLICA.get() or _default_replica(), concurrency=int(env.CONCURRENCY.get()),
                claim_idle_ms=int(env.CLAIM_IDLE_MS.get()), max_deliveries=int(env.MAX_DELIVERIES.get()),
                maxlen=int(env.MAXLEN.get()),
                call_timeout_s=float(env.CALL_TIMEOUT_S.get()), drain_s=float(env.DRAIN_S.get()))
        return replace(s, **{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]

    def own_stream(self, service: ServiceDef) -> str:
        return replica_stream(service, self.replica)


def configure_process(service: str, port: int | None = None, replica: str | None = None) -> ServeSettings:
    """A service process's settings, its logs (RALMSPEC_LOG_FORMAT, JSON by default, each line naming the service and
    replica) and its optional OpenTelemetry export. Called before the engines are imported, so that what they log
    while loading is in the same format."""
    s = ServeSettings.from_env(public=service == "gateway", port=port, replica=replica)
    logs.configure("INFO", "json", service=service, replica=s.replica)
    otel.setup(service, s.replica)  # off unless asked for (RALMSPEC_OTEL, OTEL_EXPORTER_OTLP_ENDPOINT)
    return s


async def serve(service: ServiceDef, s: ServeSettings, *, pinned: bool = False, streams: bool = True,
                on_close: Callable[[], Awaitable[None]] | None = None, max_request_bytes: int | None = None) -> None:
    """Serve until SIGTERM. `pinned`: also read this replica's own stream (sessions opened here go there);
    `max_request_bytes`: the gRPC server's receive limit, when not the internal default."""
    options = [] if max_request_bytes is None else [("grpc.max_receive_message_length", max_request_bytes)]
    grpc_server = await start_server([service], s.port, s.host, options=options, auth=s.auth, tls=s.tls)
    worker = None
    tasks: list[asyncio.Task[None]] = []
    if streams:
        names = [service.stream, s.own_stream(service)] if pinned else [service.stream]
        worker = StreamWorker(s.redis_url, service, s.replica, streams=names, concurrency=s.concurrency,
                              claim_idle_ms=s.claim_idle_ms, maxlen=s.maxlen, max_deliveries=s.max_deliveries)
        tasks.append(asyncio.create_task(worker.run()))
        metrics.expose(metrics.StreamCollector(worker, sync_connect(s.redis_url)))
    metrics_port = metrics.start(s.host, s.metrics_port)
    stopped = asyncio.Event()

    async def stop() -> None:
        log.info("%s: stopping (draining in-flight work, up to %.0f s)", service.full_name, s.drain_s)
        if worker is not None:
            await asyncio.wait_for(worker.drain(), s.drain_s)
        await grpc_server.stop(s.drain_s)
        if on_close is not None:
            await on_close()
        stopped.set()

    install_sigterm(asyncio.get_running_loop(), stop)
    # One parseable line: `ralmspec up` and operators read the bound port from it.
    print(f"ready {service.full_name} grpc={s.host}:{grpc_server.port} metrics={s.host}:{metrics_port} "
          f"replica={s.replica}", flush=True)
    await stopped.wait()
    for t in tasks:
        t.cancel()
