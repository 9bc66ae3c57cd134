"""Per-request latency of the baseline iterative RaLM, split into retrieval and LM time, per retriever.

    python -m bench.baseline_latency --profiles default large --questions 6

RaLMSpec's setting: 128 new tokens per request (no newline stop), stride 4, top-1 document.
"""

from __future__ import annotations

import argparse
import gc
import statistics

from bench.results_io import rotated, spread_text, write
from services.gateway.inprocess import open_engine
from services.gateway.prompts import qa_prompt
from services.gateway.ralm import RalmConfig, RalmResult
from services.gateway.settings import GatewaySettings
from services.retriever.corpus import read_questions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profiles", nargs="+", default=["default", "large"])
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    rows = []
    for profile in args.profiles:
        settings = GatewaySettings.from_env(profile=profile)
        engine = open_engine(settings)
        questions = read_questions(settings.layout.questions)
        sample = questions[7 :: max(1, len(questions) // args.questions)][: args.questions]
        prompts = [qa_prompt(q.question) for q in sample]
        cells = [(r, m) for r in ("exact", "approx", "sparse") for m in ("paper", "kv-reuse")]
        for r in ("exact", "approx", "sparse"):  # warm up every retriever (the first sparse search starts the JVM)
            engine.generate(prompts[0], RalmConfig(max_new_tokens=8), r)
        runs: dict[tuple[str, str], list[RalmResult]] = {c: [] for c in cells}
        for i, p in enumerate(prompts):  # cells in an order rotated per request: drift hits every cell alike
            for retriever, mode in rotated(cells, i):
                cfg = RalmConfig(mode=mode, max_new_tokens=args.max_new_tokens, stop_at_newline=False)
                runs[(retriever, mode)].append(engine.generate(p, cfg, retriever))
        for (retriever, mode), rs in runs.items():
            row = {"retriever": retriever, "profile": profile, "mode": mode, "passages": len(engine.docs),
                   "retrieval_s": statistics.mean(r.retrieval_s for r in rs),
                   "lm_s": statistics.mean(r.lm_s for r in rs),
                   "total_s": statistics.mean(r.total_s for r in rs),
                   "total": spread_text([r.total_s for r in rs]),
                   "retrievals": statistics.mean(r.retrievals for r in rs),
                   "ms_per_retrieval": 1e3 * sum(r.retrieval_s for r in rs) / sum(r.retrievals for r in rs),
                   "n": len(rs)}
            row["retrieval_share"] = row["retrieval_s"] / row["total_s"]
            row["share"] = spread_text([r.retrieval_s / r.total_s for r in rs], ".4f")
            rows.append(row)
            print(row, flush=True)
        del engine
        gc.collect()
    write("baseline_latency", {"rows": rows, "max_new_tokens": args.max_new_tokens},
          ["retriever", "profile", "mode", "passages", "retrieval_s", "lm_s", "total_s", "total", "retrievals",
           "ms_per_retrieval", "retrieval_share", "share", "n"],
          "Baseline iterative RaLM: per-request latency split (mean seconds per request)",
          f"{args.max_new_tokens} new tokens per request, stride 4 ({args.max_new_tokens // 4} retrievals), "
          "query = last 32 tokens, top-1 document. "
          "`paper` re-prefills document + context every stride; `kv-reuse` extends the KV cache while the "
          "document is unchanged. `total`, `share`: median [min, max] over the requests; the six (retriever, mode) "
          "cells run in an order rotated per request, after a warm-up of every retriever.")


if __name__ == "__main__":
    main()
