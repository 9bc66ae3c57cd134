"""Prometheus metrics through `ralmspec up --profile tiny`: every service's endpoint (printed by up) parses, and after
a RaLMSpec request, a REST-drafted baseline request and a refused one, the counters moved by what those requests
did: each request counted once by code, speculation's counts agree with each other, with the verifier's and with
the reply's stats, the LM's batch histogram with its Stats RPC."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ralmspec.v1 import common_pb2 as cpb
from ralmspec.v1 import gateway_pb2 as pb
from ralmspec.v1 import gateway_pb2_grpc, lm_pb2, lm_pb2_grpc
from up_process import Up, start_up

from services.common import metrics

pytestmark = pytest.mark.slow

SERVICES = ("lm", "retriever", "datastore", "verifier", "gateway")
PROMPT = ("The Eiffel Tower is a wrought-iron lattice tower in Paris. It was designed by the engineer Gustave "
          "Eiffel and built for the 1889 World's Fair. The tower")


@pytest.fixture(scope="module")
def up() -> Iterator[Up]:
    cluster = start_up()
    try:
        assert sorted(r.split("-")[0] for r in cluster.metrics) == sorted(SERVICES), cluster.metrics
        yield cluster
    finally:
        cluster.stop()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def scrape_all(up: Up) -> dict[str, Samples]:
    return {s: scrape(up.metrics_of(s)) for s in SERVICES}


def lm_stats(up: Up) -> lm_pb2.StatsReply:
    with up.channel(up.grpc_of("lm")) as ch:
        return lm_pb2_grpc.LmServiceStub(ch).Stats(lm_pb2.StatsRequest(), timeout=30)


def excerpt(up: Up) -> None:
    """Print the lines an operator looks at first (pytest -rP shows them)."""
    keep = {"gateway": ("ralmspec_spec_", "ralmspec_rest_", "ralmspec_gateway_",
                        'ralmspec_rpc_server_handled_total{code="OK",method="Generate"'),
            "lm": ("ralmspec_lm_batch_rows_sum", "ralmspec_lm_batch_rows_count", "ralmspec_lm_generated",
                   "ralmspec_lm_kv", "ralmspec_lm_prefix_cache_hits", "ralmspec_stream_lag"),
            "verifier": ("ralmspec_verifier_batch_keys_sum", "ralmspec_verifier_batch_keys_count")}
    for service, prefixes in keep.items():
        text = urllib.request.urlopen(up.metrics_of(service), timeout=30).read().decode()
        print(f"# {service}: {up.metrics_of(service)}")
        print("\n".join(line for line in text.splitlines() if line.startswith(prefixes) and "_bucket" not in line))


def test_every_endpoint_serves_its_services_families(up):
    defined = metrics.definitions()
    for service, samples in scrape_all(up).items():
        names = {n for n, _ in samples}
        assert all(n.startswith(("ralmspec_", "python_", "process_")) for n in names), service
        assert {n for n in names if n.startswith("ralmspec_")} <= {
            n for d in defined for n in (d, f"{d}_bucket", f"{d}_count", f"{d}_sum", f"{d}_created")}, service
        if service != "gateway":  # the gateway reads no stream; the others report their groups' backlog
            assert value(samples, "ralmspec_stream_pending_entries", group=f"ralmspec:{service}") == 0


def test_counters_move_by_what_the_requests_did(up):
    before, stats_before = scrape_all(up), lm_stats(up)
    replies = []
    with up.channel() as ch:
        gw = gateway_pb2_grpc.GatewayServiceStub(ch)
        # RaLMSpec at a fixed stride of 3 (OS³ off, so it speculates), prefetch on, asynchronous verification
        spec = pb.Speculation(stride=3, os3=False, prefetch=True, asynchronous=True)
        replies.append(gw.Generate(pb.GenerateRequest(prompt=PROMPT, max_new_tokens=24, retrieval_stride=4,
                                                      speculation=spec), timeout=300))
        # the baseline with REST drafting: draft tokens proposed and accepted
        replies.append(gw.Generate(pb.GenerateRequest(prompt=PROMPT, max_new_tokens=12, mode=pb.MODE_BASELINE_KV,
                                                      draft=cpb.DRAFT_SOURCE_BOTH), timeout=300))
        with pytest.raises(grpc.RpcError) as refused:
            gw.Generate(pb.GenerateRequest(question="Who?", max_new_tokens=0), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after, stats_after = scrape_all(up), lm_stats(up)
    gw_b, gw_a = before["gateway"], after["gateway"]

    # each request once, by code
    handled = "ralmspec_rpc_server_handled_total"
    generate = {"service": "ralmspec.v1.GatewayService", "method": "Generate", "transport": "grpc"}
    assert delta(gw_b, gw_a, handled, code="OK", **generate) == 2
    assert delta(gw_b, gw_a, handled, code="INVALID_ARGUMENT", **generate) == 1
    assert delta(gw_b, gw_a, "ralmspec_rpc_server_handling_seconds_count", **generate) == 3
    tokens = sum(len(r.token_ids) for r in replies)
    assert delta(gw_b, gw_a, "ralmspec_gateway_generated_tokens_total") == tokens

    # speculation: consistent with itself, the reply's stats and the verifier
    spec_reply = replies[0].stats
    speculated = delta(gw_b, gw_a, "ralmspec_spec_speculated_steps_total", kind="ralm")
    accepted = delta(gw_b, gw_a, "ralmspec_spec_accepted_steps_total", kind="ralm")
    rounds = delta(gw_b, gw_a, "ralmspec_spec_stride_steps_count", kind="ralm")
    assert speculated > 0 and 0 <= accepted <= speculated
    assert delta(gw_b, gw_a, "ralmspec_spec_stride_steps_sum", kind="ralm") == speculated
    assert accepted == pytest.approx(spec_reply.spec_accuracy * speculated)
    assert speculated / rounds == pytest.approx(spec_reply.mean_stride)
    assert delta(gw_b, gw_a, "ralmspec_spec_rollbacks_total", kind="ralm") == spec_reply.rollbacks <= rounds
    per_pos = [delta(gw_b, gw_a, "ralmspec_spec_accepted_per_position_total", kind="ralm", position=str(p))
               for p in range(1, 4)]
    assert per_pos == sorted(per_pos, reverse=True) and per_pos[0] <= rounds and sum(per_pos) == accepted
    assert delta(gw_b, gw_a, "ralmspec_spec_cache_hits_total", prefetch="true") <= delta(
        gw_b, gw_a, "ralmspec_spec_cache_lookups_total", prefetch="true")
    critical = delta(gw_b, gw_a, "ralmspec_spec_retrieval_seconds_total", path="critical")
    assert critical == pytest.approx(spec_reply.time.retrieval_s, rel=1e-6, abs=1e-9)
    assert delta(gw_b, gw_a, "ralmspec_spec_retrieval_seconds_total", path="hidden") >= 0
    v_b, v_a = before["verifier"], after["verifier"]
    verify = {"service": "ralmspec.v1.VerifierService", "method": "Verify", "transport": "stream"}
    assert delta(v_b, v_a, handled, code="OK", **verify) == rounds  # one Verify per round, its keys its steps
    assert delta(v_b, v_a, "ralmspec_verifier_batch_keys_sum", index="exact") == speculated

    # REST drafting
    proposed = delta(gw_b, gw_a, "ralmspec_rest_draft_tokens_proposed_total", source="both")
    assert proposed > 0
    assert 0 <= delta(gw_b, gw_a, "ralmspec_rest_draft_tokens_accepted_total", source="both") <= proposed

    # the LM: one session per request, its batch histogram is its Stats RPC's counts
    lm_b, lm_a = before["lm"], after["lm"]
    lm = {"service": "ralmspec.v1.LmService", "code": "OK"}
    assert delta(lm_b, lm_a, handled, method="OpenSession", **lm) == 2
    assert delta(lm_b, lm_a, handled, method="CloseSession", **lm) == 2
    forwards = stats_after.forwards - stats_before.forwards
    assert forwards > 0
    assert delta(lm_b, lm_a, "ralmspec_lm_batch_rows_count") == forwards
    assert delta(lm_b, lm_a, "ralmspec_lm_batch_rows_sum") == stats_after.rows - stats_before.rows
    assert delta(lm_b, lm_a, "ralmspec_lm_batch_tokens_sum") == stats_after.tokens - stats_before.tokens
    assert delta(lm_b, lm_a, "ralmspec_lm_generated_tokens_total") >= tokens  # rolled-back strides too
    assert value(lm_a, "ralmspec_lm_sessions") == stats_after.sessions == 0
    assert value(lm_a, "ralmspec_lm_prefix_cache_hits_total") == stats_after.prefix_hits
    assert delta(lm_b, lm_a, "ralmspec_lm_queue_wait_seconds_count") >= delta(lm_b, lm_a, handled, method="Step",
                                                                                **lm)

    excerpt(up)
    # the retriever: the searches of plain steps and verifications, per index kind
    r_b, r_a = before["retriever"], after["retriever"]
    assert delta(r_b, r_a, "ralmspec_retriever_search_seconds_count", index="exact") >= rounds
    assert delta(r_b, r_a, "ralmspec_retriever_batch_queries_sum", index="exact") >= speculated
