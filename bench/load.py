"""Load: throughput and tail latency with many clients at once, through the gateway's gRPC API on real clusters.

    python -m bench.load --profile default     # the full run (sized for under an hour on 2 cores)
    python -m bench.load --quick               # tiny profile, CI-sized smoke run -> results/load_quick.*

Two clusters (`services.up.Cluster`: Redis + every service, `RALMSPEC_CONCURRENCY` raised so that 16 clients fit)
run side by side, the same but for the LM replicas' `RALMSPEC_MAX_BATCH_SEQS`: its default (batching on) and 1
(batching off: one session's step at a time, the behaviour before continuous batching).
Workloads (prompts from the profile's SQuAD questions, each request run to `max_new_tokens`, no newline stop):
`qa-<retriever>` (iterative RaLM, the QA prompt; modes baseline-kv and ralmspec+PSA), `knn` (KNN-LM continuing
"<question> Background:"), `draft-rest` / `draft-both` (REST drafting inside each stride, baseline-kv, exact
retriever) and `mix` (the other cells' requests interleaved, each in its own mode).
1) Warm-up: one request per workload on each cluster.
2) Alone: every distinct request once, nothing else running (batching-off cluster, unary Generate): the reference.
3) Closed loop: c clients, each sending its next request (GenerateStream) when the previous answers,
   `per_client` x c requests in all, taken in order from the cell's distinct requests. The units
   (cell x batching x c) run in an order rotated per repetition.
4) Open loop: Poisson arrivals at multiples of the sustainable rate of the cell (its best closed-loop requests/s
   in the first repetition), rate x `window_s` of them; every arrival is its own call, however many are in flight.
Each repetition runs 3) then 4); one after the first starts only if it fits in `--budget-min` at the previous
one's pace (the full run: 3 repetitions planned, at least 1).
Per row (an open-loop row has concurrency 0, its rate in rate_x and rate_per_s), the median over repetitions
(`spread`: min, median, max):
- tokens_per_s: generated tokens streamed to the clients during the load window / its length (a chunk's tokens
  spread over the time since the previous chunk). Closed loop: the window ends when the first client finds no
  request left (until then all c are busy); open loop: with the last reply (past the sustainable rate, the queue
  drains at the cluster's saturated throughput).
- requests_per_s: tokens_per_s / mean tokens per answered request.
- p50_s, p95_s, p99_s: send -> last chunk of answered requests; ttft_p50_s: send -> first chunk carrying tokens.
- mean_batch: Δrows / Δforwards of the LM replicas' `Stats` over the unit (null when the LM does not answer it);
  prefix_hits: the share of the unit's shared-prefix (document) look-ups its LM replicas' prefix caches answered.
- cpu_ms_per_token: CPU seconds (user + system) of every service process and redis-server over the unit, per
  generated token (`cpu_ms_per_token_by_service` in the JSON splits it); cores_busy: those CPU seconds / the
  unit's wall time. cores x 1000 / cpu_ms_per_token is the machine's ceiling for that per-token work.
- identical: every answered request's tokens equal its alone run's; `mismatches` counts those that differ,
  `near_ties` those of them whose first difference is a certified near-tie (both replies' top-2 gaps < 1e-4 there).
- errors: status codes of failed calls, summed over repetitions; RESOURCE_EXHAUSTED is expected when overloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
from ralmspec.v1 import common_pb2 as cpb
from ralmspec.v1 import gateway_pb2 as pb
from ralmspec.v1 import gateway_pb2_grpc, lm_pb2, lm_pb2_grpc

from bench import results_io
from bench.results_io import rotated, spread, spread_text
from services.assets import missing
from services.common import env
from services.common.equivalence import compare
from services.gateway.prompts import qa_prompt
from services.gateway.settings import GatewaySettings
from services.gateway.speculation import PRESETS
from services.retriever.corpus import read_questions
from services.up import Cluster

RETRIEVERS = {"exact": cpb.RETRIEVER_KIND_EXACT, "approx": cpb.RETRIEVER_KIND_APPROX,
              "sparse": cpb.RETRIEVER_KIND_SPARSE}
DRAFTS = {"rest": cpb.DRAFT_SOURCE_REST, "both": cpb.DRAFT_SOURCE_BOTH}
MODES = {"baseline-kv": pb.MODE_BASELINE_KV, "ralmspec+PSA": pb.MODE_RALMSPEC}
PSA = PRESETS["+PSA"]  # sent explicitly: the result does not depend on the gateway's RALMSPEC_PRESET
SPECULATION = pb.Speculation(stride=PSA.stride, prefetch=PSA.prefetch, prefetch_k=PSA.prefetch_k, os3=PSA.os3,
                             asynchronous=PSA.asynchronous)
EXPECTED = {"RESOURCE_EXHAUSTED"}  # refused under overload: counted, not a failure
TIMEOUT_S = 900.0  # per call: a stuck request fails its row instead of hanging the run
METRICS = ("tokens_per_s", "requests_per_s", "p50_s", "p95_s", "p99_s", "ttft_p50_s", "mean_batch", "prefix_hits",
           "cpu_ms_per_token", "cores_busy")

Cell = tuple[str, str]  # (workload, mode)
Key = tuple[str, str, int]  # one distinct request: (workload, mode, prompt index)
KV, SPEC = "baseline-kv", "ralmspec+PSA"
HEADLINE: Cell = ("qa-exact", KV)


@dataclass(frozen=True)
class Plan:
    closed: dict[tuple[Cell, bool], tuple[int, ...]]  # (cell, batching) -> closed-loop concurrencies
    open_cells: tuple[Cell, ...]  # cells also run open loop, with and without batching
    rates: tuple[float, ...]  # open loop: multiples of the cell's sustainable rate
    window_s: float  # open loop: rate x window_s arrivals (at least 2)
    reps: int
    prompts: int  # distinct requests per cell
    per_client: int  # closed loop: requests each client sends, one after the other
    max_new_tokens: int
    budget_s: float = float("inf")  # no repetition after the first starts unless it fits (at the last one's pace)

    @property
    def cells(self) -> list[Cell]:
        return list(dict.fromkeys(cell for cell, _ in self.closed))


def both(cells: dict[Cell, tuple[int, ...]]) -> dict[tuple[Cell, bool], tuple[int, ...]]:
    return {(cell, b): cs for cell, cs in cells.items() for b in (True, False)}


def full_plan(reps: int, prompts: int, tokens: int, window_s: float, budget_min: float) -> Plan:
    """The issue's targets in full: RaLM QA (exact) at 1-16 clients, baseline-kv with and without batching,
    +PSA with it; KNN-LM at 8. The rest at fewer points. About 15-20 minutes a repetition on 2 cores (2 requests
    per client, ~3.5 s a request alone on `default`)."""
    sweep = (1, 2, 4, 8, 16)
    closed = both({HEADLINE: sweep, ("knn", KV): (1, 8), ("mix", "mixed"): (1, 4), ("draft-rest", KV): (4,),
                   ("draft-both", KV): (4,)})
    closed |= both({(f"qa-{r}", KV): (4,) for r in ("approx", "sparse")})
    closed |= {(("qa-exact", SPEC), True): sweep, (("knn", SPEC), True): (1, 8), (("qa-approx", SPEC), True): (4,),
               (("qa-sparse", SPEC), True): (4,), (("qa-exact", SPEC), False): (1,), (("knn", SPEC), False): (1,)}
    return Plan(closed, (HEADLINE,), (0.5, 1.0, 2.0), window_s, reps, prompts, 2, tokens, budget_min * 60)


def quick_plan(tokens: int) -> Plan:
    """One workload of each kind at 1 and 4 clients, one repetition, one overloaded open-loop run."""
    closed = both({cell: (1, 4) for cell in (
        ("qa-exact", KV), ("qa-exact", SPEC), ("knn", KV), ("draft-rest", KV), ("mix", "mixed"))})
    return Plan(closed, (HEADLINE,), (2.0,), 4.0, 1, 4, 1, tokens)


def spec_plan(reps: int, prompts: int, tokens: int) -> Plan:
    """Speculation under load alone (issue 13, item 5): RaLM QA (exact) and KNN-LM, baseline-kv vs +PSA, batching
    on, at 1-8 clients."""
    closed = {((w, m), True): (1, 2, 4, 8) for w in ("qa-exact", "knn") for m in (KV, SPEC)}
    return Plan(closed, (), (), 4.0, reps, prompts, 2, tokens)


def knn_plan(reps: int, prompts: int, tokens: int) -> Plan:
    """KNN-LM alone (issue 13's KNN-LM-at-8 figure on a profile's full datastore): baseline-kv with and without
    batching, +PSA with it, at 1 and 8 clients."""
    closed = both({("knn", KV): (1, 8)}) | {(("knn", SPEC), True): (1, 8)}
    return Plan(closed, (), (), 4.0, reps, prompts, 2, tokens)


def build(workload: str, mode: str, question: str, n: int) -> pb.GenerateRequest:
    kind, _, arg = workload.partition("-")
    req = pb.GenerateRequest(mode=MODES[mode], max_new_tokens=n)
    if mode == SPEC:
        req.speculation.CopyFrom(SPECULATION)
    if kind == "knn":  # KNN-LM's defaults: k = 1024, λ = 0.25, exact index
        req.prompt = f"{question} Background:\n"
        req.knn.SetInParent()
        return req
    req.prompt = qa_prompt(question)
    req.retriever = RETRIEVERS[arg] if kind == "qa" else cpb.RETRIEVER_KIND_EXACT
    if kind == "draft":
        req.draft = DRAFTS[arg]
    return req


@dataclass
class Reply:
    key: Key
    sent: float
    first: float | None = None  # first chunk carrying tokens
    done: float = 0.0
    tokens: list[int] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # top-2 logit gap at each token (near-tie certificate)
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival time, tokens in it)
    code: str = "OK"


async def stream(stub: gateway_pb2_grpc.GatewayServiceStub, key: Key, req: pb.GenerateRequest) -> Reply:
    r = Reply(key, time.perf_counter())
    try:
        async for chunk in stub.GenerateStream(req, timeout=TIMEOUT_S):
            now = time.perf_counter()
            if chunk.HasField("delta"):
                n = len(chunk.delta.token_ids)
            else:  # the last message: the whole reply (any tokens not streamed before arrive with it)
                r.tokens, r.gaps = list(chunk.done.token_ids), list(chunk.done.gaps)
                n = len(r.tokens) - sum(k for _, k in r.chunks)
            if n > 0:
                r.chunks.append((now, n))
                r.first = r.first or now
    except grpc.aio.AioRpcError as e:
        r.code = e.code().name
    r.done = time.perf_counter()
    return r


async def closed_loop(stub: gateway_pb2_grpc.GatewayServiceStub, keys: list[Key],
                      reqs: dict[Key, pb.GenerateRequest], c: int, n: int) -> tuple[list[Reply], float, float]:
    """c clients share n requests; returns the replies, the start and the end of the window (all c busy)."""
    todo = iter(range(n))
    replies: list[Reply] = []
    idle: list[float] = []

    async def client() -> None:
        for i in todo:  # one iterator shared by the clients: each takes the next request when its previous answers
            replies.append(await stream(stub, keys[i % len(keys)], reqs[keys[i % len(keys)]]))
        idle.append(time.perf_counter())

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(c)))
    return replies, t0, min(idle)


async def open_loop(stub: gateway_pb2_grpc.GatewayServiceStub, keys: list[Key], reqs: dict[Key, pb.GenerateRequest],
                    rate: float, n: int, rng: random.Random) -> tuple[list[Reply], float, float]:
    """n Poisson arrivals at `rate` per second, each its own call however many are in flight; the window ends
    with the last reply."""
    tasks: list[asyncio.Task[Reply]] = []
    t, t0 = 0.0, time.perf_counter()
    for i in range(n):
        await asyncio.sleep(max(0.0, t0 + t - time.perf_counter()))
        tasks.append(asyncio.create_task(stream(stub, keys[i % len(keys)], reqs[keys[i % len(keys)]])))
        t += rng.expovariate(rate)
    replies = list(await asyncio.gather(*tasks))
    return replies, t0, max(r.done for r in replies)


async def lm_counters(cluster: Cluster) -> tuple[int, int, int, int] | None:
    """(forwards, rows, prefix hits, prefix misses) summed over the LM replicas' Stats; None when one does not
    answer it."""
    total = (0, 0, 0, 0)
    for address in cluster.addresses("lm"):
        async with cluster.aio_channel(address) as channel:
            try:
                s = await lm_pb2_grpc.LmServiceStub(channel).Stats(lm_pb2.StatsRequest(), timeout=5)
            except grpc.aio.AioRpcError:
                return None
        total = tuple(a + b for a, b in zip(total, (s.forwards, s.rows, s.prefix_hits, s.prefix_misses)))  # type: ignore[assignment]
    return total


def tokens_until(r: Reply, t_end: float) -> float:
    """Tokens `r` streamed by t_end, a chunk's tokens spread evenly over the time since the previous chunk (a RaLM
    stride arrives in one piece: counting whole chunks would miss the part of each stride in flight at t_end)."""
    total, prev = 0.0, r.sent
    for t, n in r.chunks:
        if t <= t_end:
            total += n
        elif prev < t_end:  # t_end falls inside this chunk's interval
            total += n * (t_end - prev) / (t - prev)
        prev = t
    return total


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def cpu_seconds(cluster: Cluster) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each service's processes (every replica) and redis-server."""
    import psutil

    procs = [(c.service, c.proc.pid) for c in cluster.children]
    if cluster.redis is not None and cluster.redis.proc is not None:
        procs.append(("redis", cluster.redis.proc.pid))
    out: dict[str, float] = {}
    for service, pid in procs:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            out[service] = out.get(service, 0.0) + t.user + t.system
    return out


def cpu_use(before: dict[str, float], after: dict[str, float], replies: list[Reply], wall_s: float) -> dict:
    """Where a unit's CPU went: ms of CPU per generated token, by service and in all, and cores busy on average
    (CPU seconds / wall seconds). With every core busy, tokens/s cannot exceed cores x 1000 / cpu_ms_per_token:
    the throughput ceiling of the machine for that per-token work."""
    tokens = sum(len(r.tokens) for r in replies) or 1
    used = {s: after.get(s, 0.0) - before.get(s, 0.0) for s in after}
    return {"cpu_ms_per_token": 1000 * sum(used.values()) / tokens, "cores_busy": sum(used.values()) / wall_s,
            "cpu_ms_per_token_by_service": {s: round(1000 * v / tokens, 1) for s, v in sorted(used.items())}}


def measure(replies: list[Reply], t0: float, t_end: float, alone: dict[Key, pb.GenerateReply],
            before: tuple[int, int, int, int] | None, after: tuple[int, int, int, int] | None,
            cpu: dict | None = None) -> dict:
    ok = [r for r in replies if r.code == "OK"]
    verdicts = [compare(alone[r.key].token_ids, alone[r.key].gaps, r.tokens, r.gaps) for r in ok]
    tokens_per_s = sum(tokens_until(r, t_end) for r in replies) / (t_end - t0)
    mean_tokens = statistics.mean(len(r.tokens) for r in ok) if ok else 0.0
    latency = [r.done - r.sent for r in ok]
    ttft = [r.first - r.sent for r in ok if r.first is not None]
    batch = (after[1] - before[1]) / (after[0] - before[0]) if before and after and after[0] > before[0] else None
    looked = after[2] + after[3] - before[2] - before[3] if before and after else 0
    prefix_hits = (after[2] - before[2]) / looked if before and after and looked else None
    return {"tokens_per_s": tokens_per_s, "requests_per_s": tokens_per_s / mean_tokens if mean_tokens else 0.0,
            "p50_s": percentile(latency, 50), "p95_s": percentile(latency, 95), "p99_s": percentile(latency, 99),
            "ttft_p50_s": percentile(ttft, 50), "mean_batch": batch, "prefix_hits": prefix_hits,
            "requests": len(replies), **(cpu or {"cpu_ms_per_token": None, "cores_busy": None}),
            "errors": Counter(r.code for r in replies if r.code != "OK"),
            "mismatches": sum(not v.identical for v in verdicts), "near_ties": sum(v.near_tie for v in verdicts)}


def row(cell: Cell, batching: bool, concurrency: int, rate: tuple[float, float] | None, runs: list[dict]) -> dict:
    """One table row from a unit's repetitions; `rate`: (multiple, requests/s) for an open-loop row."""
    out: dict = {"workload": cell[0], "mode": cell[1], "batching": batching, "loop": "open" if rate else "closed",
                 "concurrency": concurrency, "rate_x": rate[0] if rate else None,
                 "rate_per_s": rate[1] if rate else None, "spread": {}}
    for m in METRICS:
        values = [r[m] for r in runs if r[m] is not None]
        out[m] = spread(values)["median"] if values else None
        out["spread"][m] = spread(values) if values else None
    errors: Counter[str] = sum((r["errors"] for r in runs), Counter())
    out |= {"identical": all(r["mismatches"] == 0 for r in runs), "mismatches": sum(r["mismatches"] for r in runs),
            "near_ties": sum(r["near_ties"] for r in runs), "errors": dict(errors), "requests": runs[0]["requests"],
            "reps": len(runs), "cpu_ms_per_token_by_service": [r.get("cpu_ms_per_token_by_service") for r in runs]}
    # shown in the markdown table: median [min, max]
    text = {m: spread_text([r[m] for r in runs if r[m] is not None], ".1f" if m == "tokens_per_s" else ".2f")
            if out[m] is not None else "-" for m in METRICS}
    out |= {"clients": f"{rate[0]}x = {rate[1]:.2f}/s" if rate else concurrency, "tok/s": text["tokens_per_s"],
            "req/s": text["requests_per_s"], "p50": text["p50_s"], "p95": text["p95_s"], "p99": text["p99_s"],
            "ttft p50": text["ttft_p50_s"], "batch": text["mean_batch"], "prefix hits": text["prefix_hits"],
            "cpu ms/tok": text["cpu_ms_per_token"], "cores busy": text["cores_busy"],
            "errs": " ".join(f"{k}:{v}" for k, v in sorted(errors.items())) or "0"}
    return out


class Bench:
    def __init__(self, plan: Plan, clusters: dict[bool, Cluster], reqs: dict[Key, pb.GenerateRequest],
                 keys: dict[Cell, list[Key]]) -> None:
        self.plan, self.clusters, self.reqs, self.keys = plan, clusters, reqs, keys
        self.alone: dict[Key, pb.GenerateReply] = {}
        self.alone_s: dict[Key, float] = {}
        self.max_rss_mb: dict[str, dict[str, float]] = {}  # cluster (batching on/off) -> service -> peak MB
        self.started = time.perf_counter()  # the budget counts from here: the clusters are up

    async def run(self) -> list[dict]:
        channels = {b: c.aio_channel() for b, c in self.clusters.items()}
        try:
            return await self.phases({b: gateway_pb2_grpc.GatewayServiceStub(ch) for b, ch in channels.items()})
        finally:
            for ch in channels.values():
                await ch.close()

    async def phases(self, stubs: dict[bool, gateway_pb2_grpc.GatewayServiceStub]) -> list[dict]:
        for b in (False, True):  # 1) warm-up: the first request of each workload
            for w in dict.fromkeys(k[0] for k in self.reqs):
                await stubs[b].Generate(self.reqs[next(k for k in self.reqs if k[0] == w)], timeout=TIMEOUT_S)
        for k, req in self.reqs.items():  # 2) alone, on the batching-off cluster
            t = time.perf_counter()
            self.alone[k] = await stubs[False].Generate(req, timeout=TIMEOUT_S)
            self.alone_s[k] = time.perf_counter() - t
        for req in self.reqs.values():  # the batching-on cluster's LM prefix cache sees the same documents
            await stubs[True].Generate(req, timeout=TIMEOUT_S)
        p = self.plan
        units = [(cell, b, c) for (cell, b), cs in p.closed.items() for c in cs]
        opens = [(cell, b, x) for cell in p.open_cells for b in (True, False) for x in p.rates]
        print(f"alone: {len(self.alone)} requests, {statistics.mean(self.alone_s.values()):.2f} s mean", flush=True)
        runs: dict[tuple[Cell, bool, int], list[dict]] = {u: [] for u in units}
        open_runs: dict[tuple[Cell, bool, float], list[dict]] = {u: [] for u in opens}
        rates: dict[tuple[Cell, bool], float] = {}
        last = 0.0
        for rep in range(p.reps):
            if rep and time.perf_counter() - self.started + last > p.budget_s:
                print(f"stopping after {rep} repetitions: another would pass the {p.budget_s / 60:.0f} min budget")
                break
            t_rep = time.perf_counter()
            for cell, b, c in rotated(units, rep * len(units) // p.reps):  # 3) closed loop
                load = closed_loop(stubs[b], self.keys[cell], self.reqs, c, c * p.per_client)
                runs[cell, b, c].append(await self.unit(b, load))
                self.log(f"rep {rep} {cell} batching={b} c={c}", runs[cell, b, c][-1])
            if rep == 0:  # each cell's sustainable rate: its best closed-loop requests/s in the first repetition
                for cell, b, c in units:
                    rates[cell, b] = max(rates.get((cell, b), 0.0), runs[cell, b, c][0]["requests_per_s"])
            for cell, b, x in rotated(opens, rep * len(opens) // p.reps):  # 4) open loop
                rng = random.Random(f"{rep} {cell} {b} {x}")
                n = max(2, round(x * rates[cell, b] * p.window_s))
                load = open_loop(stubs[b], self.keys[cell], self.reqs, x * rates[cell, b], n, rng)
                open_runs[cell, b, x].append(await self.unit(b, load))
                self.log(f"rep {rep} {cell} batching={b} open {x}x = {x * rates[cell, b]:.2f}/s",
                         open_runs[cell, b, x][-1])
            last = time.perf_counter() - t_rep
        return [row(cell, b, c, None, runs[cell, b, c]) for cell, b, c in units] + [
            row(cell, b, 0, (x, x * rates[cell, b]), open_runs[cell, b, x]) for cell, b, x in opens]

    async def unit(self, batching: bool, load: Awaitable[tuple[list[Reply], float, float]]) -> dict:
        """`load` (not started yet) run between two reads of the LM counters, the cluster's RSS sampled."""
        cluster = self.clusters[batching]
        before, cpu_before, started = await lm_counters(cluster), cpu_seconds(cluster), time.perf_counter()
        sampler = asyncio.create_task(self.sample_rss(batching))
        try:
            replies, t0, t_end = await load
        finally:
            sampler.cancel()
        cpu = cpu_use(cpu_before, cpu_seconds(cluster), replies, time.perf_counter() - started)
        return measure(replies, t0, t_end, self.alone, before, await lm_counters(cluster), cpu)

    async def sample_rss(self, batching: bool, every_s: float = 0.5) -> None:
        """Keep the largest resident set of each service's processes (MB, per replica) while a unit runs."""
        peak = self.max_rss_mb.setdefault("on" if batching else "off", {})
        while True:
            for service, mb in self.clusters[batching].rss_mb().items():
                peak[service] = max(peak.get(service, 0.0), mb)
            await asyncio.sleep(every_s)

    @staticmethod
    def log(label: str, m: dict) -> None:
        p99 = f"{m['p99_s']:.2f}" if m["p99_s"] is not None else "-"
        print(f"{label}: {m['tokens_per_s']:.1f} tok/s, p99 {p99} s, batch {m['mean_batch']}, "
              f"errors {dict(m['errors'])}, mismatches {m['mismatches']} ({m['near_ties']} near-ties)", flush=True)


def ratio(rows: list[dict], metric: str, num: tuple[Cell, bool, int], den: tuple[Cell, bool, int]) -> float | None:
    def get(cell: Cell, batching: bool, c: int) -> float | None:
        return next((r[metric] for r in rows if (r["workload"], r["mode"], r["batching"], r["concurrency"],
                                                   r["loop"]) == (*cell, batching, c, "closed")), None)

    a, b = get(*num), get(*den)
    return a / b if a is not None and b else None


def ratio_text(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "not run"


def draw(ax, workload: str, rows: list[dict]) -> None:  # type: ignore[no-untyped-def]
    for loop in ("closed", "open"):
        for mode, batching in dict.fromkeys((r["mode"], r["batching"]) for r in rows if r["workload"] == workload):
            pts = [r for r in rows if (r["workload"], r["mode"], r["batching"], r["loop"]) ==
                   (workload, mode, batching, loop) and r["p99_s"] is not None]
            if pts:
                label = f"{mode}, batching {'on' if batching else 'off'}" + (", open loop" if loop == "open" else "")
                ax.plot([r["tokens_per_s"] for r in pts], [r["p99_s"] for r in pts],
                        marker="o" if loop == "closed" else "x", linestyle="-" if batching else "--", label=label)
                for r in pts:
                    ax.annotate(str(r["concurrency"] or f"{r['rate_x']}x"), (r["tokens_per_s"], r["p99_s"]),
                                fontsize=7)
    ax.set(title=workload, xlabel="generated tokens/s", ylabel="p99 latency (s)")
    ax.legend(fontsize=7)


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny profile, 1 rep, 1 and 4 clients x 1 request, 12 tokens")
    ap.add_argument("--profile", default=None, help="asset profile (default: default; tiny with --quick)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions, as many as fit in --budget-min")
    ap.add_argument("--budget-min", type=float, default=52.0,
                    help="minutes from the clusters being up; a repetition after the first starts only if it "
                         "fits at the previous one's pace")
    ap.add_argument("--prompts", type=int, default=4, help="distinct requests per cell")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 32 (12 with --quick)")
    ap.add_argument("--window-s", type=float, default=15.0, help="open loop: rate x this many arrivals")
    ap.add_argument("--spec", action="store_true", help="speculation under load only: kv vs +PSA, 1-8 clients")
    ap.add_argument("--knn", action="store_true", help="KNN-LM only: batching on/off and +PSA, 1 and 8 clients")
    ap.add_argument("--name", default=None, help="results file name (default load, load_quick with --quick)")
    args = ap.parse_args(argv)
    profile = args.profile or ("tiny" if args.quick else "default")
    tokens = args.max_new_tokens or (12 if args.quick else 32)
    plan = (quick_plan(tokens) if args.quick else spec_plan(args.reps, args.prompts, tokens) if args.spec
            else knn_plan(args.reps, args.prompts, tokens) if args.knn
            else full_plan(args.reps, args.prompts, tokens, args.window_s, args.budget_min))
    settings = GatewaySettings.from_env(profile=profile)
    if todo := missing(profile, settings.layout, settings.model):
        raise SystemExit(f"the {profile} profile lacks {', '.join(todo)}: run `ralmspec assets --profile {profile}`")
    questions = read_questions(settings.layout.questions)
    picked = [q.question for q in questions[11 :: len(questions) // plan.prompts][: plan.prompts]]
    base = [cell for cell in plan.cells if cell[0] != "mix"]
    keys = {cell: [(*cell, i) for i in range(plan.prompts)] for cell in base}
    keys[("mix", "mixed")] = [keys[cell][i] for i in range(plan.prompts) for cell in base]  # kinds interleaved
    reqs = {k: build(k[0], k[1], picked[k[2]], plan.max_new_tokens) for cell in base for k in keys[cell]}
    max_c = max(c for cs in plan.closed.values() for c in cs)
    cluster_env = {b: {env.CONCURRENCY.name: str(max(8, 2 * max_c)), env.PRESET.name: "+PSA",
                       env.MAX_BATCH_SEQS.name: env.MAX_BATCH_SEQS.default if b else "1"} for b in (True, False)}
    with contextlib.ExitStack() as stack:
        t = time.perf_counter()
        clusters = {b: stack.enter_context(Cluster(profile, extra_env=cluster_env[b])) for b in (False, True)}
        print(f"two clusters up after {time.perf_counter() - t:.0f} s", flush=True)
        bench = Bench(plan, clusters, reqs, keys)
        rows = asyncio.run(bench.run())
    payload = {"profile": profile, "rows": rows, **summary(rows, plan), "alone_s": {
        f"{w} {m}": spread([s for k, s in bench.alone_s.items() if k[:2] == (w, m)]) for w, m in base},
        "cluster_env": {"on" if b else "off": e for b, e in cluster_env.items()}, "max_rss_mb": bench.max_rss_mb}
    report(args.name or ("load_quick" if args.quick else "load_spec" if args.spec else "load_knn" if args.knn
                         else "load"), payload, plan)
    return payload


def summary(rows: list[dict], plan: Plan) -> dict:
    """The issue's target ratios (null where the plan lacks the rows), equivalence and errors over all rows."""
    knn = ("knn", KV)
    return {
        "speedup_at_8": ratio(rows, "tokens_per_s", (HEADLINE, True, 8), (HEADLINE, False, 8)),
        "p99_at_8_over_alone": ratio(rows, "p99_s", (HEADLINE, True, 8), (HEADLINE, True, 1)),
        "speedup_at_16": ratio(rows, "tokens_per_s", (HEADLINE, True, 16), (HEADLINE, False, 16)),
        "knn_speedup_at_8": ratio(rows, "tokens_per_s", (knn, True, 8), (knn, False, 8)),
        "ralmspec_over_kv": [{"workload": w, "batching": b, "concurrency": c, "tokens_per_s": ratio(
            rows, "tokens_per_s", ((w, SPEC), b, c), ((w, KV), b, c))}
            for w in ("qa-exact", "knn") for b in (True, False) for c in plan.closed.get(((w, SPEC), b), ())],
        "identical": all(r["identical"] for r in rows), "mismatches": sum(r["mismatches"] for r in rows),
        "near_ties": sum(r["near_ties"] for r in rows),
        "unexpected_errors": dict(sum((Counter({k: v for k, v in r["errors"].items() if k not in EXPECTED})
                                       for r in rows), Counter())),
        "plan": {"reps": plan.reps, "prompts": plan.prompts, "max_new_tokens": plan.max_new_tokens,
                 "per_client": plan.per_client,
                 "closed": {f"{w} {m} batching {'on' if b else 'off'}": cs for ((w, m), b), cs in plan.closed.items()},
                 "open": [f"{w} {m}" for w, m in plan.open_cells], "rates_x": plan.rates, "window_s": plan.window_s},
    }


def report(name: str, payload: dict, plan: Plan) -> None:
    rows = payload["rows"]
    got = {k: ratio_text(payload[k]) for k in ("speedup_at_8", "speedup_at_16", "knn_speedup_at_8",
                                                "p99_at_8_over_alone")}
    notes = (f"{plan.max_new_tokens} new tokens per request, {plan.prompts} distinct requests per cell, "
             f"{plan.reps} repetition(s): median [min, max]. Closed loop: `clients` concurrent clients, "
             f"{plan.per_client} requests each; open loop: Poisson arrivals at a multiple of the cell's best "
             "closed-loop rate. Batching off = `RALMSPEC_MAX_BATCH_SEQS=1`. tok/s: generated tokens streamed while "
             "every client was busy (open loop: until the last reply); batch: LM rows per forward (`-`: the LM did "
             "not answer Stats); prefix hits: share of document prefixes the LM's prefix cache answered (the "
             f"{plan.prompts} requests of a cell repeat, so their documents are hot); identical: every request's "
             "tokens equal its run alone; near_ties: differing "
             "requests whose first difference is a certified near-tie (both top-2 gaps < 1e-4). Definitions: "
             "`bench/load.py`.\n\n"
             f"Throughput, batching on / off at 8 clients (qa-exact, baseline-kv): {got['speedup_at_8']}; at 16: "
             f"{got['speedup_at_16']}; KNN-LM at 8: {got['knn_speedup_at_8']}. p99 latency at 8 clients / 1 client "
             f"(batching on): {got['p99_at_8_over_alone']}.")
    columns = ["workload", "mode", "batching", "loop", "clients", "tok/s", "req/s", "p50", "p95", "p99", "ttft p50",
               "batch", "prefix hits", "cpu ms/tok", "cores busy", "errs", "identical", "near_ties"]
    results_io.write(name, payload, columns,
                     f"Load: throughput and latency under concurrent clients ({payload['profile']})", notes)
    results_io.chart(name, list(dict.fromkeys(r["workload"] for r in rows)), lambda ax, w: draw(ax, w, rows))


if __name__ == "__main__":
    main()
