"""`ralmspec serve <service>`: one service process (gRPC server + Redis stream worker), wired from settings.

Each function loads only what its service needs, binds the handlers and serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from services.common import env, metrics, otel
from services.common.contracts import LM
from services.common.grpc_server import GATEWAY_MAX_MESSAGE_BYTES
from services.common.serving import ServeSettings, serve
from services.common.transport import StreamClient
from services.datastore.proposers import LocalDrafts
from services.gateway.settings import GatewaySettings
from services.retriever.retriever import RETRIEVERS, Retriever

if TYPE_CHECKING:
    from services.retriever.knn_index import KnnDatastore

log = logging.getLogger(__name__)


def _retrievers(engine: GatewaySettings, names: Sequence[str]) -> dict[str, Retriever]:
    from services.retriever.encoder import Encoder
    from services.retriever.retriever import open_retriever

    encoder = Encoder() if any(n != "sparse" for n in names) else None
    return {n: open_retriever(n, engine.layout, encoder) for n in names}


def _drafts(engine: GatewaySettings) -> LocalDrafts:
    """REST's datastore when built (`ralmspec assets`), memory-mapped; prompt lookup always."""
    from services.datastore.rest_datastore import RestDatastore

    path = engine.layout.rest_datastore(engine.model)
    return LocalDrafts(RestDatastore.load(path) if path.exists() else None)


def _knn(engine: GatewaySettings, indexes: Sequence[str]) -> KnnDatastore | None:
    """KNN-LM's datastore when built (`ralmspec assets`), with the given indexes (none: keys, values, texts)."""
    from services.retriever.knn_index import KnnDatastore

    folder = engine.layout.knn_datastore(engine.model)
    if not (folder / "meta.json").exists():
        log.info("no KNN-LM datastore at %s: KNN-LM requests will be refused", folder)
        return None
    return KnnDatastore.load(folder, indexes)


def _closer(*pools: ThreadPoolExecutor) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        for p in pools:
            p.shutdown(wait=True)

    return close


async def serve_lm(engine: GatewaySettings, s: ServeSettings) -> None:
    from services.lm.engine import LmEngine, LmSettings
    from services.lm.model import load
    from services.lm.service import lm_service, stats_reply

    lm = LmEngine(load(engine.model, engine.layout.models, engine.device, engine.dtype), settings=LmSettings.from_env())
    service, batch = lm_service(lm, s.own_stream(LM))
    metrics.expose(metrics.LM, metrics.SnapshotCollector(metrics.LM_STATS, lambda: stats_reply(lm, batch)))

    async def close() -> None:
        await asyncio.to_thread(batch.close)

    await serve(service, s, pinned=True, on_close=close)


async def serve_retriever(engine: GatewaySettings, s: ServeSettings, names: Sequence[str]) -> None:
    from services.retriever.service import RetrieverServiceSettings, retriever_service

    service, pool = retriever_service(_retrievers(engine, names), knn=_knn(engine, ("exact", "approx")),
                                      settings=RetrieverServiceSettings.from_env())
    metrics.expose(metrics.RETRIEVER)
    await serve(service, s, on_close=_closer(pool))


async def serve_datastore(engine: GatewaySettings, s: ServeSettings, names: Sequence[str]) -> None:
    from services.common.contracts import DATASTORE
    from services.datastore.service import datastore_service

    service, pool = datastore_service(_retrievers(engine, names), s.own_stream(DATASTORE), _drafts(engine),
                                      knn=_knn(engine, ()))
    await serve(service, s, pinned=True, on_close=_closer(pool))


async def serve_verifier(engine: GatewaySettings, s: ServeSettings) -> None:
    from services.verifier.service import VerifierSettings, verifier_service

    client = await StreamClient(s.redis_url, name=f"verifier-{s.replica}", maxlen=s.maxlen).start()

    async def close() -> None:
        await client.close()

    metrics.expose(metrics.VERIFIER)
    await serve(verifier_service(client, VerifierSettings.from_env(s.call_timeout_s)), s, on_close=close)


async def serve_gateway(engine: GatewaySettings, s: ServeSettings, names: Sequence[str], preset: str) -> None:
    from services.gateway.admission import RequestPool
    from services.gateway.controller import Controller
    from services.gateway.knn_generation import KnnLmEngine
    from services.gateway.ralm import RalmEngine
    from services.gateway.ralmspec import PRESETS
    from services.gateway.remote import Bridge, RemoteLm, remote_backends, remote_knn_backends
    from services.gateway.service import gateway_service
    from services.lm.model import load_tokenizer
    from services.retriever.docstore import DocStore

    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    tok, max_positions = load_tokenizer(engine.model, engine.layout.models)
    client = await StreamClient(s.redis_url, name=f"gateway-{s.replica}", maxlen=s.maxlen).start()
    bridge = Bridge(client, asyncio.get_running_loop(), s.call_timeout_s)
    backends = remote_backends(bridge, names)
    ralm = RalmEngine(tok, max_positions, DocStore.load(engine.layout.passages), backends)
    assert isinstance(backends.lm, RemoteLm)
    workers = max(4, s.concurrency)
    knn = KnnLmEngine(tok, remote_knn_backends(bridge, backends.lm), ralm.stop_sets, verify_workers=workers)
    pool = RequestPool(s.concurrency, engine.max_queue)
    pause_at = engine.spec_pause_at
    controller = Controller(ralm, verify_workers=workers, knn=knn,
                            busy=lambda: pause_at > 0 and pool.running >= pause_at)

    async def close() -> None:
        await asyncio.to_thread(pool.close)  # requests still running stop at their next step (their calls ended)
        await client.close()

    metrics.expose(metrics.GATEWAY)
    # Generate is served over gRPC only: a gateway is the public edge, and its controller's own calls to the
    # other services are what travel over Redis.
    await serve(gateway_service(controller, PRESETS[preset], pool), s, streams=False, on_close=close,
                max_request_bytes=GATEWAY_MAX_MESSAGE_BYTES)


def run(service: str, profile: str | None, s: ServeSettings, retrievers: Sequence[str] | None) -> None:
    """Serve `service` with settings `s` (`serving.configure_process` made them and set up logging first)."""
    engine = GatewaySettings.from_env(profile=profile)
    names = list(retrievers or RETRIEVERS)
    mains: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
        "lm": lambda: serve_lm(engine, s),
        "retriever": lambda: serve_retriever(engine, s, names),
        "datastore": lambda: serve_datastore(engine, s, names),
        "verifier": lambda: serve_verifier(engine, s),
        "gateway": lambda: serve_gateway(engine, s, names, env.PRESET.get()),
    }
    try:
        asyncio.run(mains[service]())
    finally:
        otel.shutdown()  # flushes buffered spans
