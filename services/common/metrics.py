"""Prometheus metrics: every metric's definition, and the HTTP endpoint each service process serves them on.

Names follow Prometheus' conventions: the `ralmspec_` prefix, base units (seconds), `_total` for counters, no colons.
Engines know nothing of Prometheus: the adapters (`grpc_server.py`, `transport.py`) and the service layer observe
what they see or what the engines already count (the LM scheduler's `BatchStats`, a request's speculation stats),
and some families are read only when scraped (`LmStatsCollector`, `StreamCollector`).

Metrics come in groups (`Group`); a process exposes `RPC` and the groups its service registers (`expose`), so an
LM replica shows no speculation counters. The objects are module-level, created once, as prometheus_client wants.

Counting conventions:
- RPC: one observation per call answered, by either adapter (`transport` = grpc | stream), with its status name;
  health checks and reflection are not counted.
- Speculation (one request's `stats`, `observe_speculation`): a round speculates `s` steps; `accepted` counts the
  steps before its first mismatch; a position p (1-based) is counted in accepted_per_position when the round's
  first p steps were all accepted (vLLM's `spec_decode_num_accepted_tokens_per_pos`). A cache lookup is checked
  when its guess was compared with the truth: each accepted step, each round's mismatched step, and each plain
  step's shadow lookup.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
SEARCH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ROWS_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STRIDE_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)
MAX_POSITION = 16  # accepted_per_position counts positions 1..16 (a round of a longer stride counts its first 16)


class Group(Collector):
    """Metrics one kind of process exposes; each metric is created unregistered and collected through its group."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.metrics: list[Collector] = []

    def add(self, metric: Any) -> Any:
        self.metrics.append(metric)
        return metric

    def collect(self) -> Iterable[Metric]:
        for m in self.metrics:
            yield from m.collect()

    def describe(self) -> Iterable[Metric]:
        for m in self.metrics:
            yield from m.describe()  # type: ignore[attr-defined]


# -- every process: RPCs served by either adapter ------------------------------------------------------------------
RPC = Group("rpc")
RPC_HANDLED = RPC.add(Counter(
    "ralmspec_rpc_server_handled_total", "Calls answered, by service, method, status code and transport "
    "(grpc_server_handled_total's shape; transport: grpc | stream)",
    ["service", "method", "code", "transport"], registry=None))
RPC_SECONDS = RPC.add(Histogram(
    "ralmspec_rpc_server_handling_seconds", "Time from a call's arrival at its adapter to its answer",
    ["service", "method", "transport"], buckets=LATENCY_BUCKETS, registry=None))
CLIENT_OVERLOADED = RPC.add(Counter(
    "ralmspec_stream_client_overloaded_total", "Calls a stream client refused with RESOURCE_EXHAUSTED because "
    "max_pending calls were already in flight", ["stream"], registry=None))


def observe_rpc(transport: str, service: str, method: str, code: str, started: float) -> None:
    """One call answered: `service` is the proto service's full name, `started` its time.perf_counter()."""
    RPC_HANDLED.labels(service, method, code, transport).inc()
    RPC_SECONDS.labels(service, method, transport).observe(time.perf_counter() - started)


# -- LM replicas ---------------------------------------------------------------------------------------------------
LM = Group("lm")
LM_BATCH_ROWS = LM.add(Histogram(
    "ralmspec_lm_batch_rows", "Calls (sessions) served by one forward: the continuous batch's size",
    buckets=ROWS_BUCKETS, registry=None))
LM_BATCH_TOKENS = LM.add(Histogram(
    "ralmspec_lm_batch_tokens", "Tokens fed through one forward (prefill chunks, decodes, draft trees); "
    "rate(_sum) is the tokens fed per second", buckets=TOKEN_BUCKETS, registry=None))
LM_FORWARD_SECONDS = LM.add(Histogram(
    "ralmspec_lm_forward_seconds", "Time of one forward", buckets=LATENCY_BUCKETS, registry=None))
LM_QUEUE_WAIT = LM.add(Histogram(
    "ralmspec_lm_queue_wait_seconds", "Time a call waited in the replica's queue before its first forward",
    buckets=LATENCY_BUCKETS, registry=None))
LM_GENERATED = LM.add(Counter(
    "ralmspec_lm_generated_tokens_total", "Tokens emitted by Step calls (rate() is the replica's tokens/s)",
    registry=None))


def observe_forward(rows: int, tokens: int, seconds: float) -> None:
    """The LM scheduler's hook: one forward over `rows` calls and `tokens` tokens took `seconds`."""
    LM_BATCH_ROWS.observe(rows)
    LM_BATCH_TOKENS.observe(tokens)
    LM_FORWARD_SECONDS.observe(seconds)


@dataclass(frozen=True)
class Family:
    """A metric read from another object's counters when scraped: `field` of its snapshot."""

    name: str
    kind: str  # counter | gauge
    field: str
    help: str

    def metric(self, value: float | None = None, labels: Sequence[str] = ()) -> CounterMetricFamily | GaugeMetricFamily:
        make: type[CounterMetricFamily | GaugeMetricFamily]
        make = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        base = self.name.removesuffix("_total") if self.kind == "counter" else self.name
        family = make(base, self.help, labels=labels or None)
        if value is not None:
            family.add_metric([], value)
        return family


# The LM's Stats RPC (lm.proto StatsReply), read at scrape time: one source of truth for both.
LM_STATS = (
    Family("ralmspec_lm_refused_total", "counter", "refused", "Calls refused with RESOURCE_EXHAUSTED (queue full or "
           "KV budget spent)"),
    Family("ralmspec_lm_expired_total", "counter", "expired", "Calls dropped because their deadline passed in the "
           "queue"),
    Family("ralmspec_lm_busy_seconds_total", "counter", "busy_s", "Seconds spent in forwards (rate() is utilisation)"),
    Family("ralmspec_lm_sessions", "gauge", "sessions", "Sessions open (each holds a KV cache)"),
    Family("ralmspec_lm_kv_tokens", "gauge", "kv_tokens", "Tokens held in the sessions' KV caches"),
    Family("ralmspec_lm_queued_calls", "gauge", "queued", "Calls waiting for a batch slot"),
    Family("ralmspec_lm_prefix_cache_hits_total", "counter", "prefix_hits", "Document prefixes found in the prefix "
           "cache"),
    Family("ralmspec_lm_prefix_cache_misses_total", "counter", "prefix_misses", "Document prefixes computed anew"),
    Family("ralmspec_lm_prefix_cache_reused_tokens_total", "counter", "prefix_tokens_reused", "Prefill tokens the "
           "prefix cache saved"),
    Family("ralmspec_lm_prefix_cache_tokens", "gauge", "prefix_cached_tokens", "Tokens held by the prefix cache"),
)


class SnapshotCollector(Collector):
    """Families read from `snapshot()` (any object with the families' fields as attributes) at each scrape."""

    def __init__(self, families: Sequence[Family], snapshot: Callable[[], Any]) -> None:
        self.families, self.snapshot = families, snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        for f in self.families:
            yield f.metric(float(getattr(snap, f.field)))

    def describe(self) -> Iterator[Metric]:
        return (f.metric() for f in self.families)


# -- stream workers (every service but the gateway) -----------------------------------------------------------------
WORKER = (  # a StreamWorker's own counters
    Family("ralmspec_stream_reclaimed_entries_total", "counter", "claimed", "Entries this replica took over from an "
           "idle (likely dead) consumer"),
    Family("ralmspec_stream_dead_lettered_entries_total", "counter", "dead", "Poison entries this replica moved to "
           "the dead-letter stream"),
    Family("ralmspec_stream_in_flight_entries", "gauge", "in_flight", "Entries this replica is handling now"),
)
GROUPS = (  # XINFO GROUPS of the streams a worker reads, per (stream, group): the same for every replica of a group
    Family("ralmspec_stream_lag_entries", "gauge", "lag", "Entries of the stream not yet delivered to the consumer "
           "group (Redis 7's lag; before 7, counted up to LAG_CAP); max by (stream, group) across replicas"),
    Family("ralmspec_stream_pending_entries", "gauge", "pending", "Entries delivered to the group, not yet acked"),
)
LAG_CAP = 1000  # Redis < 7 has no lag field: count the undelivered entries up to this many


def group_info(redis: Any, stream: str, group: str) -> dict[str, int] | None:
    """{'lag', 'pending'} of `group` on `stream` (a synchronous redis client); None when the group is absent."""
    for g in redis.xinfo_groups(stream):
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name != group:
            continue
        lag = g.get("lag")
        if lag is None:  # Redis 6: count what follows the last delivered id
            last = g["last-delivered-id"]
            last = last.decode() if isinstance(last, bytes) else last
            lag = len(redis.xrange(stream, min=f"({last}", max="+", count=LAG_CAP))
        return {"lag": int(lag), "pending": int(g["pending"])}
    return None


class StreamCollector(Collector):
    """A worker's counters, and its consumer groups' lag and pending entries read from Redis at scrape time."""

    def __init__(self, worker: Any, redis: Any) -> None:
        self.worker, self.redis = worker, redis  # a StreamWorker; a synchronous client of its Redis

    def collect(self) -> Iterator[Metric]:
        for f in WORKER:
            yield f.metric(float(getattr(self.worker, f.field)))
        families = {f.field: f.metric(labels=("stream", "group")) for f in GROUPS}
        for stream in self.worker.streams:
            try:
                info = group_info(self.redis, stream, self.worker.group)
            except Exception as e:  # noqa: BLE001 - a scrape must not fail on Redis: the sample is left out
                log.warning("metrics: XINFO GROUPS %s failed: %s", stream, e)
                continue
            for field, family in families.items():
                if info is not None:
                    family.add_metric([stream, self.worker.group], info[field])
        yield from families.values()

    def describe(self) -> Iterator[Metric]:
        yield from (f.metric() for f in WORKER)
        yield from (f.metric(labels=("stream", "group")) for f in GROUPS)


# -- gateway: requests and speculation -----------------------------------------------------------------------------
GATEWAY = Group("gateway")
GATEWAY_TOKENS = GATEWAY.add(Counter(
    "ralmspec_gateway_generated_tokens_total", "Tokens answered, by kind (ralm | knnlm) and mode", ["kind", "mode"],
    registry=None))
SPEC_SPECULATED = GATEWAY.add(Counter(
    "ralmspec_spec_speculated_steps_total", "Steps decoded with a guessed retrieval", ["kind"], registry=None))
SPEC_ACCEPTED = GATEWAY.add(Counter(
    "ralmspec_spec_accepted_steps_total", "Speculated steps verified right (before their round's first mismatch)",
    ["kind"], registry=None))
SPEC_ROLLBACKS = GATEWAY.add(Counter(
    "ralmspec_spec_rollbacks_total", "Rounds with a mismatch: the wrong step redone, later ones dropped", ["kind"],
    registry=None))
SPEC_PER_POSITION = GATEWAY.add(Counter(
    "ralmspec_spec_accepted_per_position_total", "Rounds whose first `position` steps were all accepted",
    ["kind", "position"], registry=None))
SPEC_STRIDE = GATEWAY.add(Histogram(
    "ralmspec_spec_stride_steps", "Steps speculated per round (the stride OS3 or the preset chose)", ["kind"],
    buckets=STRIDE_BUCKETS, registry=None))
SPEC_PLAIN = GATEWAY.add(Counter(
    "ralmspec_spec_plain_steps_total", "Steps that retrieved for real (the first, those OS3 chose, paused ones)",
    ["kind"], registry=None))
SPEC_PAUSED = GATEWAY.add(Counter(
    "ralmspec_spec_paused_steps_total", "Plain steps taken because the gateway was busy (RALMSPEC_SPEC_PAUSE_AT)",
    ["kind"], registry=None))
SPEC_RETRIEVAL = GATEWAY.add(Counter(
    "ralmspec_spec_retrieval_seconds_total", "Retrieval seconds of speculative requests: on the critical path "
    "(plain steps' searches, verification waits) or hidden (verification overlapped with decoding)",
    ["kind", "path"], registry=None))
SPEC_CACHE_LOOKUPS = GATEWAY.add(Counter(
    "ralmspec_spec_cache_lookups_total", "Speculation-cache guesses checked against the truth", ["kind", "prefetch"],
    registry=None))
SPEC_CACHE_HITS = GATEWAY.add(Counter(
    "ralmspec_spec_cache_hits_total", "Speculation-cache guesses that were right", ["kind", "prefetch"],
    registry=None))
DRAFT_PROPOSED = GATEWAY.add(Counter(
    "ralmspec_rest_draft_tokens_proposed_total", "REST draft tree nodes sent to the LM, by draft source",
    ["source"], registry=None))
DRAFT_ACCEPTED = GATEWAY.add(Counter(
    "ralmspec_rest_draft_tokens_accepted_total", "Draft tokens the LM accepted (emitted tokens beyond the one each "
    "verification forward gives anyway), by draft source", ["source"], registry=None))


def per_position(strides: Sequence[int], accepted: Sequence[int]) -> list[int]:
    """counts[p - 1]: rounds whose first p steps were all accepted (p = 1..MAX_POSITION)."""
    counts = [0] * MAX_POSITION
    for s, a in zip(strides, accepted):
        for p in range(min(a, s, MAX_POSITION)):
            counts[p] += 1
    return counts


def observe_speculation(kind: str, prefetch: bool, stats: Mapping[str, Any]) -> None:
    """One speculative request's loop stats (`SpeculationLoop`'s `res.stats`)."""
    strides, accepted = stats.get("round_strides", []), stats.get("round_accepted", [])
    SPEC_SPECULATED.labels(kind).inc(stats.get("speculated", 0))
    SPEC_ACCEPTED.labels(kind).inc(stats.get("matched", 0))
    SPEC_ROLLBACKS.labels(kind).inc(stats.get("rollbacks", 0))
    for p, n in enumerate(per_position(strides, accepted), start=1):
        if n:
            SPEC_PER_POSITION.labels(kind, str(p)).inc(n)
    for s in strides:
        SPEC_STRIDE.labels(kind).observe(s)
    SPEC_PLAIN.labels(kind).inc(stats.get("plain_steps", 0))
    SPEC_PAUSED.labels(kind).inc(stats.get("paused_steps", 0))
    critical, total = stats.get("critical_retrieval_s", 0.0), stats.get("retrieval_work_s", 0.0)
    SPEC_RETRIEVAL.labels(kind, "critical").inc(critical)
    SPEC_RETRIEVAL.labels(kind, "hidden").inc(max(0.0, total - critical))
    checked = stats.get("matched", 0) + stats.get("rollbacks", 0) + stats.get("shadow_lookups", 0)
    hits = stats.get("matched", 0) + stats.get("shadow_hits", 0)
    on = "true" if prefetch else "false"
    SPEC_CACHE_LOOKUPS.labels(kind, on).inc(checked)
    SPEC_CACHE_HITS.labels(kind, on).inc(hits)


def observe_drafts(source: str, proposed: int, accepted: int) -> None:
    if proposed:
        DRAFT_PROPOSED.labels(source).inc(proposed)
        DRAFT_ACCEPTED.labels(source).inc(accepted)


# -- retriever and verifier: index calls -----------------------------------------------------------------------------
RETRIEVER = Group("retriever")
RETRIEVER_BATCH = RETRIEVER.add(Histogram(
    "ralmspec_retriever_batch_queries", "Queries per index call (after cross-request coalescing), by index",
    ["index"], buckets=ROWS_BUCKETS, registry=None))
RETRIEVER_SECONDS = RETRIEVER.add(Histogram(
    "ralmspec_retriever_search_seconds", "Time of one index call, by index (exact | approx | sparse | knn-exact | "
    "knn-approx)", ["index"], buckets=SEARCH_BUCKETS, registry=None))
VERIFIER = Group("verifier")
VERIFIER_BATCH = VERIFIER.add(Histogram(
    "ralmspec_verifier_batch_keys", "Keys per retriever call (one round, or merged rounds), by index", ["index"],
    buckets=ROWS_BUCKETS, registry=None))
VERIFIER_SECONDS = VERIFIER.add(Histogram(
    "ralmspec_verifier_search_seconds", "The retriever's search time of one verification call, by index",
    ["index"], buckets=SEARCH_BUCKETS, registry=None))


def observe_search(batch: Histogram, seconds: Histogram, index: str, n: int, took_s: float) -> None:
    batch.labels(index).observe(n)
    seconds.labels(index).observe(took_s)


# -- the endpoint -----------------------------------------------------------------------------------------------------
def expose(*collectors: Collector, registry: CollectorRegistry = REGISTRY) -> None:
    """Add groups or collectors to what this process's endpoint serves (each once)."""
    for c in collectors:
        try:
            registry.register(c)
        except ValueError:  # already registered (a test serving twice in one process)
            pass


def start(host: str, port: int, registry: CollectorRegistry = REGISTRY) -> int:
    """Serve /metrics on host:port (0: a free port) from a daemon thread, with the RPC group; returns the port."""
    disable_created_metrics()  # no `_created` series: Prometheus does not need them, and they double the output
    expose(RPC, registry=registry)
    server, _ = start_http_server(port, host, registry=registry)
    return int(server.server_port)


def definitions() -> dict[str, str]:
    """Every metric family this code can expose, name -> type, as exposition names (counters keep `_total`)."""
    groups: list[Collector] = [RPC, LM, GATEWAY, RETRIEVER, VERIFIER, SnapshotCollector(LM_STATS, lambda: None),
                               StreamCollector(None, None)]
    out = {}
    for g in groups:
        for m in g.describe():  # type: ignore[attr-defined]
            out[m.name + ("_total" if m.type == "counter" else "")] = m.type
    return out
