"""Distributed (Redis streams + gRPC service processes) vs in-process latency for the same requests.

    python -m bench.pipeline --profile default --questions 6 [--no-knn]

Each request runs in process (the controller on engine objects in this process) and through `ralmspec up`'s
services (a gRPC client timing the gateway's Generate), alternately, with tokens checked equal. Also the
per-hop overhead: round trips of a trivial operation over a Redis stream (XADD -> worker -> reply), and over
gRPC to the same service, measured with nothing else running.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np
from ralmspec.v1 import common_pb2 as cpb
from ralmspec.v1 import gateway_pb2 as pb
from ralmspec.v1 import gateway_pb2_grpc, lm_pb2

from bench.results_io import write
from services.common.contracts import LM
from services.common.grpc_client import GrpcClient
from services.common.transport import StreamClient
from services.gateway.api import to_request
from services.gateway.controller import Controller
from services.gateway.inprocess import open_engine, open_knnlm
from services.gateway.settings import GatewaySettings
from services.retriever.corpus import read_questions
from services.up import Cluster

KINDS = {"exact": cpb.RETRIEVER_KIND_EXACT, "approx": cpb.RETRIEVER_KIND_APPROX, "sparse": cpb.RETRIEVER_KIND_SPARSE}
KNN = {"knn-exact": cpb.KNN_INDEX_EXACT, "knn-approx": cpb.KNN_INDEX_APPROX}  # KNN-LM, k = 1024, λ = 0.25
MODES = {"baseline-kv": pb.MODE_BASELINE_KV, "ralmspec": pb.MODE_RALMSPEC}


def request(prompt: str, retriever: str, mode: str, n: int) -> pb.GenerateRequest:
    if retriever in KNN:
        return pb.GenerateRequest(prompt=prompt, mode=MODES[mode], max_new_tokens=n, knn=pb.Knn(index=KNN[retriever]))
    return pb.GenerateRequest(prompt=prompt, retriever=KINDS[retriever], mode=MODES[mode], max_new_tokens=n)


async def hops(cluster: Cluster, n: int) -> dict[str, list[float]]:
    """Round trips (ms) of LmService.CloseSession for an unknown session: the handler does a dict lookup."""
    op, req = LM.ops["CloseSession"], lm_pb2.CloseSessionRequest(session_id="bench-no-such-session")
    lm_port = next(c.port for c in cluster.children if c.service == "lm")
    out: dict[str, list[float]] = {"stream": [], "grpc": []}
    async with StreamClient(cluster.redis_url, name="bench") as client:
        grpc_client = GrpcClient(f"127.0.0.1:{lm_port}")
        for _ in range(20):  # warm both paths
            await client.call(LM.stream, op, req)
            await grpc_client.call(LM, op, req)
        for _ in range(n):
            t = time.perf_counter()
            await client.call(LM.stream, op, req)
            out["stream"].append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            await grpc_client.call(LM, op, req)
            out["grpc"].append((time.perf_counter() - t) * 1e3)
        await grpc_client.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="default")
    ap.add_argument("--questions", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--hops", type=int, default=2000)
    ap.add_argument("--no-knn", action="store_true", help="skip KNN-LM requests (needs the profile's datastore)")
    ap.add_argument("--name", default="pipeline", help="results file name under bench/results/")
    args = ap.parse_args()
    settings = GatewaySettings.from_env(profile=args.profile)
    questions = read_questions(settings.layout.questions)
    picked = questions[5 :: max(1, len(questions) // args.questions)][: args.questions]
    kinds = list(KINDS) + ([] if args.no_knn else list(KNN))
    reqs = [(r, m, request(f"{q.question} Background:\n", r, m, args.max_new_tokens))
            for q in picked for r in kinds for m in MODES]
    engine = open_engine(settings)
    knn = None if args.no_knn else open_knnlm(settings, engine.backends.lm)  # type: ignore[arg-type]
    controller = Controller(engine, knn=knn)
    with Cluster(args.profile) as cluster, cluster.channel() as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        stub.Generate(reqs[0][2], timeout=600)  # warm up both runtimes
        controller.run(to_request(reqs[0][2]))
        runs = []
        for retriever, mode, req in reqs:
            t = time.perf_counter()
            local = controller.run(to_request(req))
            t_local = time.perf_counter() - t
            t = time.perf_counter()
            remote = stub.Generate(req, timeout=600)
            t_remote = time.perf_counter() - t
            runs.append({"retriever": retriever, "mode": mode, "inprocess_s": t_local, "distributed_s": t_remote,
                         "identical": list(remote.token_ids) == local.tokens})
            print(runs[-1], flush=True)
        hop = asyncio.run(hops(cluster, args.hops))
    rows = []
    for retriever in kinds:
        for mode in MODES:
            rs = [r for r in runs if r["retriever"] == retriever and r["mode"] == mode]
            local = statistics.mean(r["inprocess_s"] for r in rs)
            remote = statistics.mean(r["distributed_s"] for r in rs)
            rows.append({"retriever": retriever, "mode": mode, "inprocess_s": local, "distributed_s": remote,
                         "ratio": remote / local, "identical": all(r["identical"] for r in rs)})
        base, spec = rows[-2], rows[-1]  # RaLMSpec's speedup over the KV baseline, in each runtime
        spec["speedup_inprocess"] = base["inprocess_s"] / spec["inprocess_s"]
        spec["speedup_distributed"] = base["distributed_s"] / spec["distributed_s"]
    total_local = sum(r["inprocess_s"] for r in runs)
    total_remote = sum(r["distributed_s"] for r in runs)
    p = {k: (float(np.percentile(v, 50)), float(np.percentile(v, 99))) for k, v in hop.items()}
    write(args.name, {
        "profile": args.profile, "requests": len(runs), "max_new_tokens": args.max_new_tokens,
        "distributed_over_inprocess": total_remote / total_local,
        "hop_p50_ms": p["stream"][0], "hop_p99_ms": p["stream"][1],
        "grpc_hop_p50_ms": p["grpc"][0], "grpc_hop_p99_ms": p["grpc"][1],
        "identical": all(r["identical"] for r in runs), "rows": rows, "runs": runs},
        ["retriever", "mode", "inprocess_s", "distributed_s", "ratio", "speedup_inprocess", "speedup_distributed",
         "identical"],
        f"Distributed vs in-process ({args.profile}, {len(runs)} requests x {args.max_new_tokens} tokens)",
        f"Distributed / in-process over all requests: **{total_remote / total_local:.3f}x**. "
        f"Per hop over a Redis stream: p50 {p['stream'][0]:.2f} ms, p99 {p['stream'][1]:.2f} ms; over gRPC: "
        f"p50 {p['grpc'][0]:.2f} ms, p99 {p['grpc'][1]:.2f} ms ({args.hops} round trips each).")


if __name__ == "__main__":
    main()
