"""Shared fixtures: the real model and the real tiny-profile assets (built by `make test`), loaded once."""

from __future__ import annotations

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
def questions(layout):
    from services.retriever.corpus import read_questions

    return read_questions(layout.questions)


@pytest.fixture
def near_ties():
    """Append a description of every accepted near-tie; they are printed in the summary."""
    return NEAR_TIES


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"equivalence near-ties accepted (top-2 gap < 1e-4): {len(NEAR_TIES)}")
    for line in NEAR_TIES:
        terminalreporter.write_line(f"  near-tie: {line}")
