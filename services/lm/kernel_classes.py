"""Which GEMM row counts share a summation order on this machine, probed once per process, and the row grouping
a ragged forward uses so that a row's numbers never depend on its batch-mates.

A CPU GEMM picks its kernel, hence the order in which it sums over K, by the row count M (and the thread count,
the dtype, the instruction set). Rows computed by calls whose M fall in one *class* are bit-identical; across
classes they differ in the last bits. The classes are not portable: with one thread, an AVX-512 Xeon gave
M = 1 (GEMV), 2-15 and >= 16; an AVX2 EPYC gives M = 1, 2-3 and >= 4 (checked to 1024). So they are measured
here, on the model's own linear shapes, instead of written down.

Probe: for each distinct (in, out) shape, one row repeated M times for every M in `PROBE_ROWS`; M and M' share a
class when every shape gives the same bits at every position (a call whose rows differ among themselves is
position-dependent and joins no class). The *open class* is the run of probed M that share one class up to the
largest probed M; its least member is `RowPlan.wide`.

Plan: when the open class starts at `ONE_CALL_MAX` rows or fewer, every row of a tick goes into one call padded
to `wide` rows (one weight pass per tick; a lone decode pays for `wide` - 1 zero rows). Otherwise single-token
rows (decodes) go in blocks of the finite class that holds M = 2 and the rest in one call padded to `wide`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Every M up to DENSE (where the small classes live), then samples up to a tick's token budget and beyond.
DENSE = 32
PROBE_ROWS: tuple[int, ...] = (*range(1, DENSE + 1), 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
HEAD_PROBE_ROWS: tuple[int, ...] = (*range(1, DENSE + 1), 48, 64)  # the LM head sees kept rows only (feeds, trees)
ONE_CALL_MAX = 4  # pad a lone decode to at most this many rows for a one-call plan


@dataclass(frozen=True)
class RowPlan:
    """How a ragged forward's linear layers group rows. `narrow` = (lo, hi): decode rows in blocks of hi rows,
    the last padded to lo; None: every row in one call. `wide`: rows of the other call are padded to this."""

    narrow: tuple[int, int] | None
    wide: int
    classes: tuple[tuple[int, int], ...] = ()  # probed runs of M sharing a class (for logs and docs)

    def describe(self) -> str:
        runs = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in self.classes)
        how = (f"one call padded to >= {self.wide} rows" if self.narrow is None else
               f"decodes in blocks of {self.narrow[0]}-{self.narrow[1]}, the rest padded to >= {self.wide}")
        return f"GEMM row classes {runs}; {how}"


class NotInvariant(RuntimeError):
    """The probe found no row grouping that keeps every row in one class on this machine."""


def _signatures(weight: torch.Tensor, rows: Iterable[int]) -> dict[int, torch.Tensor | None]:
    """For each M: the output row of one input row repeated M times (None if the M rows differ)."""
    gen = torch.Generator().manual_seed(0)
    ms = sorted(rows)
    x = torch.randn(1, weight.shape[1], generator=gen).to(weight.device, weight.dtype).expand(ms[-1], -1).contiguous()
    out: dict[int, torch.Tensor | None] = {}
    for m in ms:
        y = F.linear(x[:m], weight)
        out[m] = y[0].clone() if bool((y == y[0]).all()) else None
    return out


def probe(weights: Iterable[torch.Tensor], head_out: int | None = None) -> list[tuple[int, ...]]:
    """Classes of M (sorted tuples of probed M) that give the same bits for every weight shape. `head_out`: the
    output size of the LM head, probed over `HEAD_PROBE_ROWS` only."""
    by_shape: dict[tuple[int, int], torch.Tensor] = {}
    for w in weights:
        by_shape.setdefault((w.shape[0], w.shape[1]), w)
    sigs = {shape: _signatures(w, HEAD_PROBE_ROWS if shape[0] == head_out else PROBE_ROWS)
            for shape, w in by_shape.items()}
    classes: list[list[int]] = []
    reps: list[int] = []
    for m in PROBE_ROWS:
        if any(s.get(m, 0) is None for s in sigs.values()):
            continue  # position-dependent in some shape
        for cls, r in zip(classes, reps):
            if all(m not in s or r not in s or torch.equal(s[m], s[r]) for s in sigs.values()):  # type: ignore[arg-type]
                cls.append(m)
                break
        else:
            classes.append([m])
            reps.append(m)
    return [tuple(c) for c in classes]


def plan(classes: list[tuple[int, ...]]) -> RowPlan:
    """The row grouping for these probed classes (see the module's docstring)."""
    of = {m: i for i, c in enumerate(classes) for m in c}
    top = PROBE_ROWS[-1]
    if top not in of:
        raise NotInvariant(f"M = {top} rows are position-dependent")
    wide = top
    for m in reversed(PROBE_ROWS):  # the open class: the run of probed M in the top's class
        if of.get(m) != of[top]:
            break
        wide = m
    if wide > DENSE:
        raise NotInvariant(f"the top class starts at M = {wide}, past the densely probed rows (<= {DENSE})")
    runs = _runs(of)
    if wide <= ONE_CALL_MAX:
        return RowPlan(None, wide, runs)
    if of.get(2) is None or of.get(2) == of[top]:
        raise NotInvariant(f"no finite class holds M = 2 (open class from M = {wide})")
    hi = 2
    while hi + 1 < wide and of.get(hi + 1) == of[2]:
        hi += 1
    return RowPlan((2, hi), wide, runs)


def _runs(of: dict[int, int]) -> tuple[tuple[int, int], ...]:
    runs: list[list[int]] = []
    for m in PROBE_ROWS:
        if m in of and runs and of.get(runs[-1][1]) == of[m]:
            runs[-1][1] = m
        elif m in of:
            runs.append([m, m])
    return tuple((a, b) for a, b in runs)


_PLANS: dict[tuple[object, ...], RowPlan | None] = {}


def row_plan(model: torch.nn.Module) -> RowPlan | None:
    """The plan for `model`'s linear layers under the current thread count, probed once per process and key; None
    (with a warning) where no grouping is invariant: rows then take the BLAS library's own kernels."""
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    head_out = int(head.weight.shape[0]) if isinstance(head, torch.nn.Linear) else None
    shapes = tuple(sorted({(tuple(w.shape), w.dtype, w.device.type) for w in linears}, key=str))
    key = (shapes, head_out, torch.get_num_threads())
    if key not in _PLANS:
        try:
            with torch.inference_mode():
                found = plan(probe(linears, head_out))
            _PLANS[key] = found
            log.info("batch invariance, %d thread(s): %s", torch.get_num_threads(), found.describe())
        except NotInvariant as e:
            _PLANS[key] = None
            log.warning("batch invariance is not available on this machine (%s): a request's tokens may differ "
                        "in float noise with its batch-mates", e)
    return _PLANS[key]
