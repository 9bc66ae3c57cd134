"""KNN-LM's datastore: one entry per corpus token, key = the LM's final hidden state (the final-norm output the
LM head reads) after a passage's tokens 0..j, value = token j+1 of that passage.

Folder (`Layout.knn_datastore(model)`), written by `build`:
    keys.npy     float16 [N, d]  memory-mapped at load
    values.npy   int32 [N]       the token that followed the context of keys[i]
    text.npy     int32 [N]       passage id of entry i; a passage's entries are contiguous and in order, so entry
                                 i+1 continues entry i iff text[i+1] == text[i]
    ivf.index    FAISS IndexIVFFlat over the keys (the approximate index), memory-mapped at load
    meta.json    written last, atomically: it exists iff the build is complete
    progress.json  while building: batches done, so a rerun resumes (removed once meta.json is written)

Exactness. The fp16 keys are the datastore: the exact index (IndexFlatL2 over their float32 upcast, filled at
load, no float32 copy on disk), the IVF index, `gather` and the speculation cache all hold the same fp16-rounded
values, so the baseline and every speculative path see identical keys. fp16 only moves the KNN distribution
relative to float32 keys (measured on SmolLM2-135M, tiny profile: max per-key relative L2 error 3.8e-4,
`meta.json` fp16_max_rel_error); it never makes two paths disagree. Exact ties are common: every passage of
one article starts with the same title line, so their first keys are equal (tiny: 2000 of 40k entries share
their key, up to 101 at once); ties rank by entry id everywhere.

Distances. FAISS's float32 distances depend on its kernel (faiss 1.15): while nq·d < `faiss.cvar.
distance_compute_blas_threshold` (128000 by default: up to 222 queries of 576 dims) each distance is a sequential
float32 sum of squared differences and a batch gives bit-identical distances to each query alone; past it
(`services.retriever.dense.BLAS_THRESHOLD`, set at load: 7+ queries of 576 dims, where one product beats
separate scans), they come from |x|² + |y|² - 2x·y with sgemm, differ from the sequential ones in the last
bits (up to 3e-3 here), and a batch may or may not equal its queries alone (tiny profile, 8 queries: 25% of
distances and 12% of top-32 ids differed). See tests/datastore/test_knn_datastore.py::test_faiss_batch_vs_single.
So `search` never returns FAISS's numbers: it takes FAISS's top k + margin as candidates and re-scores them
with `exact_distances` (float64 sums of squared differences of the stored rows, one row at a time, independent
of what else is scored), ranked by (distance, entry id). The exact index's answer is certified: with FAISS's
float32 error bound e = γ(d+4)·(|q| + max|key|)², every entry FAISS left out is at least (its last distance - e)
away; when the k-th re-scored distance is not below that, the search is repeated with a 4x wider margin. So the
exact top-k is the true (float64) top-k with ties by id, identical for a query alone or in any batch, and equal
bit for bit to what `KnnCache.lookup` returns when those entries are cached. The IVF answer is re-scored the same
way but is approximate (its candidate set depends on the probed lists). Cost (tiny, 40k entries, one thread,
k = 1024): exact 5.4 ms for 1 query (FAISS 3.5 + re-scoring; 17 ms when a BLAS product is forced for one
query), 42 ms for 8; IVF (nprobe 32) 3.2 / 18 ms.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from services.common.errors import InvalidRequest, Unavailable

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEXES = ("exact", "approx")
REBUILD = "rebuild with `ralmspec assets` (services.datastore.knn_datastore.build)"
NOT_BUILT = "this replica has no KNN-LM datastore (build it with `ralmspec assets`)"
IVF_TRAIN_MAX = 100_000  # keys sampled to train the IVF centroids
ADD_CHUNK = 65_536  # keys upcast to float32 at a time when filling an index (bounds peak RAM)
SCORE_CHUNK = 64  # rows per float64 block in exact_distances
U32 = 2.0**-24  # float32 unit roundoff


def exact_distances(rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """float64 squared L2 distances [m] of float16|float32 rows [m, d] to one query [d]: the scoring function
    of every KNN path. Each difference is exact in float64 and numpy sums each contiguous row the same way
    whatever the number of rows, so an entry's distance never depends on which others are scored (float16 and
    float32 copies of a key score the same). Chunked so the float64 temporaries stay in cache."""
    q = np.asarray(query, dtype=np.float64).ravel()
    out = np.empty(len(rows), dtype=np.float64)
    for i in range(0, len(rows), SCORE_CHUNK):
        diff = np.asarray(rows[i : i + SCORE_CHUNK], dtype=np.float64)  # [c, d]
        diff -= q
        diff *= diff
        out[i : i + SCORE_CHUNK] = diff.sum(axis=1)
    return out


def rank(dists: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k best (distance ascending, then entry id) among candidates."""
    return np.lexsort((ids, dists))[:k]


@dataclass(frozen=True)
class Neighbours:
    """One query's nearest datastore entries, as KNN-LM consumes them (search, cache lookup and the wire)."""

    dists: np.ndarray  # [m] float32 squared L2 distances, ascending (ties by entry id)
    ids: np.ndarray  # [m] int64 entry ids (-1: padding, fewer than k entries)
    tokens: np.ndarray  # [m] int64 the token that followed each entry's context (its value; -1 for padding)


class KnnDatastore:
    def __init__(self, keys: np.ndarray, values: np.ndarray, text: np.ndarray, meta: dict) -> None:
        self.keys = keys  # [N, d] float16, memory-mapped
        self._rows = np.asarray(keys)  # a plain ndarray view of the same mapping: cheaper fancy indexing
        self.values = values  # [N] int32
        self.text = text  # [N] int32
        self.meta = meta
        starts = np.flatnonzero(np.diff(text)) + 1 if len(text) else np.zeros(0, np.int64)
        self._run_starts = np.concatenate([[0], starts]).astype(np.int64)  # [runs] first entry of each passage
        self._run_ends = np.concatenate([starts, [len(text)]]).astype(np.int64)  # [runs] one past its last
        self._max_norm = float(meta["max_key_norm"])
        self._indexes: dict[str, faiss.Index] = {}
        self.retries = 0  # exact searches repeated with a wider margin (certificate failed), for stats

    @property
    def dim(self) -> int:
        return int(self.keys.shape[1])

    @property
    def size(self) -> int:
        return int(self.keys.shape[0])

    @classmethod
    def load(cls, folder: Path, indexes: Sequence[str] = INDEXES, nprobe: int = 32) -> KnnDatastore:
        meta = read_meta(folder)
        keys = np.load(folder / "keys.npy", mmap_mode="r")
        values = np.load(folder / "values.npy", mmap_mode="r")
        text = np.load(folder / "text.npy", mmap_mode="r")
        n, d = meta["entries"], meta["dim"]
        if keys.shape != (n, d) or keys.dtype != np.float16 or values.shape != (n,) or text.shape != (n,):
            raise Unavailable(f"{folder} does not match its meta.json (truncated or mixed builds): {REBUILD}")
        store = cls(keys, values, text, meta)
        store._open(indexes, folder / "ivf.index", nprobe)
        return store

    @classmethod
    def from_arrays(cls, keys: np.ndarray, values: np.ndarray, text: np.ndarray,
                    indexes: Sequence[str] = ("exact",), nprobe: int = 32) -> KnnDatastore:
        """An in-memory datastore over given entries (tests, experiments); keys are rounded to float16 and each
        text's entries must be contiguous."""
        k16 = np.ascontiguousarray(keys, dtype=np.float16)
        meta = {"version": FORMAT_VERSION, "entries": len(k16), "dim": k16.shape[1], "max_key_norm": _max_norm(k16)}
        store = cls(k16, np.asarray(values, dtype=np.int32), np.asarray(text, dtype=np.int32), meta)
        store._open(indexes, None, nprobe)
        return store

    def _open(self, indexes: Sequence[str], ivf_path: Path | None, nprobe: int) -> None:
        from services.retriever.dense import BLAS_THRESHOLD

        faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD  # the process-wide policy, whoever loads first
        for name in indexes:
            if name not in INDEXES:
                raise InvalidRequest(f"unknown KNN index {name!r}; choose from {INDEXES}")
        if "exact" in indexes:
            self._indexes["exact"] = flat_index(self.keys)
        if "approx" in indexes:
            ivf: Any
            if ivf_path is None:
                ivf, _ = ivf_index(self.keys)
            else:
                ivf = faiss.read_index(str(ivf_path), faiss.IO_FLAG_MMAP)  # inverted lists stay on disk
            ivf.nprobe = nprobe
            self._indexes["approx"] = ivf

    def search(self, queries: np.ndarray, k: int, index: str = "exact") -> tuple[np.ndarray, np.ndarray]:
        """queries [q, d] float32 -> (squared L2 distances [q, k] float32 ascending, entry ids [q, k] int64;
        -1 ids with +inf distances pad when fewer). Distances are `exact_distances`, ties by entry id."""
        if index not in self._indexes:
            raise InvalidRequest(f"KNN index {index!r} is not loaded (loaded: {sorted(self._indexes)})")
        if k <= 0:
            raise InvalidRequest(f"k must be a positive number of neighbours, got {k}")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InvalidRequest(f"queries must be [n, {self.dim}], got {list(q.shape)}")
        out_d = np.full((len(q), k), np.inf, dtype=np.float32)
        out_i = np.full((len(q), k), -1, dtype=np.int64)
        exact = index == "exact"
        todo = np.arange(len(q))
        want = min(self.size, k + max(16, k // 4))  # FAISS candidates re-scored per query
        while len(todo) and self.size:
            fd, fi = self._indexes[index].search(q[todo], want)  # [t, want] each
            retry = []
            for row, f_last, cand in zip(todo, fd[:, -1], fi):
                cand = cand[cand >= 0]
                dist = exact_distances(self._rows[cand], q[row])
                best = rank(dist, cand, k)
                if exact and want < self.size and not self._certified(dist[best[-1]], float(f_last), q[row]):
                    retry.append(row)
                    continue
                out_d[row, : len(best)] = dist[best]
                out_i[row, : len(best)] = cand[best]
            self.retries += len(retry)
            todo, want = np.array(retry, dtype=np.int64), min(self.size, want * 4)
        return out_d, out_i

    def neighbours(self, queries: np.ndarray, k: int, index: str = "exact") -> list[Neighbours]:
        """`search`, one `Neighbours` per query row, with each entry's token."""
        dists, ids = self.search(queries, k, index)
        return [self.with_tokens(d, i) for d, i in zip(dists, ids)]

    def with_tokens(self, dists: np.ndarray, ids: np.ndarray) -> Neighbours:
        return Neighbours(dists, ids, np.where(ids >= 0, self.values[np.maximum(ids, 0)], -1).astype(np.int64))

    def _certified(self, kth: float, faiss_last: float, query: np.ndarray) -> bool:
        """True when no entry FAISS left out can beat the k-th re-scored distance. FAISS's float32 distance (either
        kernel) is within γ(d+4)·(|q| + max|key|)² of the true one; kth is exact to ~1e-13 relative."""
        g = (self.dim + 4) * U32
        err = g / (1 - g) * (float(np.linalg.norm(query.astype(np.float64))) + self._max_norm) ** 2
        return kth * (1 + 1e-12) < faiss_last - err

    def successors(self, ids: np.ndarray, n: int) -> np.ndarray:
        """int64 unique entry ids i+1..i+n following each id in ids (any shape, -1 ignored) within the same
        text, ascending."""
        flat = np.asarray(ids, dtype=np.int64).ravel()
        flat = flat[flat >= 0]
        if n <= 0 or not len(flat):
            return np.zeros(0, np.int64)
        self._check_ids(flat)
        end = self._run_ends[np.searchsorted(self._run_starts, flat, side="right") - 1]  # [m]
        nxt = flat[:, None] + np.arange(1, n + 1)  # [m, n]
        return np.unique(nxt[nxt < end[:, None]])

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """keys of entries as float32 [len(ids), d] (the exact values the exact index holds)."""
        idx = np.asarray(ids, dtype=np.int64)
        self._check_ids(idx)
        return np.asarray(self._rows[idx], dtype=np.float32)

    def _check_ids(self, ids: np.ndarray) -> None:
        if len(ids) and (ids.min() < 0 or ids.max() >= self.size):
            raise InvalidRequest(f"entry ids must be in [0, {self.size})")


def flat_index(keys: np.ndarray) -> faiss.IndexFlatL2:
    """IndexFlatL2 over the float32 upcast of fp16 keys, filled in place chunk by chunk (peak RAM: the index
    plus one chunk; `add` would reallocate and copy)."""
    n, d = keys.shape
    index = faiss.IndexFlatL2(d)
    index.codes.resize(n * d * 4)
    if n:
        rows = faiss.rev_swig_ptr(index.codes.data(), n * d * 4).view(np.float32).reshape(n, d)
        for i in range(0, n, ADD_CHUNK):
            rows[i : i + ADD_CHUNK] = keys[i : i + ADD_CHUNK]
    index.ntotal = n
    return index


def read_meta(folder: Path) -> dict:
    path = folder / "meta.json"
    if not path.exists():
        raise Unavailable(f"KNN datastore {folder} is missing or incomplete (no meta.json): {REBUILD}")
    meta: dict = json.loads(path.read_text())
    if meta.get("version") != FORMAT_VERSION:
        raise Unavailable(f"{folder} has format version {meta.get('version')}, this code reads "
                          f"{FORMAT_VERSION}: {REBUILD}")
    return meta


# --- build ---------------------------------------------------------------------------------------------------


def _unpack(lm: Any) -> tuple[torch.nn.Module, Any, str]:
    """A LoadedLM or a (model, tokenizer) pair -> (model, tokenizer, model key)."""
    if isinstance(lm, tuple):
        model, tok = lm
        return model, tok, str(getattr(model.config, "name_or_path", "") or type(model).__name__)
    return lm.model, lm.tokenizer, lm.key


def _tokenize(tok: Any, texts: Iterable[str], max_len: int, max_tokens: int | None) -> list[np.ndarray]:
    """Token ids of each passage (as the decoder tokenizes a prompt: no special tokens), cut to max_len; stops
    once max_tokens entries are reached, cutting the last passage so the entries are exactly max_tokens."""
    out: list[np.ndarray] = []
    entries = 0
    for text in texts:
        if max_tokens is not None and entries >= max_tokens:
            break
        ids = np.asarray(tok(text, add_special_tokens=False).input_ids[:max_len], dtype=np.int32)
        if max_tokens is not None:
            ids = ids[: max_tokens - entries + 1]
        out.append(ids)
        entries += max(len(ids) - 1, 0)
    return out


def _batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Passages with entries, longest first (ties by id), packed into batches of <= batch_tokens padded tokens
    (a passage longer than batch_tokens goes alone)."""
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    order = order[lengths[order] >= 2]
    out, start = [], 0
    while start < len(order):
        rows = max(1, batch_tokens // int(lengths[order[start]]))  # the first passage is the batch's longest
        out.append(order[start : start + rows])
        start += rows
    return out


@torch.inference_mode()
def _hidden_states(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T, d]: the final-norm output (what the LM head reads), without computing logits. Right
    padding needs no attention mask: with causal attention real tokens never attend to the pads after them."""
    base: Any = model.base_model
    return base(input_ids=input_ids, use_cache=False).last_hidden_state  # type: ignore[no-any-return]


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.stem + ".part.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def build(lm: Any, texts: Iterable[str] | Sequence[str], folder: Path, *, max_tokens: int | None = None,
          batch_tokens: int = 4096, max_len: int = 512, progress: bool = True) -> dict:
    """Build (or resume, or find complete) the datastore in `folder` with `lm` (a LoadedLM or a (model,
    tokenizer) pair); returns stats: entries, passages, seconds (all runs), bytes, tokens_per_s (entries per
    forward second)."""
    t0 = time.perf_counter()
    model, tok, key = _unpack(lm)
    param = next(model.parameters())
    cfg: Any = model.config
    dim = int(cfg.hidden_size)
    folder.mkdir(parents=True, exist_ok=True)
    # 1) tokenize and lay out: passage p's entries are rows offsets[p]..offsets[p+1]-1, in passage order
    passages = _tokenize(tok, texts, max_len, max_tokens)
    lengths = np.array([len(p) for p in passages], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(np.maximum(lengths - 1, 0))]).astype(np.int64)
    n = int(offsets[-1])
    if n == 0:
        raise InvalidRequest("no passage has two tokens: the KNN datastore would be empty")
    values = np.concatenate([p[1:] for p in passages]).astype(np.int32)
    text = np.repeat(np.arange(len(passages), dtype=np.int32), np.diff(offsets))
    config = {"version": FORMAT_VERSION, "model": key, "dim": dim, "entries": n, "passages": len(passages),
              "max_tokens": max_tokens, "max_len": max_len, "keys_dtype": "float16",
              "model_dtype": str(param.dtype).removeprefix("torch.")}
    digest = hashlib.sha256(values.tobytes() + text.tobytes() + json.dumps(config).encode()).hexdigest()
    meta_path, prog_path, keys_path = folder / "meta.json", folder / "progress.json", folder / "keys.npy"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("digest") == digest:
            return {**meta["stats"], "seconds": meta["build_seconds"], "bytes": _folder_bytes(folder),
                    "skipped": True}
        meta_path.unlink()  # another corpus, cap or model: rebuild
    # 2) resume when progress.json describes this very build, else start over
    state = json.loads(prog_path.read_text()) if prog_path.exists() else {}
    if state.get("digest") != digest or state.get("batch_tokens") != batch_tokens or not keys_path.exists():
        state = {"digest": digest, "batch_tokens": batch_tokens, "batches_done": 0, "passages_done": 0,
                 "entries_filled": 0, "seconds": 0.0, "forward_seconds": 0.0, "max_rel_err": 0.0}
        _save_npy(folder / "values.npy", values)
        _save_npy(folder / "text.npy", text)
        np.lib.format.open_memmap(keys_path, mode="w+", dtype=np.float16, shape=(n, dim)).flush()
        _atomic_json(prog_path, state)
    resumed_from = state["entries_filled"]
    if resumed_from:
        log.info("resuming the KNN datastore %s at %d/%d entries", folder, resumed_from, n)
    # 3) batched prefill into the keys file, then the IVF index, then meta.json last
    _prefill(model, passages, lengths, offsets, _batches(lengths, batch_tokens), keys_path, prog_path, state,
             t0, progress)
    t = time.perf_counter()
    keys = np.load(keys_path, mmap_mode="r")
    ivf, nlist = ivf_index(keys)
    faiss.write_index(ivf, str(folder / "ivf.index.part"))
    os.replace(folder / "ivf.index.part", folder / "ivf.index")
    del ivf
    seconds = state["seconds"] + time.perf_counter() - t
    stats = {"entries": n, "passages": len(passages), "passages_with_entries": int((lengths >= 2).sum()),
             "forward_seconds": round(state["forward_seconds"], 2), "ivf_seconds": round(time.perf_counter() - t, 2),
             "nlist": nlist, "tokens_per_s": round(n / max(state["forward_seconds"], 1e-9), 1),
             "fp16_max_rel_error": state["max_rel_err"], "resumed_from": resumed_from}
    _atomic_json(meta_path, {**config, "digest": digest, "max_key_norm": _max_norm(keys),
                             "build_seconds": round(seconds, 2), "stats": stats})
    prog_path.unlink()
    size = _folder_bytes(folder)
    log.info("KNN datastore %s: %d entries, %d bytes in %.1fs", folder, n, size, seconds)
    return {**stats, "seconds": round(seconds, 2), "bytes": size}


def _prefill(model: torch.nn.Module, passages: list[np.ndarray], lengths: np.ndarray, offsets: np.ndarray,
             batches: list[np.ndarray], keys_path: Path, prog_path: Path, state: dict, t0: float,
             progress: bool) -> None:
    """Run the batches not yet done; after each, flush the keys and record progress (the resume point)."""
    from tqdm import tqdm

    keys = np.lib.format.open_memmap(keys_path, mode="r+")  # [N, d] float16
    device = next(model.parameters()).device
    t_run = t0  # this run's time so far (tokenizing included) joins state["seconds"] with each batch
    with tqdm(total=len(keys), initial=state["entries_filled"], desc="knn keys", unit="tok",
              disable=not progress) as bar:
        for b in range(state["batches_done"], len(batches)):
            rows = batches[b]
            ids = np.zeros((len(rows), int(lengths[rows[0]])), dtype=np.int64)  # [B, T] right-padded
            for r, p in enumerate(rows):
                ids[r, : lengths[p]] = passages[p]
            t = time.perf_counter()
            hidden = _hidden_states(model, torch.from_numpy(ids).to(device)).float().cpu().numpy()  # [B, T, d]
            state["forward_seconds"] += time.perf_counter() - t
            filled = 0
            for r, p in enumerate(rows):
                h = hidden[r, : lengths[p] - 1]  # [L-1, d]: the state after tokens 0..j predicts token j+1
                h16 = h.astype(np.float16)
                if not np.isfinite(h16).all():
                    raise InvalidRequest(f"passage {p}: hidden states overflow float16 (max |h| {np.abs(h).max()})")
                keys[offsets[p] : offsets[p + 1]] = h16
                err = np.linalg.norm(h16 - h, axis=1) / np.maximum(np.linalg.norm(h, axis=1), 1e-30)  # [L-1]
                state["max_rel_err"] = max(state["max_rel_err"], float(err.max()))
                filled += len(h)
            keys.flush()
            state["batches_done"] = b + 1
            state["passages_done"] += len(rows)
            state["entries_filled"] += filled
            state["seconds"] += time.perf_counter() - t_run
            t_run = time.perf_counter()
            _atomic_json(prog_path, state)
            bar.update(filled)
    state["seconds"] += time.perf_counter() - t_run


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def ivf_index(keys: np.ndarray) -> tuple[faiss.IndexIVFFlat, int]:
    """IVFFlat (L2) trained on <= IVF_TRAIN_MAX sampled keys; returns (index, nlist)."""
    from services.retriever.dense import ivf_nlist

    n, d = keys.shape
    sample = np.sort(np.random.default_rng(0).choice(n, size=min(n, IVF_TRAIN_MAX), replace=False))
    nlist = min(ivf_nlist(n), max(1, len(sample) // 39))  # ~4 sqrt(n), >= 39 training keys per list
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist, faiss.METRIC_L2)
    index.train(np.asarray(keys[sample], dtype=np.float32))
    for i in range(0, n, ADD_CHUNK):
        index.add(np.asarray(keys[i : i + ADD_CHUNK], dtype=np.float32))
    return index, nlist


def _max_norm(keys: np.ndarray) -> float:
    """max |key| over float16 keys [n, d], in float64, chunk by chunk."""
    out = 0.0
    for i in range(0, len(keys), ADD_CHUNK):
        out = max(out, float(np.sqrt((np.asarray(keys[i : i + ADD_CHUNK], dtype=np.float64) ** 2).sum(1).max())))
    return out
