"""Builds KNN-LM's datastore (`knn_index.py` reads it): one batched LM prefill over the corpus passages writes
each token's key into a memory-mapped keys file, resumably; then the IVF index; meta.json last.

A complete datastore built by the same LM over a prefix of the same passages (the default profile's 600k entries
are the first passages of the large profile's 2M) seeds the keys of the passages it holds whole, so only the rest
is prefilled. A passage's keys do not depend on its batch-mates (right padding, causal attention) beyond float
noise, so a seeded build equals a full one to ~1e-3 relative (the fp16 rounding of the keys).

The LM comes in as an object (a LoadedLM or a (model, tokenizer) pair), so the retriever imports nothing of
`services.lm`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from services.common.errors import InvalidRequest
from services.retriever.knn_index import FORMAT_VERSION, ivf_index, max_key_norm

log = logging.getLogger(__name__)


def _unpack(lm: Any) -> tuple[torch.nn.Module, Any, str]:
    """A LoadedLM or a (model, tokenizer) pair -> (model, tokenizer, model key)."""
    if isinstance(lm, tuple):
        model, tok = lm
        return model, tok, str(getattr(model.config, "name_or_path", "") or type(model).__name__)
    return lm.model, lm.tokenizer, lm.key


def _capped(passages: Iterable[np.ndarray], max_tokens: int | None) -> list[np.ndarray]:
    """Passages until max_tokens entries are reached (a passage of L tokens has L-1), cutting the last one so the
    entries are exactly max_tokens; reads no further than it keeps (a generator stays lazy)."""
    out: list[np.ndarray] = []
    entries = 0
    for ids in passages:
        if max_tokens is not None:
            if entries >= max_tokens:
                break
            ids = ids[: max_tokens - entries + 1]
        out.append(ids)
        entries += max(len(ids) - 1, 0)
    return out


def _tokenize(tok: Any, texts: Iterable[str], max_len: int, max_tokens: int | None) -> list[np.ndarray]:
    """Token ids of each passage (as the decoder tokenizes a prompt: no special tokens), cut to max_len, capped
    at max_tokens entries."""
    ids = (np.asarray(tok(text, add_special_tokens=False).input_ids[:max_len], dtype=np.int32) for text in texts)
    return _capped(ids, max_tokens)


def _layout(passages: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """-> (lengths [P], offsets [P+1], values [N], text [N]): passage p's entries are rows offsets[p]..offsets[p+1]-1,
    in passage order; entry i predicts values[i] within passage text[i]."""
    lengths = np.array([len(p) for p in passages], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(np.maximum(lengths - 1, 0))]).astype(np.int64)
    values = np.concatenate([p[1:] for p in passages]).astype(np.int32) if passages else np.zeros(0, np.int32)
    text = np.repeat(np.arange(len(passages), dtype=np.int32), np.diff(offsets))
    return lengths, offsets, values, text


def _digest(passages: list[np.ndarray], config: dict) -> str:
    """What the keys are a function of: every token of every passage (the first ones too) and the config."""
    _, _, values, text = _layout(passages)
    firsts = np.array([p[0] if len(p) else -1 for p in passages], dtype=np.int32)
    return hashlib.sha256(values.tobytes() + text.tobytes() + firsts.tobytes()
                          + json.dumps(config).encode()).hexdigest()


# Config fields a seed must share with the build it seeds (entries, passages and max_tokens are its own).
_SEED_FIELDS = ("version", "model", "dim", "max_len", "keys_dtype", "model_dtype")


def _find_seed(seeds: Iterable[Path], passages: list[np.ndarray], config: dict) -> dict[str, Any] | None:
    """The complete datastore among `seeds` whose passages are a prefix of `passages` (same LM and config), the
    one giving the most entries: {folder, passages it holds whole, their entries}; None when none fits."""
    best: dict[str, Any] | None = None
    for folder in seeds:
        meta_path = folder / "meta.json"
        if not meta_path.exists():
            continue
        meta = json.loads(meta_path.read_text())
        if any(meta.get(f) != config[f] for f in _SEED_FIELDS) or meta.get("passages", 0) > len(passages):
            continue
        theirs = _capped(passages[: meta["passages"]], meta.get("max_tokens"))
        own = {**config, "entries": meta["entries"], "passages": meta["passages"], "max_tokens": meta.get("max_tokens")}
        if len(theirs) != meta["passages"] or _digest(theirs, own) != meta.get("digest"):
            continue
        whole = len(theirs) - int(len(theirs[-1]) < len(passages[len(theirs) - 1]))  # their cap cut the last one
        entries = int(sum(max(len(p) - 1, 0) for p in theirs[:whole]))
        if entries and (best is None or entries > best["entries"]):
            best = {"folder": str(folder), "passages": whole, "entries": entries}
    return best


def _copy_seed(folder: Path, keys_path: Path, entries: int, chunk: int = 1 << 16) -> None:
    """Copy the seed's first `entries` key rows into the keys file, a chunk at a time (bounded memory)."""
    src = np.load(folder / "keys.npy", mmap_mode="r")
    dst = np.lib.format.open_memmap(keys_path, mode="r+")
    for start in range(0, entries, chunk):
        end = min(start + chunk, entries)
        dst[start:end] = src[start:end]
    dst.flush()


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
          batch_tokens: int = 4096, max_len: int = 512, progress: bool = True, seeds: Sequence[Path] = ()) -> dict:
    """Build (or resume, or find complete) the datastore in `folder` with `lm` (a LoadedLM or a (model,
    tokenizer) pair), taking the keys of a prefix of its passages from the best of `seeds` (complete datastores
    of other profiles); returns stats: entries, passages, seconds (all runs), bytes, tokens_per_s (prefilled
    entries per forward second), seeded_entries."""
    t0 = time.perf_counter()
    model, tok, key = _unpack(lm)
    param = next(model.parameters())
    cfg: Any = model.config
    dim = int(cfg.hidden_size)
    folder.mkdir(parents=True, exist_ok=True)
    # 1) tokenize and lay out
    passages = _tokenize(tok, texts, max_len, max_tokens)
    lengths, offsets, values, text = _layout(passages)
    n = int(offsets[-1])
    if n == 0:
        raise InvalidRequest("no passage has two tokens: the KNN datastore would be empty")
    config = {"version": FORMAT_VERSION, "model": key, "dim": dim, "entries": n, "passages": len(passages),
              "max_tokens": max_tokens, "max_len": max_len, "keys_dtype": "float16",
              "model_dtype": str(param.dtype).removeprefix("torch.")}
    digest = _digest(passages, config)
    meta_path, prog_path, keys_path = folder / "meta.json", folder / "progress.json", folder / "keys.npy"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("digest") == digest:
            return {**meta["stats"], "seconds": meta["build_seconds"], "bytes": _folder_bytes(folder),
                    "skipped": True}
        meta_path.unlink()  # another corpus, cap or model: rebuild
    # 2) resume when progress.json describes this very build (seed included), else start over, seeded if one fits
    seed = _find_seed((s for s in seeds if s.resolve() != folder.resolve()), passages, config)
    state = json.loads(prog_path.read_text()) if prog_path.exists() else {}
    if (state.get("digest") != digest or state.get("batch_tokens") != batch_tokens or state.get("seed") != seed
            or not keys_path.exists()):
        state = {"digest": digest, "batch_tokens": batch_tokens, "seed": seed, "batches_done": 0,
                 "passages_done": 0, "entries_filled": 0, "seconds": 0.0, "forward_seconds": 0.0, "max_rel_err": 0.0}
        _save_npy(folder / "values.npy", values)
        _save_npy(folder / "text.npy", text)
        np.lib.format.open_memmap(keys_path, mode="w+", dtype=np.float16, shape=(n, dim)).flush()
        if seed:
            log.info("seeding %d of %d KNN entries from %s", seed["entries"], n, seed["folder"])
            _copy_seed(Path(seed["folder"]), keys_path, seed["entries"])
            seed_meta = json.loads((Path(seed["folder"]) / "meta.json").read_text())
            state.update(passages_done=seed["passages"], entries_filled=seed["entries"],
                         max_rel_err=seed_meta["stats"]["fp16_max_rel_error"])
        _atomic_json(prog_path, state)
    resumed_from = state["entries_filled"] - (seed["entries"] if seed else 0)
    if resumed_from:
        log.info("resuming the KNN datastore %s at %d/%d entries", folder, state["entries_filled"], n)
    # 3) batched prefill of the passages not seeded into the keys file, then the IVF index, then meta.json last
    todo = np.where(np.arange(len(lengths)) < (seed["passages"] if seed else 0), 0, lengths)
    _prefill(model, passages, lengths, offsets, _batches(todo, batch_tokens), keys_path, prog_path, state,
             t0, progress)
    t = time.perf_counter()
    keys = np.load(keys_path, mmap_mode="r")
    ivf, nlist = ivf_index(keys)
    faiss.write_index(ivf, str(folder / "ivf.index.part"))
    os.replace(folder / "ivf.index.part", folder / "ivf.index")
    del ivf
    seconds = state["seconds"] + time.perf_counter() - t
    seeded = seed["entries"] if seed else 0
    stats = {"entries": n, "passages": len(passages), "passages_with_entries": int((lengths >= 2).sum()),
             "forward_seconds": round(state["forward_seconds"], 2), "ivf_seconds": round(time.perf_counter() - t, 2),
             "nlist": nlist, "tokens_per_s": round((n - seeded) / max(state["forward_seconds"], 1e-9), 1),
             "fp16_max_rel_error": state["max_rel_err"], "resumed_from": resumed_from, "seeded_entries": seeded,
             "seeded_from": seed["folder"] if seed else None}
    _atomic_json(meta_path, {**config, "digest": digest, "max_key_norm": max_key_norm(keys),
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
