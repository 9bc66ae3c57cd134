"""Where cross-request coalescing pays on this CPU, and the default coalescing window.

    python -m bench.coalescing --profile tiny --large 600000

(a) FAISS exact flat search: s queries in one call vs s one-query calls, s = 1..16, FAISS on 1 and 2 OpenMP
    threads, each batch on both of FAISS's kernels (`faiss.cvar.distance_compute_blas_threshold` forced: a
    scan per query, or one BLAS product for the batch; a one-query call always scans). On the profile's passage
    index and KNN-LM datastore (real), and with `--large N` on an N x 576 random float32 flat L2 index, the
    size of the default profile's KNN-LM datastore (600k), whose cost depends on the shape, not the values.
(b) End to end through the retriever service (its handlers in process: validation, coalescing, thread pool,
    exact re-scoring; no transport): N closed-loop clients each sending `--calls` Search (exact, k = 20, one
    key) or SearchKnn (exact, k = 1024, one query) calls, coalescing off (window 0) vs on (the retriever
    batches while its threads are busy; any window > 0 turns that on).
(c) The verifier in front of that retriever service (a sleep stands for the Redis round trip): 3-key Verify /
    VerifyKnn rounds, verifier window 0 vs the default window.

Every cell runs `--reps` times in an order rotated per repetition; ratios are median [min, max] over them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
from google.protobuf.message import Message
from ralmspec.v1 import common_pb2 as cpb
from ralmspec.v1 import retriever_pb2 as pb
from ralmspec.v1 import verifier_pb2 as vpb

from bench.results_io import markdown_table, rotated, spread, spread_text, write
from services.common.ops import Operation
from services.common.wire import vector_bytes
from services.gateway.settings import GatewaySettings
from services.retriever.coalescing import WINDOW_MS, CoalesceSettings
from services.retriever.dense import BLAS_THRESHOLD
from services.retriever.knn_index import KnnDatastore, flat_index
from services.retriever.retriever import open_retriever
from services.retriever.service import RetrieverServiceSettings, retriever_service
from services.retriever.wire import key_to_proto
from services.verifier.service import VerifierSettings, verifier_service

SIZES = (1, 2, 4, 8, 16)
SCAN, BLAS = 1 << 30, 0  # thresholds that force each kernel


@dataclass
class Index:
    name: str  # what the table calls it
    index: faiss.Index
    queries: np.ndarray  # [16, d] float32
    k: int


def noisy(rows: np.ndarray, scale: float, seed: int) -> np.ndarray:
    """Query-like vectors: stored rows plus Gaussian noise of `scale` x their mean norm per dimension."""
    rows = np.asarray(rows, dtype=np.float32)
    sigma = scale * float(np.linalg.norm(rows, axis=1).mean()) / np.sqrt(rows.shape[1])
    return rows + np.random.default_rng(seed).normal(0, sigma, rows.shape).astype(np.float32)


def indexes(settings: GatewaySettings, large: int) -> list[Index]:
    layout, rng = settings.layout, np.random.default_rng(0)
    out = []
    vectors = np.load(layout.embeddings)  # [N, 384] float32
    flat = faiss.read_index(str(layout.faiss_index("flat")))
    out.append(Index(f"passages {flat.ntotal} x {flat.d} (IP, k=20)", flat,
                     noisy(vectors[rng.choice(len(vectors), 16, replace=False)], 0.7, 1), 20))
    folder = layout.knn_datastore(settings.model)
    if (folder / "meta.json").exists():
        ds = KnnDatastore.load(folder, ())
        ix = flat_index(ds.keys)  # the exact index the retriever serves
        out.append(Index(f"KNN datastore {ix.ntotal} x {ix.d} (L2, k=1024)", ix,
                         noisy(ds.gather(rng.choice(ds.size, 16, replace=False)), 0.3, 2), 1024))
    if large:
        keys = rng.standard_normal((large, 576), dtype=np.float32).astype(np.float16)
        out.append(Index(f"random {large} x 576 (L2, k=1024)", flat_index(keys), noisy(keys[:16], 0.3, 3), 1024))
    return out


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def cells(ix: Index, s: int) -> dict[str, Callable[[], object]]:
    """s one-query calls (a lone query always scans), and one s-query call with each kernel forced."""
    q = ix.queries[:s]

    def singles() -> None:
        faiss.cvar.distance_compute_blas_threshold = SCAN
        for i in range(s):
            ix.index.search(q[i : i + 1], ix.k)

    def batch(threshold: int) -> Callable[[], None]:
        def run() -> None:
            faiss.cvar.distance_compute_blas_threshold = threshold
            ix.index.search(q, ix.k)

        return run

    return {"singles": singles, "scan": batch(SCAN), "blas": batch(BLAS)}


def faiss_rows(ix: Index, reps: int) -> list[dict]:
    """Per (threads, s): s one-query calls vs one s-query call on each kernel."""
    rows = []
    for threads in (1, 2):
        faiss.omp_set_num_threads(threads)
        for s in SIZES:
            run = cells(ix, s)
            t: dict[str, list[float]] = {c: [] for c in run}
            run["singles"]()  # warm-up (page cache, BLAS buffers)
            for r in range(reps):
                for c in rotated(list(run), r):
                    t[c].append(timed(run[c]))
            policy = "blas" if s * ix.index.d >= BLAS_THRESHOLD else "scan"
            row = {"index": ix.name, "threads": threads, "s": s,
                   "singles_ms": 1e3 * statistics.median(t["singles"]),
                   "scan_ms": 1e3 * statistics.median(t["scan"]), "blas_ms": 1e3 * statistics.median(t["blas"]),
                   "scan_gain": spread_text([a / b for a, b in zip(t["singles"], t["scan"])]),
                   "blas_gain": spread_text([a / b for a, b in zip(t["singles"], t["blas"])]),
                   "policy": policy, "best": min(("scan", "blas"), key=lambda c: statistics.median(t[c])),
                   "times_s": t}
            rows.append(row)
            print({k: v for k, v in row.items() if k != "times_s"}, flush=True)
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
    return rows


async def closed_loop(handler: Callable, requests: list, clients: int, calls: int) -> tuple[float, float]:
    """`clients` callers each sending `calls` requests back to back: (calls per second, mean latency s)."""
    latencies: list[float] = []

    async def client(c: int) -> None:
        for i in range(calls):
            t = time.perf_counter()
            await handler(requests[(c * calls + i) % len(requests)])
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return clients * calls / (time.perf_counter() - t0), statistics.mean(latencies)


class Counted:
    """An index (retriever or KNN datastore) that counts its calls."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def search_embedded(self, keys: Any, k: int) -> Any:
        self.calls += 1
        return self.inner.search_embedded(keys, k)

    def neighbours(self, queries: Any, k: int, index: str) -> Any:
        self.calls += 1
        return self.inner.neighbours(queries, k, index)


class Transport:
    """The verifier's retriever client, in process: the retriever service's handlers after `delay_s` (a Redis
    round trip)."""

    def __init__(self, ops: dict, delay_s: float) -> None:
        self.ops, self.delay_s, self.calls = ops, delay_s, 0

    async def call(self, stream: str, op: Operation, request: Message, *, timeout_s: float | None = None) -> Message:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        reply: Message = await self.ops[op.name].handler(request)
        return reply


def workloads(settings: GatewaySettings, ds: KnnDatastore | None, keys_per_call: int
              ) -> dict[str, tuple[str, list[Message]]]:
    """Search (exact, k = 20) and SearchKnn (exact, k = 1024) calls of `keys_per_call` keys each; with
    keys_per_call > 1 as Verify / VerifyKnn rounds."""
    rng = np.random.default_rng(4)
    vectors = np.load(settings.layout.embeddings)
    keys = [key_to_proto(k) for k in noisy(vectors[rng.choice(len(vectors), 64, replace=False)], 0.7, 5)]
    groups = [keys[i : i + keys_per_call] for i in range(0, 64 - keys_per_call + 1, keys_per_call)]
    verify = keys_per_call > 1
    out: dict[str, tuple[str, list[Message]]] = {}
    exact_kind = cpb.RETRIEVER_KIND_EXACT
    out["passages exact k=20"] = (("Verify", [vpb.VerifyRequest(retriever=exact_kind, keys=g, k=20) for g in groups])
                                  if verify else
                                  ("Search", [pb.SearchRequest(retriever=exact_kind, keys=g, k=20) for g in groups]))
    if ds is not None:
        q = [vector_bytes(v) for v in noisy(ds.gather(rng.choice(ds.size, 64, replace=False)), 0.3, 6)]
        qs = [q[i : i + keys_per_call] for i in range(0, 64 - keys_per_call + 1, keys_per_call)]
        out["KNN exact k=1024"] = (("VerifyKnn", [vpb.VerifyKnnRequest(queries=g, k=1024) for g in qs]) if verify else
                                   ("SearchKnn", [pb.SearchKnnRequest(queries=g, k=1024) for g in qs]))
    return out


def service_rows(settings: GatewaySettings, clients: list[int], calls: int, reps: int, windows: list[float],
                 verifier: bool, transport_ms: float) -> list[dict]:
    """(b) the retriever service (one key per call), or (c) the verifier in front of it (3-key rounds; the
    retriever coalesces at the default window throughout): closed loops, each window against 0 (off)."""
    exact = open_retriever("exact", settings.layout, object())  # type: ignore[arg-type]  # keys given: no encoder
    folder = settings.layout.knn_datastore(settings.model)
    ds = KnnDatastore.load(folder, ("exact",)) if (folder / "meta.json").exists() else None
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
    cells = [0.0, *windows]
    rows = []
    for name, (op, requests) in workloads(settings, ds, 3 if verifier else 1).items():
        for n in clients:
            res: dict[float, list[tuple[float, float, float]]] = {w: [] for w in cells}
            for r in range(-1, reps):  # r = -1: warm-up
                for w in rotated(cells, max(r, 0)):
                    index: Any = Counted(ds if op.endswith("Knn") else exact)
                    retrievers = {"exact": exact if op.endswith("Knn") else index}
                    svc, pool = retriever_service(retrievers, knn=index if op.endswith("Knn") else ds,
                                                  settings=RetrieverServiceSettings(coalesce=CoalesceSettings(
                                                      window_ms=WINDOW_MS if verifier else w)))
                    counted: Counted | Transport = index
                    if not verifier:
                        handler = svc.ops[op].handler
                    else:
                        counted = Transport(svc.ops, transport_ms / 1000)
                        vs = verifier_service(counted, VerifierSettings(coalesce=CoalesceSettings(window_ms=w)))
                        handler = vs.ops[op].handler
                    try:
                        rate, lat = asyncio.run(closed_loop(handler, requests, n, calls))
                    finally:
                        pool.shutdown()
                    if r >= 0:
                        res[w].append((rate, lat, counted.calls / (n * calls)))
            for w in windows:
                off, on = res[0.0], res[w]
                row = {"workload": f"{op}: {name}", "clients": n, "window_ms": w,
                       "off_calls_per_s": statistics.median(x[0] for x in off),
                       "on_calls_per_s": statistics.median(x[0] for x in on),
                       "throughput_gain": spread_text([b[0] / a[0] for a, b in zip(off, on)]),
                       "off_latency_ms": 1e3 * statistics.median(x[1] for x in off),
                       "on_latency_ms": 1e3 * statistics.median(x[1] for x in on),
                       "calls_per_call": statistics.median(x[2] for x in on),
                       "gain": spread([b[0] / a[0] for a, b in zip(off, on)]), "load": os.getloadavg()[0]}
                rows.append(row)
                print(row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--large", type=int, default=0, help="also time an N x 576 random flat index (600000: default's)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--large-reps", type=int, default=3)
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--calls", type=int, default=24, help="calls per client in (b) and (c)")
    ap.add_argument("--windows", nargs="+", type=float, default=[WINDOW_MS], help="windows (ms) against 0")
    ap.add_argument("--transport-ms", type=float, default=1.0, help="(c): a verifier -> retriever round trip")
    ap.add_argument("--skip-faiss", action="store_true")
    args = ap.parse_args()
    settings = GatewaySettings.from_env(profile=args.profile)
    load = [os.getloadavg()[0]]
    rows = []
    if not args.skip_faiss:
        for ix in indexes(settings, args.large):
            rows += faiss_rows(ix, args.large_reps if ix.name.startswith("random") else args.reps)
    load.append(os.getloadavg()[0])
    svc = service_rows(settings, args.clients, args.calls, args.reps, args.windows, False, args.transport_ms)
    ver = service_rows(settings, args.clients, args.calls, args.reps, args.windows, True, args.transport_ms)
    load.append(os.getloadavg()[0])
    svc_cols = ["workload", "clients", "window_ms", "off_calls_per_s", "on_calls_per_s", "throughput_gain",
                "off_latency_ms", "on_latency_ms", "calls_per_call"]
    notes = (f"(a) FAISS flat search, profile `{args.profile}`: `singles_ms` = s one-query calls (scan kernel), "
             "`scan_ms` / `blas_ms` = one s-query call with the kernel forced; `*_gain` = singles time / batch time, "
             f"median [min, max] over {args.reps} repetitions ({args.large_reps} for the random index), cells in "
             "rotated order. `policy`: the kernel FAISS takes under the service's threshold "
             f"(BLAS when s x d >= {BLAS_THRESHOLD}).\n\n"
             f"(b) Retriever service in process (2 pool threads, FAISS on 1 OpenMP thread each), closed loop, "
             f"{args.calls} one-key calls per client, coalescing off (window 0) vs on (`window_ms` > 0: batches form "
             "while both pool threads are busy; no timer); `throughput_gain` = calls/s on over off, median "
             "[min, max]; `calls_per_call`: index calls per Search.\n\n"
             + markdown_table(svc, svc_cols) + "\n\n"
             f"(c) Verifier in front of that retriever service (retriever window {WINDOW_MS:g} ms throughout), "
             f"{args.transport_ms:g} ms added per retriever call for the Redis round trip, 3-key rounds, verifier "
             "window 0 vs `window_ms`; `calls_per_call`: retriever calls per Verify.\n\n"
             + markdown_table(ver, svc_cols) + "\n\n"
             f"Load average (1 min) at start, after (a), at end: {', '.join(f'{x:.1f}' for x in load)} "
             f"on {os.cpu_count()} cores (other work shared the machine).")
    write("coalescing", {"rows": rows, "service_rows": svc, "verifier_rows": ver, "profile": args.profile,
                         "windows_ms": args.windows, "reps": args.reps, "large": args.large, "load_avg": load},
          ["index", "threads", "s", "singles_ms", "scan_ms", "blas_ms", "scan_gain", "blas_gain", "policy", "best"],
          "Cross-request coalescing: batched vs single FAISS searches, the retriever service and the verifier",
          notes)


if __name__ == "__main__":
    main()
