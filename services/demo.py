"""`make demo`: answer a few real SQuAD questions with every retriever, in process, and show the time split.

(The service pipeline issue turns this into `ralmspec up` + a gRPC client.)
"""

from __future__ import annotations

import os

from services.common.layout import Layout
from services.gateway.inprocess import open_engine
from services.gateway.prompts import qa_prompt
from services.gateway.ralm import RalmConfig
from services.gateway.settings import GatewaySettings
from services.retriever.corpus import read_questions

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUESTIONS = 4


def main() -> None:
    settings = GatewaySettings.from_env()
    engine = open_engine(settings)
    questions = read_questions(Layout.for_profile(settings.profile, settings.data).questions)
    print(f"profile {settings.profile}: {len(engine.docs)} passages, model {settings.model}\n")
    for q in questions[:: len(questions) // QUESTIONS][:QUESTIONS]:
        print(f"Q: {q.question}   (gold: {' | '.join(q.answers)})")
        for retriever in ("none", "exact", "approx", "sparse"):
            mode = "no-retrieval" if retriever == "none" else "kv-reuse"
            r = engine.generate(qa_prompt(q.question), RalmConfig(mode=mode), retriever)
            titles = ", ".join(f"[{p}] {engine.docs.get(p).title or '(untitled)'}"
                               for p in dict.fromkeys(r.doc_ids))
            print(f"  {retriever:<7} {r.text!r:<40} retrieval {r.retrieval_s * 1e3:5.0f} ms  "
                  f"LM {r.lm_s * 1e3:5.0f} ms  {titles}")
        print()


if __name__ == "__main__":
    main()
