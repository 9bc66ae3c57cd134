"""QA exact match / F1 of iterative RaLM on SQuAD v1.1 dev questions: no retrieval vs each retriever.

    python -m bench.qa_eval --profile default --questions 200
"""

from __future__ import annotations

import argparse
import time

from bench.results_io import write
from services.common.qa_metrics import exact_match, f1
from services.gateway.inprocess import open_engine
from services.gateway.prompts import qa_prompt
from services.gateway.ralm import RalmConfig
from services.gateway.settings import GatewaySettings
from services.retriever.corpus import read_questions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="default")
    ap.add_argument("--questions", type=int, default=200)
    args = ap.parse_args()
    settings = GatewaySettings.from_env(profile=args.profile)
    engine = open_engine(settings)
    questions = read_questions(settings.layout.questions)
    sample = questions[:: max(1, len(questions) // args.questions)][: args.questions]  # spread over articles
    rows = []
    for retriever in ("none", "exact", "approx", "sparse"):
        cfg = RalmConfig(mode="no-retrieval" if retriever == "none" else "kv-reuse")
        em = f = hit = 0.0
        t = time.perf_counter()
        for q in sample:
            r = engine.generate(qa_prompt(q.question), cfg, retriever)
            em += exact_match(r.text, q.answers)
            f += f1(r.text, q.answers)
            hit += bool(set(r.doc_ids[:1]) & set(q.passage_ids))
        n = len(sample)
        rows.append({"retriever": retriever, "em": em / n, "f1": f / n, "n": n,
                     "gold_passage_at_first_retrieval": None if retriever == "none" else hit / n,
                     "seconds": round(time.perf_counter() - t, 1)})
        print(rows[-1], flush=True)
    write("qa_eval", {"profile": args.profile, "passages": len(engine.docs), "model": settings.model,
                      "rows": rows},
          ["retriever", "em", "f1", "n", "gold_passage_at_first_retrieval", "seconds"],
          f"QA on SQuAD v1.1 dev ({args.profile} profile, {len(engine.docs)} passages, {settings.model})",
          "Iterative In-Context RaLM, stride 4, query = last 32 tokens, top-1 document (<= 256 tokens), "
          "greedy, answer ends at a newline. EM/F1 with the official SQuAD normalisation.")


if __name__ == "__main__":
    main()
