"""Verification of a round of speculative retrieval: the first step whose guessed passage is not the true top-1.

Pure, shared by the in-process controller and the verifier service.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.retriever.types import Hit, top1


def first_mismatch(guesses: Sequence[int], hits: Sequence[Sequence[Hit]]) -> int | None:
    """Index of the first step whose guess differs from the true top-1, or None when all were right."""
    return next((j for j, (g, t) in enumerate(zip(guesses, top1(hits))) if g != t), None)
