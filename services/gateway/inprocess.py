"""In-process runtime: the controller drives engine objects directly (library API, CLI, tests, benchmarks)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from services.datastore.rest_datastore import RestDatastore
from services.gateway.backends import local_backends
from services.gateway.knn_generation import KnnLmEngine, local_knn_backends
from services.gateway.ralm import RalmEngine
from services.gateway.settings import GatewaySettings
from services.lm.engine import LmEngine, LmSettings
from services.lm.model import load
from services.retriever.docstore import DocStore
from services.retriever.encoder import Encoder
from services.retriever.retriever import RETRIEVERS, Retriever, open_retriever

if TYPE_CHECKING:
    from services.retriever.knn_index import KnnDatastore


def open_engine(settings: GatewaySettings, retrievers: Sequence[str] = RETRIEVERS) -> RalmEngine:
    lay = settings.layout
    lm = open_lm(settings)
    encoder = Encoder() if any(r != "sparse" for r in retrievers) else None
    opened: dict[str, Retriever] = {r: open_retriever(r, lay, encoder) for r in retrievers}
    # torch and FAISS share one OpenMP runtime here: opening a dense index set both to FAISS's thread count.
    # RALMSPEC_THREADS, when set, wins for both (the LM service process applies the same setting).
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    rest = lay.rest_datastore(settings.model)
    datastore = RestDatastore.load(rest) if rest.exists() else None  # memory-mapped: costs nothing until used
    return RalmEngine(lm.lm.tokenizer, lm.lm.max_positions, DocStore.load(lay.passages),
                      local_backends(lm, opened, datastore), lm.stops)


def open_lm(settings: GatewaySettings) -> LmEngine:
    return LmEngine(load(settings.model, settings.layout.models, settings.device, settings.dtype),
                    settings=LmSettings.from_env())


def open_knn_datastore(settings: GatewaySettings, nprobe: int = 32) -> KnnDatastore:
    """The profile's KNN-LM datastore, both indexes (`ralmspec assets` builds it)."""
    from services.retriever.knn_index import KnnDatastore

    ds = KnnDatastore.load(settings.layout.knn_datastore(settings.model), nprobe=nprobe)
    if settings.threads > 0:  # after FAISS is up: they share one OpenMP runtime (see open_engine)
        torch.set_num_threads(settings.threads)
    return ds


def open_knnlm(settings: GatewaySettings, lm: LmEngine | None = None, ds: KnnDatastore | None = None) -> KnnLmEngine:
    """KNN-LM over the profile's datastore, on `lm` (or a newly loaded model) and `ds` (or the profile's)."""
    lm = lm or open_lm(settings)
    ds = ds or open_knn_datastore(settings)
    return KnnLmEngine(lm.lm.tokenizer, local_knn_backends(lm, ds), stops=lm.stops)
