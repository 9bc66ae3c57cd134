"""`python -m bench.fuzz --quick` end to end: 1,000 generated requests to the gateway and 1,000 malformed entries
onto every service's stream of a real cluster; no crash, no hang, only the allowed answers, bounded memory, and the
probe request's tokens unchanged."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_quick_fuzz(tmp_path, bench_module):
    bench_module("fuzz").main(["--quick"])
    data = json.loads((tmp_path / "fuzz_quick.json").read_text())
    assert data["requests_sent"] == 1000 and data["entries_sent"] == 1000
    assert data["crashes"] == 0, data["serving_after"]
    assert data["hangs"] == 0, (data["gateway"]["bad_examples"], data["streams"]["bad_examples"])
    assert data["unexpected_codes"] == 0, (data["gateway"]["bad_examples"], data["streams"]["bad_examples"])
    assert data["probe_identical"] and all(data["rss_bounded"].values()), data["max_rss_mb"]
    assert data["streams"]["opened"] > 0 and data["streams"]["closed"] == data["streams"]["opened"]
    assert data["passed"]
    assert data["gateway"]["codes"].get("INVALID_ARGUMENT", 0) > 0 and data["streams"]["codes"].get("OK", 0) > 0
