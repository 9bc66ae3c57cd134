"""`python -m bench.chaos --quick` end to end: a real cluster under load loses an LM replica and the gateway (both
respawned), has a verifier frozen past the claim timeout and its Redis restarted; no request is lost, every answer
equals the clean run's, none is delivered twice, the services recover by themselves, and no secret leaks."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_quick_chaos(tmp_path, bench_module):
    bench_module("chaos").main(["--quick"])
    data = json.loads((tmp_path / "chaos_quick.json").read_text())
    assert (tmp_path / "chaos_quick.md").exists() and data["command"] and data["date"]
    assert data["requests"] >= 30
    assert data["kills"]["by_service"] == {"lm": 1, "gateway": 1}, data["kills"]
    assert all("back_after_s" in k for k in data["kills"]["events"]), data["kills"]["events"]
    stop = data["stop"]
    assert stop["service"] == "verifier" and stop["stopped_s"] > stop["claim_idle_s"], stop
    assert data["redis_restart"]["restarted"] and data["redis_restart"]["recovered"], data["redis_restart"]
    assert data["unexpected_exits"] == [] and all(data["serving_after"].values()), data["serving_after"]
    assert data["lost"] == 0, data["failures"]
    assert data["identical"] and data["mismatches"] == 0
    assert data["duplicates"]["delivered"] == 0
    assert data["streams"]["unanswered"] == 0, data["streams"]
    after = data["rows"][2]
    assert after["phase"] == "after" and after["ok"] == after["requests"] and after["mismatches"] == 0, after
    assert data["secrets"]["hits"] == 0, data["secrets"]["where"]
    assert data["secrets"]["searched"]["logs"] >= 7 and data["secrets"]["searched"]["metrics pages"] >= 7
    assert data["passed"]
