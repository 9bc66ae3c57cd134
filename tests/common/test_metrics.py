"""Metrics: the definitions follow Prometheus' conventions, the pure counting rules, both adapters' RPC counts, the
stream collector (lag and pending from XINFO GROUPS, Redis 6 included) and the HTTP endpoint on a free port.
End to end through `ralmspec up`: tests/e2e/test_metrics_up.py."""

from __future__ import annotations

import re
import urllib.request
import uuid

import pytest
import redis
from google.protobuf.wrappers_pb2 import StringValue
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from test_grpc_server import ECHO, client, server  # noqa: F401 - fixtures
from test_transport import Fake, serving, url, worker  # noqa: F401 - fixtures

from services.common import metrics
from services.common.errors import InvalidRequest
from services.common.transport import StreamClient

NAME = re.compile(r"^ralmspec_[a-z0-9_]+$")


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_every_definition_follows_the_naming_conventions():
    defs = metrics.definitions()
    assert len(defs) > 30
    for name, kind in defs.items():
        assert NAME.match(name), name  # the prefix, no colons, lower snake case
        assert name.endswith("_total") == (kind == "counter"), name
        if "second" in name:
            assert name.endswith(("_seconds", "_seconds_total")), name  # base unit, last
        assert not name.endswith(("_ms", "_milliseconds")), name


@pytest.mark.parametrize("strides,accepted,want", [
    ([], [], [0] * 3),
    ([3], [3], [1, 1, 1]),
    ([3, 3, 2], [0, 2, 1], [2, 1, 0]),  # round 2 accepted positions 1-2, round 3 position 1
    ([4], [1], [1, 0, 0]),
])
def test_accepted_per_position_counts_rounds_whose_first_p_steps_held(strides, accepted, want):
    assert metrics.per_position(strides, accepted)[:3] == want


def test_accepted_per_position_stops_at_max_position():
    counts = metrics.per_position([40], [40])
    assert len(counts) == metrics.MAX_POSITION and counts == [1] * metrics.MAX_POSITION


def test_one_requests_speculation_stats_move_each_counter_once():
    reg = CollectorRegistry()
    reg.register(metrics.GATEWAY)
    kind = f"k{uuid.uuid4().hex[:6]}"  # labels of this test only: the objects are process-wide
    stats = {"speculated": 7, "matched": 4, "rollbacks": 2, "round_strides": [3, 4], "round_accepted": [3, 1],
             "plain_steps": 5, "paused_steps": 1, "shadow_lookups": 3, "shadow_hits": 2,
             "critical_retrieval_s": 0.25, "retrieval_work_s": 1.0}
    metrics.observe_speculation(kind, True, stats)
    assert sample(reg, "ralmspec_spec_speculated_steps_total", kind=kind) == 7
    assert sample(reg, "ralmspec_spec_accepted_steps_total", kind=kind) == 4
    assert sample(reg, "ralmspec_spec_rollbacks_total", kind=kind) == 2
    assert [sample(reg, "ralmspec_spec_accepted_per_position_total", kind=kind, position=str(p))
            for p in (1, 2, 3, 4)] == [2, 1, 1, 0]
    assert sample(reg, "ralmspec_spec_stride_steps_count", kind=kind) == 2
    assert sample(reg, "ralmspec_spec_stride_steps_sum", kind=kind) == 7
    assert sample(reg, "ralmspec_spec_plain_steps_total", kind=kind) == 5
    assert sample(reg, "ralmspec_spec_paused_steps_total", kind=kind) == 1
    assert sample(reg, "ralmspec_spec_retrieval_seconds_total", kind=kind, path="critical") == 0.25
    assert sample(reg, "ralmspec_spec_retrieval_seconds_total", kind=kind, path="hidden") == 0.75
    # checked: 4 accepted + 2 mismatched + 3 shadow lookups; right: 4 + 2
    assert sample(reg, "ralmspec_spec_cache_lookups_total", kind=kind, prefetch="true") == 9
    assert sample(reg, "ralmspec_spec_cache_hits_total", kind=kind, prefetch="true") == 6


def test_drafts_are_counted_per_source_and_empty_trees_not_at_all():
    reg = CollectorRegistry()
    reg.register(metrics.GATEWAY)
    source = f"s{uuid.uuid4().hex[:6]}"
    metrics.observe_drafts(source, 0, 0)
    assert reg.get_sample_value("ralmspec_rest_draft_tokens_proposed_total", {"source": source}) is None
    metrics.observe_drafts(source, 16, 3)
    assert sample(reg, "ralmspec_rest_draft_tokens_proposed_total", source=source) == 16
    assert sample(reg, "ralmspec_rest_draft_tokens_accepted_total", source=source) == 3


@pytest.mark.asyncio
async def test_the_grpc_adapter_counts_each_call_once_by_code(client):  # noqa: F811
    reg = CollectorRegistry()
    reg.register(metrics.RPC)
    labels = {"service": ECHO.full_name, "transport": "grpc"}
    before = {c: sample(reg, "ralmspec_rpc_server_handled_total", method=m, code=c, **labels)
              for m, c in (("Echo", "OK"), ("Fail", "INVALID_ARGUMENT"))}
    await client.call(ECHO, ECHO.ops["Echo"], StringValue(value="a"))
    await client.call(ECHO, ECHO.ops["Echo"], StringValue(value="b"))
    with pytest.raises(InvalidRequest):
        await client.call(ECHO, ECHO.ops["Fail"], StringValue(value="c"))
    assert sample(reg, "ralmspec_rpc_server_handled_total", method="Echo", code="OK", **labels) == before["OK"] + 2
    assert sample(reg, "ralmspec_rpc_server_handled_total", method="Fail", code="INVALID_ARGUMENT",
                  **labels) == before["INVALID_ARGUMENT"] + 1
    assert sample(reg, "ralmspec_rpc_server_handling_seconds_count", method="Echo", **labels) >= 2


@pytest.mark.asyncio
async def test_the_stream_adapter_counts_calls_and_the_collector_reads_lag_and_pending(url):  # noqa: F811
    fake = Fake()
    w = worker(url, fake, "c1")
    reg = CollectorRegistry()
    reg.register(metrics.RPC)
    sync = redis.Redis.from_url(url)
    reg.register(metrics.StreamCollector(w, sync))
    labels = {"service": fake.service.full_name, "transport": "stream"}  # shared with test_transport's Fake
    before = {c: sample(reg, "ralmspec_rpc_server_handled_total", method=m, code=c, **labels)
              for m, c in (("Echo", "OK"), ("Fail", "INVALID_ARGUMENT"))}
    async with StreamClient(url, name="t") as c:
        for _ in range(3):  # queued before any worker reads: the group's lag (created by the worker below)
            sync.xadd(fake.stream, {"op": "Echo", "id": "x", "reply_to": "", "deadline_ms": 0, "body": b""})
        sync.xgroup_create(fake.stream, w.group, id="0", mkstream=True)
        groups = {"stream": fake.stream, "group": w.group}
        assert sample(reg, "ralmspec_stream_lag_entries", **groups) == 3
        assert sample(reg, "ralmspec_stream_pending_entries", **groups) == 0
        async with serving(w):
            await c.call(fake.stream, fake.op("Echo"), StringValue(value="hi"))
            with pytest.raises(InvalidRequest):
                await c.call(fake.stream, fake.op("Fail"), StringValue(value="x"))
    assert sample(reg, "ralmspec_rpc_server_handled_total", method="Echo", code="OK", **labels) == before["OK"] + 4
    assert sample(reg, "ralmspec_rpc_server_handled_total", method="Fail", code="INVALID_ARGUMENT",
                  **labels) == before["INVALID_ARGUMENT"] + 1
    assert sample(reg, "ralmspec_stream_lag_entries", **groups) == 0
    assert sample(reg, "ralmspec_stream_pending_entries", **groups) == 0
    assert sample(reg, "ralmspec_stream_reclaimed_entries_total") == 0
    sync.close()


@pytest.mark.asyncio
async def test_a_stream_client_over_max_pending_counts_its_refusal(url):  # noqa: F811
    fake = Fake()
    reg = CollectorRegistry()
    reg.register(metrics.RPC)
    async with StreamClient(url, name="t", max_pending=0) as c:
        with pytest.raises(Exception, match="in flight"):
            await c.call(fake.stream, fake.op("Echo"), StringValue(value="x"))
    assert sample(reg, "ralmspec_stream_client_overloaded_total", stream=fake.stream) == 1


def test_the_endpoint_serves_the_exposition_format_on_a_free_port():
    reg = CollectorRegistry()
    port = metrics.start("127.0.0.1", 0, registry=reg)
    metrics.observe_rpc("grpc", "ralmspec.test.Endpoint", "Ping", "OK", 0.0)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    handled = families["ralmspec_rpc_server_handled"]  # the parser drops a counter's _total
    assert any(s.labels.get("service") == "ralmspec.test.Endpoint" and s.value == 1 for s in handled.samples)
