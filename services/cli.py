"""`ralmspec` command line: assets, ask, serve, up."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from services.common import env, logs
from services.common.errors import InvalidRequest, RalmError
from services.common.layout import PROFILES

if TYPE_CHECKING:
    from services.gateway.ralm import RalmResult

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _assets(args: argparse.Namespace) -> int:
    from services.assets import build, table

    manifest = build(args.profile, model=args.model, skip=args.skip)
    print(table(args.profile, manifest))
    return 0


def _ask(args: argparse.Namespace) -> int:
    from services.gateway.inprocess import open_engine
    from services.gateway.prompts import qa_prompt
    from services.gateway.ralm import RalmConfig
    from services.gateway.settings import GatewaySettings

    retriever = None if args.retriever == "none" else args.retriever
    mode = "no-retrieval" if retriever is None else args.mode
    cfg = RalmConfig(mode=mode, stride=args.stride, max_new_tokens=args.max_new_tokens)
    prompt = qa_prompt(args.question)  # validate before loading anything
    cfg.validate()
    settings = GatewaySettings.from_env(profile=args.profile, model=args.model)
    engine = open_engine(settings, [retriever] if retriever else [])
    if args.speculate and retriever:
        from services.gateway.ralmspec import PRESETS, SpeculativeRalm

        res = SpeculativeRalm(engine).generate(prompt, cfg, PRESETS[args.speculate], retriever)
    else:
        res = engine.generate(prompt, cfg, retriever or "exact")
    used = list(dict.fromkeys(res.doc_ids))
    head = f"passages ({retriever or 'no retrieval'}, {res.retrievals} retrievals):"
    return _report(res, args.json, {"answer": res.text, "passages": [
        {"id": p, "title": engine.docs.get(p).title} for p in used]}, [f"answer: {res.text}", head] + [
        f"  [{p}] {engine.docs.get(p).title or '(untitled)'}: {engine.docs.get(p).text[:80]}..." for p in used],
        "retrieval", ("rounds", "verifications"))


def _knn(args: argparse.Namespace) -> int:
    from services.gateway.inprocess import open_knnlm
    from services.gateway.knn_generation import KnnRequest
    from services.gateway.settings import GatewaySettings
    from services.gateway.speculation import PRESETS
    from services.lm.types import KnnLmConfig

    if not args.prompt.strip():
        raise InvalidRequest("the prompt is empty")
    req = KnnRequest(args.max_new_tokens, knn=KnnLmConfig(k=args.k, lam=args.lam, temperature=args.temperature,
                                                          index=args.index))
    spec = PRESETS[args.speculate] if args.speculate else None
    req.validate(spec)  # before loading anything
    knn = open_knnlm(GatewaySettings.from_env(profile=args.profile, model=args.model))
    res = knn.speculate(args.prompt, req, spec) if spec else knn.generate(args.prompt, req)
    return _report(res, args.json, {"text": res.text}, [f"{args.prompt}{res.text}"],
                   f"{len(res.tokens)} tokens, datastore search", ("retrieval_calls", "searches"))


def _report(res: RalmResult, as_json: bool, fields: dict, lines: list[str], retrieval: str,
            calls: tuple[str, str]) -> int:
    """Print a generation: one JSON object (`fields`, tokens, times, stats), or `lines`, the time split and,
    when it speculated, the speculation stats; `calls` = (stats key, what it counts) for the verification count."""
    if as_json:
        print(json.dumps({**fields, "tokens": res.tokens, "retrieval_s": res.retrieval_s, "lm_s": res.lm_s,
                          "total_s": res.total_s, "stats": res.stats}))
        return 0
    print("\n".join(lines))
    print(f"time: {retrieval} {res.retrieval_s * 1e3:.0f} ms, LM {res.lm_s * 1e3:.0f} ms, "
          f"total {res.total_s * 1e3:.0f} ms")
    if "spec_accuracy" in res.stats:
        s = res.stats
        print(f"speculation: accuracy {s['spec_accuracy']:.2f}, {s[calls[0]]} {calls[1]}, "
              f"mean stride {s['mean_stride']:.1f}, {s['rollbacks']} rollbacks")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from services.common.serving import configure_process

    s = configure_process(args.service, args.port, args.replica)  # before the engines' imports log anything
    from services.serve import run

    if args.die_with_parent:
        from services.common.process import die_with_parent

        die_with_parent()
    run(args.service, args.profile, s, args.retrievers)
    return 0


def _up(args: argparse.Namespace) -> int:
    from services.up import DEFAULT_REPLICAS, up

    replicas = dict(DEFAULT_REPLICAS)
    for item in args.replicas:
        name, _, n = item.partition("=")
        if name not in replicas or not n.isdigit() or int(n) < 1:
            raise SystemExit(f"--replicas takes service=N with service in {', '.join(replicas)} and N >= 1")
        replicas[name] = int(n)
    return up(args.profile or env.PROFILE.get(), args.port, replicas)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ralmspec", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("assets", help="build the corpus, indexes and model of a profile (idempotent)")
    a.add_argument("--profile", choices=PROFILES, default=env.PROFILE.get())
    a.add_argument("--model", default=env.MODEL.get())
    a.add_argument("--skip", nargs="*", default=[], metavar="STEP",
                   help="steps not to build: corpus embeddings faiss lucene lm rest knn (e.g. knn: hours on a CPU)")
    a.set_defaults(run=_assets)
    q = sub.add_parser("ask", help="answer a question with iterative retrieval-augmented generation")
    q.add_argument("question")
    q.add_argument("--retriever", choices=["exact", "approx", "sparse", "none"], default="exact")
    q.add_argument("--mode", choices=["kv-reuse", "paper"], default="kv-reuse")
    q.add_argument("--speculate", choices=["ralmspec", "+P", "+S", "+A", "+PSA"], default=None,
                   help="speculative retrieval (same tokens as the baseline): the paper's ablation switches")
    q.add_argument("--profile", choices=PROFILES, default=None)
    q.add_argument("--model", default=None)
    q.add_argument("--stride", type=int, default=4)
    q.add_argument("--max-new-tokens", type=int, default=128)
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(run=_ask)
    kn = sub.add_parser("knn", help="continue a text with KNN-LM (a datastore search at every token)")
    kn.add_argument("prompt")
    kn.add_argument("--speculate", choices=["ralmspec", "+P", "+S", "+A", "+PSA"], default=None,
                    help="speculative retrieval (same tokens as the baseline): the paper's ablation switches")
    kn.add_argument("--k", type=int, default=1024, help="neighbours per token")
    kn.add_argument("--lam", type=float, default=0.25, help="weight of the kNN distribution")
    kn.add_argument("--temperature", type=float, default=1.0, help="of the softmax over negative distances")
    kn.add_argument("--index", choices=["exact", "approx"], default="exact")
    kn.add_argument("--profile", choices=PROFILES, default=None)
    kn.add_argument("--model", default=None)
    kn.add_argument("--max-new-tokens", type=int, default=32)
    kn.add_argument("--json", action="store_true", help="print one JSON object")
    kn.set_defaults(run=_knn)
    sv = sub.add_parser("serve", help="run one service (gRPC + Redis stream worker); settings from RALMSPEC_*")
    sv.add_argument("service", choices=["lm", "retriever", "verifier", "datastore", "gateway"])
    sv.add_argument("--profile", choices=PROFILES, default=None)
    sv.add_argument("--port", type=int, default=None, help="gRPC port (default RALMSPEC_PORT, 0 = free)")
    sv.add_argument("--replica", default=None, help="consumer name (default <hostname>-<pid>)")
    sv.add_argument("--retrievers", nargs="+", choices=["exact", "approx", "sparse"], default=None)
    sv.add_argument("--die-with-parent", action="store_true", help="exit when the parent process exits (`up`)")
    sv.set_defaults(run=_serve)
    u = sub.add_parser("up", help="start a local Redis and every service; print the gateway address")
    u.add_argument("--profile", choices=PROFILES, default=None)
    u.add_argument("--port", type=int, default=50051, help="the gateway's gRPC port (0 = free)")
    u.add_argument("--replicas", nargs="*", default=[], metavar="SERVICE=N", help="e.g. retriever=2 verifier=2")
    u.set_defaults(run=_up)
    return p


def main(argv: list[str] | None = None) -> int:
    logs.configure("WARNING")
    args = parser().parse_args(argv)
    try:
        return int(args.run(args))
    except RalmError as e:
        print(f"ralmspec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
