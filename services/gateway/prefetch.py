"""RaLMSpec's prefetch policy: which verified passages enter the speculation cache.

Without prefetch only the true top-1 of each verified query is cached; with it, the top-k of every
verified query and of the first retrieval (the paper: k = 20; 256 was worse: a larger cache makes more
plausible-but-wrong guesses and costs more to score).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.retriever.types import Hit


@dataclass(frozen=True)
class PrefetchPolicy:
    enabled: bool = False
    k: int = 20

    @property
    def depth(self) -> int:
        """How many hits per verified query the verification must return."""
        return self.k if self.enabled else 1

    def passages(self, hits: Iterable[Sequence[Hit]]) -> list[int]:
        return [h.pid for row in hits for h in row[: self.depth]]
