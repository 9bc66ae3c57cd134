"""`python -m bench.load --quick` end to end: two real clusters (batching on and off), every kind of workload, closed
and open loop; the results file has the issue's schema, every request equals its run alone, and the only failed
calls are the overload refusals the open loop may provoke."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

ROW = {"workload": str, "mode": str, "batching": bool, "concurrency": int, "tokens_per_s": float,
       "requests_per_s": float, "p50_s": float, "p99_s": float, "ttft_p50_s": float, "identical": bool}


def test_quick_load(tmp_path, bench_module):
    bench_module("load").main(["--quick"])
    data = json.loads((tmp_path / "load_quick.json").read_text())
    assert (tmp_path / "load_quick.md").exists()
    for key in ("speedup_at_8", "p99_at_8_over_alone", "speedup_at_16", "knn_speedup_at_8"):
        assert key in data and (data[key] is None or isinstance(data[key], float))  # no 8 or 16 clients in --quick
    for key in ("command", "machine", "date"):
        assert data[key]
    assert "git_revision" in data  # empty here: provenance asks git in the results folder, tmp_path
    rows = data["rows"]
    kinds = {r["workload"].split("-")[0] for r in rows}
    assert kinds == {"qa", "knn", "draft", "mix"}
    assert {r["loop"] for r in rows} == {"closed", "open"} and {r["batching"] for r in rows} == {True, False}
    for r in rows:
        for key, kind in ROW.items():
            assert isinstance(r[key], kind), (key, r)
        assert r["mean_batch"] is None or r["mean_batch"] >= 1.0  # null until the LM answers Stats
        assert r["identical"] and r["mismatches"] == 0, r
        assert set(r["errors"]) <= {"RESOURCE_EXHAUSTED"}, r  # refused under overload: expected, counted
        if r["loop"] == "closed":
            assert r["errors"] == {} and r["tokens_per_s"] > 0, r
    assert data["identical"]
