"""RaLMSpec's Table 1 on this machine: baselines vs speculative retrieval (+P, +S, +A, +PSA) vs lm-only.

    python -m bench.ralmspec --profile large --questions 3

Every method runs the same requests (SQuAD dev questions, 128 new tokens, no newline stop, stride 4,
query = last 32 tokens, top-1 document); outputs are checked equal to the kv-reuse baseline's. Also a
scaling run: the exact retriever over flat indexes of the first N real passages.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import numpy as np

from bench import results_io
from bench.results_io import spread, spread_text, write
from bench.rounds import fastest_run, measure
from services.common.equivalence import compare
from services.gateway.inprocess import open_engine
from services.gateway.prompts import qa_prompt
from services.gateway.ralm import RalmConfig, RalmEngine, RalmResult
from services.gateway.ralmspec import PRESETS, SpeculativeRalm
from services.gateway.settings import GatewaySettings
from services.retriever.corpus import read_questions
from services.retriever.dense import DenseIndex, build_index
from services.retriever.retriever import DenseRetriever

METHODS = ["baseline-paper", "baseline-kv", *PRESETS, "lm-only"]
# Request i runs these units in an order rotated by i; lm-only replays the documents baseline-kv retrieved for
# the same request, so the two run back to back as one unit.
UNITS = [["baseline-paper"], ["baseline-kv", "lm-only"], *[[p] for p in PRESETS]]


def run_methods(engine: RalmEngine, spec: SpeculativeRalm, prompts: list[str], retriever: str,
                cfg: RalmConfig, methods: list[str], reps: int = 1) -> list[dict]:
    units = [u for u in ([m for m in unit if m in methods or m == "baseline-kv"] for unit in UNITS) if u]
    paper_cfg = RalmConfig(**{**cfg.__dict__, "mode": "paper"})
    lm_cfg = RalmConfig(**{**cfg.__dict__, "mode": "lm-only"})
    last_kv: dict[str, RalmResult] = {}  # prompt -> baseline-kv's latest run, whose documents lm-only replays

    def kv(p: str) -> RalmResult:
        last_kv[p] = engine.generate(p, cfg, retriever)
        return last_kv[p]

    run: dict[str, Callable[[str], RalmResult]] = {
        "baseline-paper": lambda p: engine.generate(p, paper_cfg, retriever), "baseline-kv": kv,
        "lm-only": lambda p: engine.generate(p, lm_cfg, schedule=last_kv[p].doc_ids),
        **{m: (lambda p, m=m: spec.generate(p, cfg, PRESETS[m], retriever)) for m in PRESETS}}
    rounds = measure(prompts, run, reps, units)
    runs = {m: [fastest_run(rs) for rs in per_prompt] for m, per_prompt in rounds.items()}  # per prompt
    mean: Callable[[str], float] = lambda m: statistics.mean(r.total_s for r in runs[m])  # noqa: E731
    t_paper, t_kv, t_lm = mean("baseline-paper"), mean("baseline-kv"), mean("lm-only")
    rows = []
    for m in methods:
        rs, base = runs[m], runs["baseline-kv"]
        verdicts = [compare(b.tokens, b.gaps, r.tokens, r.gaps) for b, per in zip(base, rounds[m]) for r in per]
        t = mean(m)
        spec_acc = [r.stats["spec_accuracy"] for r in rs if "spec_accuracy" in r.stats]
        rows.append({
            "retriever": retriever, "method": m, "latency_s": t, "latency_spread": spread([r.total_s for r in rs]),
            "latency": spread_text([r.total_s for r in rs]),
            "speedup_vs_paper": t_paper / t, "speedup_vs_kv": t_kv / t, "over_lm_only": t / t_lm,
            # per-request ratios (same prompt, both methods): their spread over the requests
            "vs_kv_per_request": spread_text([b.total_s / r.total_s for b, r in zip(base, rs)]),
            "vs_paper_per_request": spread_text([b.total_s / r.total_s for b, r in zip(runs["baseline-paper"], rs)])
            if "baseline-paper" in runs else None,
            "captured": (t_kv - t) / (t_kv - t_lm) if t_kv > t_lm else float("nan"),
            "captured_vs_paper": (t_paper - t) / (t_paper - t_lm) if t_paper > t_lm else float("nan"),
            "spec_accuracy": statistics.mean(spec_acc) if spec_acc else None,
            "mean_stride": statistics.mean(r.stats["mean_stride"] for r in rs) if spec_acc else None,
            "retrieval_calls": statistics.mean(r.stats.get("retrieval_calls", r.retrievals) for r in rs),
            "retrieval_s": statistics.mean(r.retrieval_s for r in rs), "lm_s": statistics.mean(r.lm_s for r in rs),
            "identical": all(v.identical for v in verdicts),
            "near_ties": sum(v.near_tie for v in verdicts), "mismatches": sum(not v.ok for v in verdicts),
        })
        print(rows[-1], flush=True)
    return rows


SCALING = [3000, 10000, 10**9]  # 10**9: the whole corpus


def scaling(engine: RalmEngine, spec: SpeculativeRalm, prompts: list[str], cfg: RalmConfig,
            sizes: list[int], reps: int = 1) -> list[dict]:
    """Speedup of +PSA over both baselines with the exact retriever on the first N real passages."""
    exact = engine.retrievers["exact"]
    assert isinstance(exact, DenseRetriever)
    vectors = exact.index.vectors
    out = []
    for n in sizes:
        n = min(n, len(vectors))
        sub = np.ascontiguousarray(vectors[:n])
        index = DenseIndex(build_index("flat", sub), "flat", sub)
        engine.retrievers["scaled"] = DenseRetriever("scaled", exact.encoder, index)
        methods = ["baseline-paper", "baseline-kv", "+PSA", "lm-only"]
        rows = run_methods(engine, spec, prompts, "scaled", cfg, methods, reps)
        psa = next(r for r in rows if r["method"] == "+PSA")
        kv = next(r for r in rows if r["method"] == "baseline-kv")
        out.append({"passages": n, "speedup_vs_paper": psa["speedup_vs_paper"], "speedup_vs_kv": psa["speedup_vs_kv"],
                    "captured": psa["captured"], "baseline_kv_retrieval_s": kv["retrieval_s"],
                    "baseline_kv_s": kv["latency_s"], "psa_s": psa["latency_s"],
                    "vs_kv_per_request": psa["vs_kv_per_request"], "identical": psa["identical"]})
        print(out[-1], flush=True)
    del engine.retrievers["scaled"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="large")
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--retrievers", nargs="*", default=["exact", "approx", "sparse"],
                    help="given alone: none (the scaling run only)")
    ap.add_argument("--reps", type=int, default=1, help="rounds per request; a latency is its fastest round")
    ap.add_argument("--scaling", nargs="*", type=int, default=SCALING,
                    help=f"index sizes in passages (default {SCALING}; all of them: 10**9); given alone, the default")
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--name", default="ralmspec")
    args = ap.parse_args()
    settings = GatewaySettings.from_env(profile=args.profile)
    engine = open_engine(settings)
    spec = SpeculativeRalm(engine)
    questions = read_questions(settings.layout.questions)
    prompts = [qa_prompt(q.question) for q in questions[11 :: len(questions) // args.questions][: args.questions]]
    cfg = RalmConfig(max_new_tokens=args.max_new_tokens, stop_at_newline=False)
    for r in args.retrievers or ["exact"]:  # warm up each retriever (the first sparse search starts the JVM)
        engine.generate(prompts[0], RalmConfig(max_new_tokens=8), r)
        spec.generate(prompts[0], RalmConfig(max_new_tokens=8), PRESETS["+PSA"], r)
    rows = []
    for r in args.retrievers:
        rows += run_methods(engine, spec, prompts, r, cfg, METHODS, args.reps)
    scale = [] if args.no_scaling else scaling(engine, spec, prompts, cfg, args.scaling or SCALING, args.reps)
    write(args.name, {"passages": len(engine.docs), "profile": args.profile, "questions": len(prompts),
                      "max_new_tokens": args.max_new_tokens, "reps": args.reps, "rows": rows, "scaling": scale},
          ["retriever", "method", "latency_s", "latency", "speedup_vs_paper", "vs_paper_per_request",
           "speedup_vs_kv", "vs_kv_per_request", "over_lm_only", "captured", "spec_accuracy", "mean_stride",
           "retrieval_calls", "retrieval_s", "lm_s", "identical", "near_ties"],
          f"RaLMSpec on this machine ({args.profile}: {len(engine.docs)} passages, {len(prompts)} requests "
          f"x {args.max_new_tokens} tokens)",
          "`latency_s`: mean seconds per request; `latency`: median [min, max] over the requests. `speedup_vs_*`: "
          "ratio of the mean latencies; `vs_*_per_request`: the same ratio per request (same prompt, both methods), "
          f"median [min, max]. Each request runs every method in {args.reps} round(s), each in an order rotated by "
          "request and round (lm-only right after baseline-kv, whose documents it replays), and a method's figures "
          "on a request are its fastest round's; every retriever is warmed up first. `captured`: "
          "(kv - method) / (kv - lm-only), the share of the removable retrieval time that the method removed.\n\n"
          + ("Scaling (exact retriever, +PSA):\n\n" if scale else "Scaling: not run.") + "\n".join(
              f"- {s['passages']} passages: {s['speedup_vs_paper']:.2f}x vs paper, {s['speedup_vs_kv']:.2f}x vs kv "
              f"(per request {s['vs_kv_per_request']}; kv {s['baseline_kv_s']:.2f} s, +PSA {s['psa_s']:.2f} s, kv's "
              f"searches {s['baseline_kv_retrieval_s']:.3f} s), captured {s['captured']:.2f}, identical "
              f"{s['identical']}" for s in scale))
    if rows:
        chart(rows, args.name)


def chart(rows: list[dict], name: str) -> None:
    def draw(ax, retriever: str) -> None:
        rs = [r for r in rows if r["retriever"] == retriever]
        ax.bar([r["method"] for r in rs], [r["latency_s"] for r in rs], color="tab:blue")
        ax.set_title(f"{retriever}: latency per request (s)")
        ax.tick_params(axis="x", rotation=45)

    results_io.chart(name, list(dict.fromkeys(r["retriever"] for r in rows)), draw)


if __name__ == "__main__":
    main()
