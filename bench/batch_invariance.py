"""What batch invariance costs on this CPU: one ragged forward of the real LM through the probed row plan
(`services/lm/kernel_classes.py`) against the BLAS library's own kernel choice (`RALMSPEC_BATCH_INVARIANT=0`).

    python -m bench.batch_invariance --profile tiny

Cells: B concurrent decodes (one token each, 320-token contexts), a 128-token prefill chunk alone, and the chunk
with 8 decodes in one tick. One intra-op thread (as the LM replica runs). Medians of `--reps` timed forwards
per cell, the two modes alternating within each repetition (rotated order); each row also checks that the
invariant mode gives a decode the same logits alone and in the batch (`alone_equal`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.results_io import rotated, spread, write
from services.gateway.settings import GatewaySettings
from services.lm.kernel_classes import row_plan
from services.lm.model import LoadedLM, load
from services.lm.ragged import Feed, KvStore, forward

CONTEXT = 320


def filled_store(lm: LoadedLM, n: int, seed: int) -> KvStore:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 40_000, (n,), generator=g).tolist()
    store = KvStore(lm.model.config.num_hidden_layers)  # type: ignore[union-attr]
    forward(lm, [Feed(store, ids, torch.arange(n))])
    return store


def feeds(stores: list[KvStore], chunk: KvStore | None) -> list[Feed]:
    out = [Feed(s, [1234], torch.tensor([s.length])) for s in stores]
    if chunk is not None:
        out.append(Feed(chunk, list(range(200, 328)), torch.arange(chunk.length, chunk.length + 128)))
    return out


def timed_forward(lm: LoadedLM, stores: list[KvStore], chunk: KvStore | None) -> tuple[float, torch.Tensor | None]:
    marks = [s.length for s in stores] + ([chunk.length] if chunk else [])
    t = time.perf_counter()
    out = forward(lm, feeds(stores, chunk))
    dt = time.perf_counter() - t
    for s, n in zip([*stores, *([chunk] if chunk else [])], marks):
        s.crop(n)  # every repetition sees the same contexts
    return dt, (out[0].logits if stores else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batches", default="1,2,4,8,16")
    args = ap.parse_args()
    torch.set_num_threads(1)
    settings = GatewaySettings.from_env(profile=args.profile)
    lm = load(settings.model, settings.layout.models)
    rp = row_plan(lm.model)
    if rp is None:
        raise SystemExit("no batch-invariant row grouping on this machine (see the log)")
    stores = [filled_store(lm, CONTEXT, i) for i in range(16)]
    chunk_ctx = filled_store(lm, 64, 99)
    cells = [(f"decode B={b}", stores[:b], None) for b in map(int, args.batches.split(","))]
    cells += [("prefill 128", [], chunk_ctx), ("prefill 128 + 8 decodes", stores[:8], chunk_ctx)]
    rows = []
    for name, ss, ch in cells:
        times: dict[str, list[float]] = {"invariant": [], "plain": []}
        alone = None
        if ss:
            lm.batch_invariant = True
            alone = timed_forward(lm, ss[:1], None)[1]
        same = True
        for rep in range(args.reps + 1):
            for mode in rotated(["invariant", "plain"], rep):
                lm.batch_invariant = mode == "invariant"
                dt, logits = timed_forward(lm, ss, ch)
                if rep:
                    times[mode].append(dt * 1e3)
                if mode == "invariant" and alone is not None:
                    same &= bool(torch.equal(alone, logits))
        inv, plain = statistics.median(times["invariant"]), statistics.median(times["plain"])
        rows.append({"cell": name, "invariant_ms": inv, "plain_ms": plain, "cost": inv / plain,
                     "invariant_spread": spread(times["invariant"]), "plain_spread": spread(times["plain"]),
                     "alone_equal": same if ss else None})
        print(f"{name:26s} invariant {inv:7.1f} ms  plain {plain:7.1f} ms  x{inv / plain:.2f}  equal {same}",
              flush=True)
    lm.batch_invariant = True
    write("batch_invariance", {"rows": rows, "plan": rp.describe(), "context": CONTEXT},
          ["cell", "invariant_ms", "plain_ms", "cost", "alone_equal"],
          "Batch invariance: one ragged forward, probed row plan vs the BLAS's own kernels",
          f"Row plan on this machine: {rp.describe()}. One intra-op thread, median of {args.reps}.")


if __name__ == "__main__":
    main()
