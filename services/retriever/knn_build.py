"""Builds KNN-LM's datastore (`knn_index.py` reads it): one batched LM prefill over the corpus passages writes
each token's key into a memory-mapped keys file, resumably; then the IVF index; meta.json last.

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
