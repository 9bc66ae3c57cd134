"""QA exact match / F1 of iterative RaLM on SQuAD v1.1 dev questions: no retrieval vs each retriever.

    python -m bench.qa_eval --profile default --questions 200

The first query of a request is the question (queries never reach back past the prompt's last blank line,
`RalmEngine.query_floor`); the previous results file's rows are kept under "before" when it was made with
another rule or revision, so the two can be compared. With `--retrievers` naming only some retrievers, the others'
rows are carried over from the previous file when it used the same model and first-query rule (each row keeps
the revision it was measured at). `cpu_seconds` is the process's CPU time for the questions (torch, FAISS and the
JVM included): a model's cost even when other work shares the machine, which wall `seconds` is not.
"""

from __future__ import annotations

import argparse
import json
import time

from bench.results_io import RESULTS, provenance, write
from services.common.qa_metrics import exact_match, f1
from services.gateway.inprocess import open_engine
from services.gateway.prompts import qa_prompt
from services.gateway.ralm import RalmConfig
from services.gateway.settings import GatewaySettings
from services.retriever.corpus import read_questions

FIRST_QUERY = "the question"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="default")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--retrievers", nargs="+", default=["none", "exact", "approx", "sparse"])
    ap.add_argument("--name", default="qa_eval")
    args = ap.parse_args()
    old = RESULTS / f"{args.name}.json"
    before = json.loads(old.read_text()) if old.exists() else None
    settings = GatewaySettings.from_env(profile=args.profile)
    same_rule = before is not None and (before.get("model"), before.get("first_query")) == (settings.model, FIRST_QUERY)
    carried = [{"cpu_seconds": None, "revision": before["git_revision"], **r}
               for r in before["rows"] if r["retriever"] not in args.retrievers] if same_rule else []
    engine = open_engine(settings)
    questions = read_questions(settings.layout.questions)
    sample = questions[:: max(1, len(questions) // args.questions)][: args.questions]  # spread over articles
    rows = []
    for retriever in args.retrievers:
        cfg = RalmConfig(mode="no-retrieval" if retriever == "none" else "kv-reuse")
        em = f = hit = 0.0
        t, c = time.perf_counter(), time.process_time()
        for q in sample:
            r = engine.generate(qa_prompt(q.question), cfg, retriever)
            em += exact_match(r.text, q.answers)
            f += f1(r.text, q.answers)
            hit += bool(set(r.doc_ids[:1]) & set(q.passage_ids))
        n = len(sample)
        rows.append({"retriever": retriever, "em": em / n, "f1": f / n, "n": n,
                     "gold_at_first": None if retriever == "none" else hit / n,
                     "seconds": round(time.perf_counter() - t, 1),
                     "cpu_seconds": round(time.process_time() - c, 1), "revision": provenance()["git_revision"]})
        print(rows[-1], flush=True)
    order = {r: i for i, r in enumerate(["none", "exact", "approx", "sparse"])}
    rows = sorted(rows + carried, key=lambda r: order.get(r["retriever"], len(order)))
    if same_rule:  # the previous file's rows live on in `rows` (or were remeasured): keep its own history
        before = before.get("before")
    if before is not None:  # one level of history: the run this one replaces
        before.pop("before", None)
    write(args.name, {"profile": args.profile, "passages": len(engine.docs), "model": settings.model,
                      "first_query": FIRST_QUERY, "rows": rows, "before": before},
          ["retriever", "em", "f1", "n", "gold_at_first", "seconds", "cpu_seconds", "revision"],
          f"QA on SQuAD v1.1 dev ({args.profile} profile, {len(engine.docs)} passages, {settings.model})",
          "Iterative In-Context RaLM, stride 4, query = last 32 tokens but never above the prompt's last blank line "
          "(the first query is the question), top-1 document (<= 256 tokens), greedy, answer ends at a newline. "
          "EM/F1 with the official SQuAD normalisation. `gold_at_first`: the first retrieval found a gold passage."
          + ("\n\nBefore (queries reached into the few-shot shots): " + ", ".join(
              f"{r['retriever']} EM {r['em']:.3f} F1 {r['f1']:.3f} gold@first "
              f"{r.get('gold_at_first', r.get('gold_passage_at_first_retrieval'))}" for r in before["rows"])
             + f" ({before.get('git_revision', '?')})" if before else ""))


if __name__ == "__main__":
    main()
