"""`make demo`: `ralmspec up` (a local Redis + every service) and a gRPC client asking real SQuAD questions.

For each question and retriever it asks the gateway twice, as the KV-reuse baseline and with RaLMSpec
(the gateway's default switches), prints the answer and passages, checks the tokens are identical, and ends
with the speedup of RaLMSpec over the baselines on these questions (both measured through the services).
Then KNN-LM (a datastore search at every token) continues the openings of passages held out of its datastore,
baseline vs speculative, the same way.

First answer fast: when the profile's assets are not built yet (about half an hour for `default` on 2 CPU
cores: corpus archive, 14.9k passage embeddings, a 600k-entry KNN-LM datastore), the demo first builds the
`tiny` profile (real SQuAD dev paragraphs, a few minutes, its KNN-LM datastore left for later) and answers one
question through the services on it, then builds the profile with progress and runs the whole demo.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import grpc
from ralmspec.v1 import gateway_pb2 as pb
from ralmspec.v1 import gateway_pb2_grpc

from services.assets import build, missing, table
from services.common import env
from services.common.layout import Layout
from services.common.rotation import rotated
from services.common.wire import retriever_kind
from services.retriever.corpus import read_questions
from services.retriever.docstore import DocStore
from services.retriever.knn_index import held_out_passages
from services.up import Cluster

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIRST_PROFILE = "tiny"  # builds in a few minutes: the first answer comes from it while the demo's profile builds
# Each request runs ROUNDS times, modes in rotated order, and its fastest round counts: this VM's noise only adds
# time (another tenant, a page fault), and one round's noise (±5%) hid what the modes differ by.
ROUNDS = 3
MODES = {"baseline-paper": pb.MODE_BASELINE_PAPER, "baseline-kv": pb.MODE_BASELINE_KV, "ralmspec": pb.MODE_RALMSPEC}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default=env.PROFILE.get())
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    t0 = time.monotonic()
    todo = missing(args.profile)
    if todo and args.profile != FIRST_PROFILE:
        print(f"the {args.profile} profile still needs: {', '.join(todo)} (up to half an hour on 2 CPU cores); "
              f"first, one answer on the {FIRST_PROFILE} profile", flush=True)
        first_answer(t0, args.max_new_tokens)
    if todo:
        print(f"\nbuilding the {args.profile} assets ({', '.join(todo)})", flush=True)
        print(table(args.profile, build(args.profile)), flush=True)
    t = time.monotonic()
    print(f"\nralmspec up ({args.profile} profile): starting Redis and the services...", flush=True)
    with Cluster(args.profile) as cluster:
        print(f"gateway on {cluster.gateway} after {time.monotonic() - t:.0f} s; "
              f"processes: {', '.join(c.replica for c in cluster.children)}\n", flush=True)
        picked = pick_questions(args.profile, args.questions)
        with cluster.channel() as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            ask(stub, picked, args.max_new_tokens)
            try:
                knn(stub, args.profile, args.questions, args.max_new_tokens)
            except grpc.RpcError as e:  # the profile's KNN datastore was not built (`ralmspec assets --skip knn`)
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                print(f"KNN-LM skipped: {e.details()}")
    print(f"services stopped; {time.monotonic() - t0:.0f} s since the demo started")


def pick_questions(profile: str, n: int) -> list:
    questions = read_questions(Layout.for_profile(profile).questions)
    return questions[:: max(1, len(questions) // n)][:n]


def first_answer(t0: float, max_new_tokens: int) -> None:
    """Build `FIRST_PROFILE` (without its KNN-LM datastore) and answer one question through every service."""
    build(FIRST_PROFILE, skip=["knn"])
    print(f"{FIRST_PROFILE} assets ready after {time.monotonic() - t0:.0f} s; starting the services...", flush=True)
    with Cluster(FIRST_PROFILE) as cluster, cluster.channel() as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        q = pick_questions(FIRST_PROFILE, 1)[0]
        r = stub.Generate(pb.GenerateRequest(question=q.question, mode=pb.MODE_RALMSPEC,
                                             max_new_tokens=max_new_tokens), timeout=600)
        print(f"\nQ: {q.question}   (gold: {' | '.join(q.answers)})\n  A: {r.text!r}  "
              f"[{', '.join(p.title or str(p.passage_id) for p in r.passages)}]\n"
              f"first answer {time.monotonic() - t0:.0f} s after the demo started "
              f"(RaLMSpec, exact retriever, {FIRST_PROFILE} profile)", flush=True)


def in_rounds(stub: gateway_pb2_grpc.GatewayServiceStub, modes: list[tuple[str, pb.Mode]], i: int,  # type: ignore[type-arg]
              request: pb.GenerateRequest) -> dict[str, list[pb.GenerateReply]]:
    """Each mode's replies to `request` (the i-th asked) over ROUNDS rounds, each round in a rotated order (no mode
    always runs first)."""
    replies: dict[str, list[pb.GenerateReply]] = {}
    for rnd in range(ROUNDS):
        for mode, m in rotated(modes, i + rnd):
            req = pb.GenerateRequest()
            req.CopyFrom(request)
            req.mode = m
            replies.setdefault(mode, []).append(stub.Generate(req, timeout=600))
    return replies


def identical(replies: dict[str, list[pb.GenerateReply]]) -> bool:
    """Every reply of every mode has the same tokens."""
    first = list(next(iter(replies.values()))[0].token_ids)
    return all(list(x.token_ids) == first for rs in replies.values() for x in rs)


def ask(stub: gateway_pb2_grpc.GatewayServiceStub, questions: list, max_new_tokens: int) -> None:  # type: ignore[type-arg]
    times: dict[tuple[str, str], list[float]] = {}
    same = total = 0
    order = list(MODES.items())
    for i, q in enumerate(questions):
        print(f"Q: {q.question}   (gold: {' | '.join(q.answers)})")
        for retriever in ("exact", "approx", "sparse"):
            replies = in_rounds(stub, order, i, pb.GenerateRequest(
                question=q.question, retriever=retriever_kind(retriever), max_new_tokens=max_new_tokens))
            for mode, rs in replies.items():
                times.setdefault((retriever, mode), []).append(min(x.stats.time.total_s for x in rs))
            r = replies["ralmspec"][0]
            ok = identical(replies)
            same, total = same + ok, total + 1
            passages = ", ".join(f"[{p.passage_id}] {p.title or '(untitled)'}" for p in r.passages)
            print(f"  {retriever:<7} {r.text!r:<36} identical={ok}  spec accuracy {r.stats.spec_accuracy:.2f}  "
                  f"{passages}")
        print()
    print(f"identical tokens in {same}/{total} (question, retriever) pairs across the three modes")
    print(f"mean latency per request through the services (s; each request's fastest of {ROUNDS} rounds), and "
          "RaLMSpec's speedup:")
    for retriever in ("exact", "approx", "sparse"):
        mean = {m: statistics.mean(times[(retriever, m)]) for m in MODES}
        print(f"  {retriever:<7} paper {mean['baseline-paper']:.2f}  kv {mean['baseline-kv']:.2f}  "
              f"ralmspec {mean['ralmspec']:.2f}  ->  {mean['baseline-paper'] / mean['ralmspec']:.2f}x vs paper, "
              f"{mean['baseline-kv'] / mean['ralmspec']:.2f}x vs kv")



def knn(stub: gateway_pb2_grpc.GatewayServiceStub, profile: str, n: int, max_new_tokens: int) -> None:  # type: ignore[type-arg]
    """KNN-LM continuing the openings of passages held out of its datastore (text that goes on, unlike a
    question, which the LM answers with an end of text at once), baseline and speculative in rotated order."""
    lay = Layout.for_profile(profile)
    docs = DocStore.load(lay.passages)
    held = held_out_passages(lay.knn_datastore(env.MODEL.get()), len(docs))
    prompts = [" ".join(docs.document(i).split()[:24]) for i in held[:: max(1, len(held) // n)][:n]]
    print(f"\nKNN-LM (k = 1024, λ = 0.25, exact index), continuing {len(prompts)} passages held out of its datastore:")
    modes = [("baseline", pb.MODE_BASELINE_KV), ("ralmspec", pb.MODE_RALMSPEC)]
    times: dict[str, list[float]] = {"baseline": [], "ralmspec": []}
    for i, p in enumerate(prompts):
        replies = in_rounds(stub, modes, i, pb.GenerateRequest(prompt=p, max_new_tokens=max_new_tokens, knn=pb.Knn()))
        for mode, rs in replies.items():
            times[mode].append(min(x.stats.time.total_s for x in rs))
        r = replies["ralmspec"][0]
        ok = identical(replies)
        print(f"  {p[:60]!r}... -> {r.text!r}\n    identical={ok}  spec accuracy {r.stats.spec_accuracy:.2f}")
    base, spec = statistics.mean(times["baseline"]), statistics.mean(times["ralmspec"])
    print(f"  mean latency per request (fastest of {ROUNDS} rounds): baseline {base:.2f} s, speculative {spec:.2f} s "
          f"-> {base / spec:.2f}x")


if __name__ == "__main__":
    main()
