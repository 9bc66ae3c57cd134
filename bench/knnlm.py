"""KNN-LM on this machine: baseline (one datastore search per token) vs speculative retrieval (+P, +S, +A, +PSA),
exact and approximate index, k in {1, 16, 256, 1024}, at two datastore sizes; plus perplexity.

    RALMSPEC_THREADS=1 python -m bench.knnlm --profiles tiny default --prompts 2 --max-new-tokens 32

Prompts are openings of passages held out of the datastore (language modelling: only EOS stops). Methods run
`--reps` rounds per prompt, each in an order rotated by prompt and round, and a method's figures on a prompt are
its fastest round's (`bench/rounds.py`); every round's output is checked equal to the baseline's (near-ties
counted). `captured` is the
share of the baseline's retrieval time that speculation removed: (T_base − T) / (T_base − T_lm-only), with
T_lm-only = the baseline's time without its searches. Perplexity: held-out passages, LM alone vs KNN-LM
(k = 1024, λ = 0.25, exact index) on the largest datastore.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

from bench import results_io
from bench.results_io import write
from bench.rounds import fastest_run, measure
from services.common.equivalence import compare
from services.gateway.inprocess import open_knn_datastore, open_knnlm, open_lm
from services.gateway.knn_generation import KnnLmEngine, KnnRequest
from services.gateway.ralm import RalmResult
from services.gateway.settings import GatewaySettings
from services.gateway.speculation import PRESETS
from services.lm.engine import LmEngine
from services.lm.knn_mixing import perplexity
from services.lm.types import KnnLmConfig
from services.retriever.corpus import read_passages
from services.retriever.docstore import DocStore
from services.retriever.knn_index import KnnDatastore, held_out_passages

METHODS = {"spec": "ralmspec", "+P": "+P", "+S": "+S", "+A": "+A", "+PSA": "+PSA"}  # row name -> preset


def warm(folder: Path) -> None:
    """Read the datastore's files once so the first method timed does not pay the page faults of the
    memory-mapped keys and IVF lists (a cold first run made one baseline 4x slower at retrieval)."""
    for f in folder.iterdir():
        with f.open("rb") as fh:
            while fh.read(1 << 26):
                pass


def held_out(settings: GatewaySettings, docs: DocStore) -> list[int]:
    return held_out_passages(settings.layout.knn_datastore(settings.model), len(docs))


GRID = [KnnLmConfig(lam=lam, temperature=t) for t in (1.0, 10.0, 100.0, 1000.0) for lam in (0.05, 0.1, 0.25)]


def held_out_prompts(settings: GatewaySettings, n: int, docs: DocStore | None = None) -> list[str]:
    """Openings (24 words) of n passages held out of the datastore: text KNN-LM continues for many tokens."""
    docs = docs or DocStore(read_passages(settings.layout.passages))
    held = held_out(settings, docs)
    return [" ".join(docs.document(i).split()[:24]) for i in held[:: max(1, len(held) // n)]][:n]


def perplexities(knn: KnnLmEngine, ds: KnnDatastore, lm: LmEngine, docs: DocStore, held: list[int], n: int) -> dict:
    """LM vs KNN-LM on held-out passages: kNN-LM's defaults (k = 1024, λ = 0.25, T = 1) on the test split, and the
    (λ, T) of GRID with the lowest perplexity on a validation split (the next n held-out passages), on test."""
    def texts(ids: list[int]) -> list[list[int]]:
        return [knn.encode(docs.document(i)) for i in ids]

    test, val = held[:n], held[n : 2 * n]
    default = KnnLmConfig()
    on_val = perplexity(lm.lm, texts(val), ds.search, ds.values, GRID)
    tuned = GRID[min(range(len(GRID)), key=lambda i: on_val.knnlm[i])]
    on_test = perplexity(lm.lm, texts(test), ds.search, ds.values, [default, tuned])
    return {"lm": on_test.lm, "knnlm": on_test.knnlm[0], "tokens": on_test.tokens, "passages": len(test),
            "defaults": {"k": default.k, "lam": default.lam, "temperature": default.temperature},
            "tuned": {"lam": tuned.lam, "temperature": tuned.temperature, "knnlm": on_test.knnlm[1],
                      "val_lm": on_val.lm, "val_knnlm": min(on_val.knnlm)}}


def run_grid(knn: KnnLmEngine, prompts: list[str], size: int, indexes: list[str], ks: list[int],
             tokens: int, methods: dict[str, str] = METHODS, reps: int = 1) -> list[dict]:
    rows = []
    for index in indexes:
        for k in ks:
            req = KnnRequest(tokens, knn=KnnLmConfig(k=k, index=index))
            run: dict[str, Callable[[str], RalmResult]] = {"baseline": lambda p, req=req: knn.generate(p, req)}
            for m, preset in methods.items():
                run[m] = lambda p, req=req, preset=preset: knn.speculate(p, req, PRESETS[preset])
            rounds = measure(prompts, run, reps)
            runs = {m: [fastest_run(rs) for rs in per_prompt] for m, per_prompt in rounds.items()}  # per prompt
            base = runs["baseline"]
            t_base = statistics.mean(r.total_s for r in base)
            t_lm = statistics.mean(r.total_s - r.retrieval_s for r in base)
            n_tok = statistics.mean(len(r.tokens) for r in base)
            for m, rs in runs.items():
                verdicts = [compare(b.tokens, b.gaps, r.tokens, r.gaps)
                            for b, per_prompt in zip(base, rounds[m]) for r in per_prompt]
                t = statistics.mean(r.total_s for r in rs)
                rows.append({
                    "datastore_tokens": size, "index": index, "k": k, "method": m,
                    "ms_per_token": 1000 * t / n_tok, "speedup": t_base / t,
                    "spec_accuracy": statistics.mean(r.stats.get("spec_accuracy", 1.0) for r in rs),
                    "mean_stride": statistics.mean(r.stats.get("mean_stride", 1.0) for r in rs),
                    "captured": (t_base - t) / (t_base - t_lm) if t_base > t_lm else float("nan"),
                    "searches": statistics.mean(r.stats.get("retrieval_calls", r.retrievals) for r in rs),
                    "retrieval_ms_per_token": 1000 * statistics.mean(r.retrieval_s for r in rs) / n_tok,
                    "lm_ms_per_token": 1000 * statistics.mean(r.lm_s for r in rs) / n_tok,
                    "identical": all(v.identical for v in verdicts),
                    "near_ties": sum(v.near_tie for v in verdicts), "mismatches": sum(not v.ok for v in verdicts),
                    "ceiling": t_base / t_lm,  # 1 / (1 - search share): every search hidden
                    "timeline_ms_per_token": timeline(rs, n_tok),
                })
                print(rows[-1], flush=True)
    return rows


def timeline(runs: list[RalmResult], n_tok: float) -> dict[str, float]:
    """Mean milliseconds per token on the critical path by phase (`SpeculationLoop.timeline`); the baseline's
    runs split into its LM and its searches."""
    if not any("timeline_s" in r.stats for r in runs):
        return {"key": 1000 * statistics.mean(r.lm_s for r in runs) / n_tok,
                "search": 1000 * statistics.mean(r.retrieval_s for r in runs) / n_tok}
    phases = sorted({p for r in runs for p in r.stats["timeline_s"]})
    out = {p: 1000 * statistics.mean(r.stats["timeline_s"].get(p, 0.0) for r in runs) / n_tok for p in phases}
    out["other"] = 1000 * statistics.mean(r.total_s - sum(r.stats["timeline_s"].values()) for r in runs) / n_tok
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profiles", nargs="+", default=["tiny", "default"], help="datastores, smallest first")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 16, 256, 1024])
    ap.add_argument("--indexes", nargs="+", default=["exact", "approx"])
    ap.add_argument("--ppl-passages", type=int, default=40)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--reps", type=int, default=1, help="rounds per prompt; a latency is its fastest round")
    ap.add_argument("--no-ppl", action="store_true", help="skip the perplexity run")
    ap.add_argument("--name", default="knnlm")
    args = ap.parse_args()
    rows: list[dict] = []
    lm: LmEngine | None = None
    sizes = {}
    ppl = None
    for profile in args.profiles:
        settings = GatewaySettings.from_env(profile=profile)
        lm = lm or open_lm(settings)
        ds = open_knn_datastore(settings)
        knn = open_knnlm(settings, lm, ds)
        warm(settings.layout.knn_datastore(settings.model))
        docs = DocStore(read_passages(settings.layout.passages))
        held = held_out(settings, docs)
        prompts = held_out_prompts(settings, args.prompts, docs)
        size = ds.size
        sizes[profile] = size
        knn.generate(prompts[0], KnnRequest(4))  # warm up
        rows += run_grid(knn, prompts, size, args.indexes, args.ks, args.max_new_tokens,
                         {m: METHODS[m] for m in args.methods}, args.reps)
        if profile == args.profiles[-1] and not args.no_ppl:
            ppl = perplexities(knn, ds, lm, docs, held, args.ppl_passages)
            print(ppl, flush=True)
        del knn, ds
    best = {}
    for r in rows:
        key = (r["datastore_tokens"], r["index"])
        if r["method"] != "baseline" and r["identical"]:
            best[key] = max(best.get(key, 0.0), r["speedup"])
    ceiling = {f"{r['datastore_tokens']} {r['index']}": r["ceiling"] for r in rows  # at the largest k
               if r["method"] == "baseline" and r["k"] == max(args.ks)}
    write(args.name, {"datastore_tokens": max(sizes.values()), "datastore_sizes": sizes, "prompts": args.prompts,
                      "reps": args.reps, "ceiling": ceiling,
                      "max_new_tokens": args.max_new_tokens, "rows": rows, "perplexity": ppl},
          ["datastore_tokens", "index", "k", "method", "ms_per_token", "speedup", "spec_accuracy", "mean_stride",
           "captured", "ceiling", "searches", "retrieval_ms_per_token", "lm_ms_per_token", "identical"],
          f"KNN-LM: baseline vs speculative retrieval ({args.prompts} prompts x {args.max_new_tokens} tokens, "
          f"fastest of {args.reps} rotated rounds)",
          "Best speedup per datastore and index: " + ", ".join(
              f"{s} tokens {i}: {v:.2f}x" for (s, i), v in sorted(best.items()))
          + (f"\n\nPerplexity on {ppl['passages']} held-out passages ({ppl['tokens']} tokens, largest datastore): "
             f"LM {ppl['lm']:.2f}; KNN-LM with kNN-LM's defaults (k=1024, λ=0.25, T=1) {ppl['knnlm']:.2f}; with "
             f"λ={ppl['tuned']['lam']}, T={ppl['tuned']['temperature']:g} (chosen on {ppl['passages']} other "
             f"held-out passages) {ppl['tuned']['knnlm']:.2f}" if ppl else ""))
    chart(rows, args.name)


def chart(rows: list[dict], name: str) -> None:
    def draw(ax, group: tuple[int, str]) -> None:
        size, index = group
        rs = [r for r in rows if (r["datastore_tokens"], r["index"]) == group]
        for m in dict.fromkeys(r["method"] for r in rs):
            pts = [(r["k"], r["speedup"]) for r in rs if r["method"] == m]
            ax.plot([str(k) for k, _ in pts], [s for _, s in pts], marker="o", label=m)
        ax.set_title(f"{index}, {size} entries: speedup vs k")
        ax.set_xlabel("k")
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.legend(fontsize=7)

    results_io.chart(name, list(dict.fromkeys((r["datastore_tokens"], r["index"]) for r in rows)), draw)


if __name__ == "__main__":
    main()
