"""Verification of a round of speculative retrieval: the first step whose guessed passage is not the true top-1.

Pure, shared by the in-process controller and the verifier service.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.retriever.types import Hit

NO_DOC = -1  # a query the retriever found nothing for (BM25 with only stop words)


def top1(hits: Sequence[Sequence[Hit]]) -> list[int]:
    return [row[0].pid if row else NO_DOC for row in hits]


def first_mismatch(guesses: Sequence[int], hits: Sequence[Sequence[Hit]]) -> int | None:
    """Index of the first step whose guess differs from the true top-1, or None when all were right."""
    return next((j for j, (g, t) in enumerate(zip(guesses, top1(hits))) if g != t), None)
