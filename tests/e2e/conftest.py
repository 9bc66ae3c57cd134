"""Fixtures of the end-to-end tests."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench_module(tmp_path, monkeypatch) -> Callable[[str], ModuleType]:
    """Imports `bench.<name>` (not an installed package) with its results written under tmp_path, so the committed
    results stay as they are."""
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setattr(importlib.import_module("bench.results_io"), "RESULTS", tmp_path)
    return lambda name: importlib.import_module(f"bench.{name}")
