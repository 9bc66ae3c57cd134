"""Repeated, rotated measurement rounds: every method on every prompt `reps` times, each round in an order rotated
by prompt and round (a drift in machine speed hits every method alike); a method's latency on a prompt is its
fastest round, since this VM's noise only ever adds time (steal, other tenants)."""

from __future__ import annotations

from collections.abc import Callable

from services.common.rotation import rotated
from services.gateway.ralm import RalmResult

Runs = dict[str, list[list[RalmResult]]]  # method -> per prompt -> per round


def measure(prompts: list[str], methods: dict[str, Callable[[str], RalmResult]], reps: int,
            units: list[list[str]] | None = None) -> Runs:
    """`units`: groups of methods that always run back to back, in their order (default: each method alone);
    the rotation moves whole units."""
    groups = units or [[m] for m in methods]
    runs: Runs = {m: [[] for _ in prompts] for g in groups for m in g}
    for i, p in enumerate(prompts):
        for r in range(reps):
            for g in rotated(groups, i + r):
                for m in g:
                    runs[m][i].append(methods[m](p))
    return runs


def fastest_run(rounds: list[RalmResult]) -> RalmResult:
    return min(rounds, key=lambda r: r.total_s)


def fastest(rounds: list[RalmResult]) -> float:
    return fastest_run(rounds).total_s
