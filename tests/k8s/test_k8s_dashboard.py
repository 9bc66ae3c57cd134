"""The Grafana dashboard (k8s/components/monitoring) queries only metrics the code defines, covers what an operator
of a speculative server needs, and is the file the monitoring overlay ships."""

from __future__ import annotations

import json
import re

from k8s_manifests import K8S, data_of, named, render

from services.common import metrics

DASHBOARD = K8S / "components" / "monitoring" / "ralmspec-dashboard.json"
SUFFIXES = ("_bucket", "_sum", "_count")  # a histogram's series


def exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def queried(dashboard: dict) -> set[str]:
    """The metric families the dashboard's queries read (a histogram's series name its family)."""
    names = {m for e in exprs(dashboard) for m in re.findall(r"\b(ralmspec_[a-z0-9_]+)", e)}
    return {next((n.removesuffix(s) for s in SUFFIXES if n.endswith(s) and n.removesuffix(s) in
                  metrics.definitions()), n) for n in names}


def test_every_queried_metric_is_defined():
    dashboard = json.loads(DASHBOARD.read_text())
    defined = metrics.definitions()
    assert queried(dashboard) - set(defined) == set()
    for e in exprs(dashboard):  # rate() only over counters and histogram series, never over gauges
        for name in re.findall(r"rate\((ralmspec_[a-z0-9_]+)", e):
            assert name.endswith(SUFFIXES) or defined.get(name) == "counter", f"rate() over {name}: {e}"


def test_the_dashboard_covers_speculation_latency_batching_lag_and_rpcs():
    got = queried(json.loads(DASHBOARD.read_text()))
    for name in ("ralmspec_spec_accepted_steps_total", "ralmspec_spec_accepted_per_position_total",
                 "ralmspec_spec_stride_steps", "ralmspec_spec_retrieval_seconds_total",
                 "ralmspec_rpc_server_handling_seconds", "ralmspec_lm_batch_rows", "ralmspec_lm_batch_tokens",
                 "ralmspec_stream_lag_entries", "ralmspec_rpc_server_handled_total",
                 "ralmspec_rest_draft_tokens_accepted_total", "ralmspec_retriever_search_seconds"):
        assert name in got, name


def test_panels_are_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]


def test_the_monitoring_overlay_ships_this_dashboard():
    cm = named(render("cpu-monitoring"), "ConfigMap", "ralmspec-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(data_of(cm)["ralmspec-dashboard.json"]) == json.loads(DASHBOARD.read_text())
