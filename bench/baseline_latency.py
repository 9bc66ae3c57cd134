"""Per-request latency of the baseline iterative RaLM, split into retrieval and LM time, per retriever.

    python -m bench.baseline_latency --profiles default large --questions 6

RaLMSpec's setting: 128 new tokens per request (no newline stop), stride 4, top-1 document.
"""

from __future__ import annotations

import argparse
import gc
import statistics

from bench.results_io import write
from services.gateway.inprocess import open_engine
from services.gateway.prompts import qa_prompt
from services.gateway.ralm import RalmConfig
from services.gateway.settings import GatewaySettings
from services.retriever.corpus import read_questions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profiles", nargs="+", default=["default", "large"])
    ap.add_argument("--questions", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    rows = []
    for profile in args.profiles:
        settings = GatewaySettings.from_env(profile=profile)
        engine = open_engine(settings)
        questions = read_questions(settings.layout.questions)
        sample = questions[7 :: max(1, len(questions) // args.questions)][: args.questions]
        engine.generate(qa_prompt(sample[0].question), RalmConfig(max_new_tokens=8), "exact")  # warm up
        for retriever in ("exact", "approx", "sparse"):
            for mode in ("paper", "kv-reuse"):
                cfg = RalmConfig(mode=mode, max_new_tokens=args.max_new_tokens, stop_at_newline=False)
                runs = [engine.generate(qa_prompt(q.question), cfg, retriever) for q in sample]
                row = {"retriever": retriever, "profile": profile, "mode": mode, "passages": len(engine.docs),
                       "retrieval_s": statistics.mean(r.retrieval_s for r in runs),
                       "lm_s": statistics.mean(r.lm_s for r in runs),
                       "total_s": statistics.mean(r.total_s for r in runs),
                       "retrievals": statistics.mean(r.retrievals for r in runs),
                       "ms_per_retrieval": 1e3 * sum(r.retrieval_s for r in runs) / sum(r.retrievals for r in runs),
                       "n": len(runs)}
                row["retrieval_share"] = row["retrieval_s"] / row["total_s"]
                rows.append(row)
                print(row, flush=True)
        del engine
        gc.collect()
    write("baseline_latency", {"rows": rows, "max_new_tokens": args.max_new_tokens},
          ["retriever", "profile", "mode", "passages", "retrieval_s", "lm_s", "total_s", "retrievals",
           "ms_per_retrieval", "retrieval_share", "n"],
          "Baseline iterative RaLM: per-request latency split (mean seconds per request)",
          "128 new tokens per request, stride 4 (32 retrievals), query = last 32 tokens, top-1 document. "
          "`paper` re-prefills document + context every stride; `kv-reuse` extends the KV cache while the "
          "document is unchanged.")


if __name__ == "__main__":
    main()
