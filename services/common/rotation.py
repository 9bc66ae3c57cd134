"""The order in which a comparison runs its methods: rotated per request and round, so that warm-up and drifts in
machine speed hit every method alike (the benchmarks and the demo)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

G = TypeVar("G")


def rotated(items: Sequence[G], i: int) -> list[G]:
    """`items` starting at position i mod len: request (or round) i runs the methods in this order."""
    k = i % len(items) if items else 0
    return [*items[k:], *items[:k]]
