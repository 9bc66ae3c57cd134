"""Prompt formats (one place, shared by the CLI, the benchmarks and the services)."""

from __future__ import annotations

from services.common.bounds import Bound
from services.common.errors import InvalidRequest

QUESTION_CHARS = Bound(1, 2000, unit=" characters")

# Two fixed shots (not from the evaluation set) teach the short-answer format and the newline stop.
QA_PREFIX = (
    "Answer each question with a short phrase taken from the passage.\n\n"
    "Question: What is the capital city of Australia?\nAnswer: Canberra\n\n"
    "Question: In which year did the Berlin Wall fall?\nAnswer: 1989\n\n"
)


def qa_prompt(question: str) -> str:
    q = question.strip() if isinstance(question, str) else ""
    if not q:
        raise InvalidRequest("the question is empty: ask something, e.g. 'Who wrote Hamlet?'")
    QUESTION_CHARS.check("question length", len(q))
    return f"{QA_PREFIX}Question: {q}\nAnswer:"
