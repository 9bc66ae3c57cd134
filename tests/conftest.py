"""Shared fixtures: the real model and the real tiny-profile assets (built by `make test`), loaded once."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RALMSPEC_PROFILE", "tiny")

NEAR_TIES: list[str] = []  # every certified near-tie a test accepted, reported at the end of the run


@pytest.fixture(scope="session")
def settings():
    from services.gateway.settings import GatewaySettings

    return GatewaySettings.from_env(profile="tiny")


@pytest.fixture(scope="session")
def layout(settings):
    return settings.layout


@pytest.fixture(scope="session")
def engine(settings):
    from services.gateway.inprocess import open_engine

    return open_engine(settings)


@pytest.fixture(scope="session")
def knn_ds(settings):
    """The tiny profile's KNN-LM datastore, both indexes."""
    from services.retriever.knn_index import KnnDatastore

    return KnnDatastore.load(settings.layout.knn_datastore(settings.model))


@pytest.fixture(scope="session")
def knn(engine, knn_ds):
    """KNN-LM in process, on the shared engine's LM."""
    from services.gateway.knn_generation import KnnLmEngine, local_knn_backends

    return KnnLmEngine(engine.tok, local_knn_backends(engine.backends.lm, knn_ds), stops=engine.stop_sets)


@pytest.fixture(scope="session")
def questions(layout):
    from services.retriever.corpus import read_questions

    return read_questions(layout.questions)


@pytest.fixture
def same_tokens():
    """`same_tokens(want, got, label)`: assert that `got` (anything with `.tokens` and `.gaps`) emitted `want`'s
    tokens, or first differs at a certified near-tie, which is recorded for the summary; True when identical."""
    from services.common.equivalence import compare

    def check(want, got, label: str) -> bool:
        v = compare(want.tokens, want.gaps, got.tokens, got.gaps)
        assert v.ok, f"{label}: tokens differ at {v.position} (larger top-2 gap {v.gap}; a near-tie needs both < 1e-4)"
        if not v.identical:
            NEAR_TIES.append(f"{label}: position {v.position}, both gaps <= {v.gap:.2e}")
        return v.identical

    return check


def pytest_sessionfinish(session):
    """An xdist worker hands its near-ties to the controller, which reports them all."""
    out = getattr(session.config, "workeroutput", None)
    if out is not None:
        out["near_ties"] = json.dumps(NEAR_TIES)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown (and not called) when xdist is absent or disabled
def pytest_testnodedown(node, error):
    NEAR_TIES.extend(json.loads(getattr(node, "workeroutput", {}).get("near_ties", "[]")))


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"equivalence near-ties accepted (both runs' top-2 gaps < 1e-4): {len(NEAR_TIES)}")
    for line in NEAR_TIES:
        terminalreporter.write_line(f"  near-tie: {line}")
