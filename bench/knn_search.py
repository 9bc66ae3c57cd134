"""What one KNN-LM verification costs on this CPU: a batched exact search of s keys vs s single searches, with 1
and 2 threads, on the profile's real datastore (keys: held-out hidden states are not needed, datastore rows
perturbed by noise stand in for queries: same norms, same neighbourhoods).

    python -m bench.knn_search --profile default

Rows: threads, s, the certified search (`KnnDatastore.search`: FAISS candidates + float64 re-scoring) as one
batch of s and as s singles, and the raw FAISS flat search alone (float32 IndexFlatL2, and the same keys in an
fp16 scalar-quantizer index, which reads half the bytes). Medians of `--reps` timed runs after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import faiss
import numpy as np

from bench.results_io import write
from services.gateway.settings import GatewaySettings
from services.retriever.knn_index import KnnDatastore


def timed(fn: Callable[[], object], reps: int) -> float:
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def measure(search: Callable[[np.ndarray], object], queries: np.ndarray, reps: int) -> tuple[float, float]:
    """(ms for one batched call, ms for one call per query)."""
    batch = timed(lambda: search(queries), reps)
    singles = timed(lambda: [search(x[None]) for x in queries], reps)
    return 1000 * batch, 1000 * singles


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="default")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--name", default="knn_search")
    args = ap.parse_args()
    settings = GatewaySettings.from_env(profile=args.profile)
    ds = KnnDatastore.load(settings.layout.knn_datastore(settings.model), indexes=("exact",))
    rng = np.random.default_rng(0)
    rows = np.asarray(ds.gather(rng.choice(ds.size, max(args.sizes), replace=False)))
    queries = rows + rng.normal(0, 0.05 * float(np.abs(rows).mean()), rows.shape).astype(np.float32)
    flat = ds._indexes["exact"]  # noqa: SLF001 - the index the certified search runs on
    sq = faiss.IndexScalarQuantizer(ds.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
    for i in range(0, ds.size, 65_536):
        sq.add(np.asarray(ds.gather(np.arange(i, min(ds.size, i + 65_536)))))
    want = args.k + max(16, args.k // 4)
    searches: dict[str, Callable[[np.ndarray], object]] = {
        "certified": lambda x: ds.search(x, args.k), "faiss_flat": lambda x: flat.search(x, want),
        "faiss_fp16": lambda x: sq.search(x, want)}
    out = []
    for threads in args.threads:
        faiss.omp_set_num_threads(threads)
        for s in args.sizes:
            q = queries[:s]
            row: dict = {"threads": threads, "s": s}
            for name, search in searches.items():
                row[f"{name}_batch_ms"], row[f"{name}_singles_ms"] = measure(search, q, args.reps)
            row["batch_gain"] = row["certified_singles_ms"] / row["certified_batch_ms"]
            row["ms_per_key_batched"] = row["certified_batch_ms"] / s
            out.append(row)
            print(row, flush=True)
    write(args.name, {"profile": args.profile, "entries": ds.size, "dim": ds.dim, "k": args.k, "rows": out},
          ["threads", "s", "certified_batch_ms", "certified_singles_ms", "batch_gain", "ms_per_key_batched",
           "faiss_flat_batch_ms", "faiss_flat_singles_ms", "faiss_fp16_batch_ms", "faiss_fp16_singles_ms"],
          f"KNN-LM verification cost: s keys batched vs singles ({ds.size} entries x {ds.dim}, k = {args.k})",
          "`certified`: `KnnDatastore.search` (FAISS's top k + margin, re-scored in float64, certified exact); "
          "`faiss_*`: the FAISS call alone (float32 flat; fp16 scalar quantizer over the same fp16 keys). Medians "
          f"of {args.reps} runs after a warm-up. FAISS's BLAS threshold is `services.retriever.dense.BLAS_THRESHOLD`.")


if __name__ == "__main__":
    main()
