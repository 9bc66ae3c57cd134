"""REST's datastore: the corpus as one token array with a suffix array over it; a lookup maps the longest
matching suffix of a context to the tokens that followed its occurrences in the corpus (draft continuations).

Token array: each passage's token ids, each passage followed by a separator (-1), int32, so any vocabulary
below 2**31 fits (REST's own format is 16-bit). No match and no continuation crosses a separator, and the
array always ends in one. The suffix array lists every position that holds a token (never a separator),
sorted by the suffix starting there; a separator compares below every token and separators differ from
each other, so the order is total and every comparison ends within a passage.

On-disk format (little-endian), written to `<path>.tmp` then renamed:
    offset 0   magic      8 bytes  b"RALMREST"
    offset 8   version    u32      FORMAT_VERSION
    offset 12  pos_bytes  u32      4 (int32 positions) or 8 (int64, when n_tokens >= 2**31)
    offset 16  n_tokens   u64      token array length, separators included
    offset 24  n_suffixes u64      suffix array length (= n_tokens - n_passages)
    offset 32  vocab_size u64      every token id is < vocab_size
    offset 40  n_passages u64      number of separators
    offset 48  zero padding up to HEADER_BYTES
    offset 64  tokens     int32[n_tokens]
    then zero padding to a multiple of 8, then the suffix array int32|int64[n_suffixes].
Both arrays are opened with np.memmap: loading reads the header only.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.errors import InvalidRequest, Unavailable

log = logging.getLogger(__name__)

MAGIC = b"RALMREST"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIQQQQ")
HEADER_BYTES = 64
SEP = -1
REBUILD = "rebuild with `ralmspec assets` (services.datastore.rest_datastore.build_from_texts)"

Progress = Callable[[int, int], None]  # (suffixes in their final place, all suffixes), once per doubling round


def suffix_array(tokens: np.ndarray, progress: Progress | None = None) -> np.ndarray:
    """Positions of the non-separator entries of `tokens` [n] (int32, -1 = separator), sorted by suffix.

    Prefix doubling: after the round with offset k every suffix is ordered by its first 2k tokens; rank[p]
    is the slot of the first suffix of p's group. Only groups of equal prefixes are re-sorted (Manber-Myers
    with the Larsson-Sadakane skip of finished suffixes). Each separator is a distinct symbol below all
    tokens, so the rounds stop once k exceeds the longest repeat inside one passage.
    """
    n = len(tokens)
    if n and tokens[-1] != SEP:
        raise InvalidRequest("the token array must end with a separator")
    is_sep = tokens == SEP
    n_sep = int(is_sep.sum())
    # 1) initial key: separators 0..n_sep-1 in position order, then tokens shifted above them
    key0 = np.where(is_sep, np.cumsum(is_sep) - 1, n_sep + tokens.astype(np.int64))
    sa = np.argsort(key0, kind="stable").astype(np.int64)  # [n] slot -> position
    rank = np.empty(n, dtype=np.int64)  # [n] position -> group head slot
    ks = key0[sa]
    active = _regroup(ks, np.arange(n, dtype=np.int64), sa, rank)
    k = 1
    while len(active):
        if progress:
            progress(n - len(active), n)
        # 2) within each group, order by the rank k positions further on (-1 past the end)
        pos = sa[active]
        nxt = pos + k
        r2 = np.where(nxt < n, rank[np.minimum(nxt, n - 1)], -1)
        key = rank[pos] * (n + 1) + (r2 + 1)  # groups are contiguous slots, so sorting keeps them in place
        order = np.argsort(key, kind="stable")
        sa[active] = pos[order]
        active = _regroup(key[order], active, sa, rank)
        k *= 2
    if progress:
        progress(n, n)
    out = sa[n_sep:]  # separators sort first
    dtype = np.int32 if n < 2**31 else np.int64
    return out.astype(dtype)


def _regroup(keys: np.ndarray, slots: np.ndarray, sa: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Set rank = group head slot for the suffixes at `slots` (sorted keys [m]); return slots still tied."""
    m = len(keys)
    if m == 0:
        return slots
    start = np.ones(m, dtype=bool)
    start[1:] = keys[1:] != keys[:-1]
    first = np.maximum.accumulate(np.where(start, np.arange(m), 0))  # [m] index of the run's first element
    rank[sa[slots]] = slots[first]
    starts = np.flatnonzero(start)
    sizes = np.diff(np.append(starts, m))
    tied = np.repeat(sizes > 1, sizes)
    return slots[tied]


@dataclass(frozen=True, eq=False)
class Lookup:
    """Result of one lookup. Matches beyond `max_matches` are thinned by an even stride over the suffix-array
    range (suffix-array order = sorted by what follows), so the kept set is deterministic and keeps the
    continuations' frequencies roughly in proportion."""

    suffix_len: int  # L: tokens of the context's longest suffix that occurs (0: no match)
    n_occurrences: int  # occurrences of that suffix in the corpus, before thinning
    positions: np.ndarray  # [m] int64 corpus position of each kept match's first token, suffix-array order
    block: np.ndarray  # [m, continuation] int32 next tokens, -1 after a separator; empty ones dropped
    lengths: np.ndarray  # [m] int64 tokens before the first -1 (>= 1)

    @property
    def continuations(self) -> list[list[int]]:
        rows = self.block.tolist()
        for i in np.flatnonzero(self.lengths < self.block.shape[1]).tolist():
            rows[i] = rows[i][: self.lengths[i]]
        return rows  # type: ignore[no-any-return]


def _empty_lookup(continuation: int, suffix_len: int = 0, n_occurrences: int = 0) -> Lookup:
    return Lookup(suffix_len, n_occurrences, np.zeros(0, np.int64), np.zeros((0, continuation), np.int32),
                  np.zeros(0, np.int64))


class RestDatastore:
    def __init__(self, tokens: np.ndarray, sa: np.ndarray, vocab_size: int) -> None:
        self.tokens = np.asarray(tokens)  # [n_tokens] int32; a plain ndarray view of a memmap reads lazily
        self.sa = np.asarray(sa)  # [n_suffixes] int32|int64
        self.vocab_size = vocab_size
        self.n_passages = len(self.tokens) - len(self.sa)

    @classmethod
    def build(cls, passages: Iterable[Sequence[int]], vocab_size: int,
              progress: Progress | None = None) -> RestDatastore:
        tokens = concat_passages(passages, vocab_size)
        return cls(tokens, suffix_array(tokens, progress), vocab_size)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def save(self, path: Path) -> int:
        """Write atomically; returns the file size in bytes."""
        pos_bytes = self.sa.dtype.itemsize
        header = HEADER.pack(MAGIC, FORMAT_VERSION, pos_bytes, self.n_tokens, len(self.sa), self.vocab_size,
                             self.n_passages)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as f:
            f.write(header.ljust(HEADER_BYTES, b"\0"))
            np.ascontiguousarray(self.tokens, dtype="<i4").tofile(f)
            f.write(b"\0" * (_sa_offset(self.n_tokens) - HEADER_BYTES - 4 * self.n_tokens))
            np.ascontiguousarray(self.sa, dtype=f"<i{pos_bytes}").tofile(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path.stat().st_size

    @classmethod
    def load(cls, path: Path) -> RestDatastore:
        if not path.exists():
            raise Unavailable(f"REST datastore {path} is missing: {REBUILD}")
        with path.open("rb") as f:
            raw = f.read(HEADER_BYTES)
        if len(raw) < HEADER_BYTES or raw[:8] != MAGIC:
            raise Unavailable(f"{path} is not a REST datastore (bad magic): {REBUILD}")
        _, version, pos_bytes, n_tokens, n_suffixes, vocab_size, n_passages = HEADER.unpack_from(raw)
        if version != FORMAT_VERSION:
            raise Unavailable(f"{path} has format version {version}, this code reads {FORMAT_VERSION}: {REBUILD}")
        expected = _sa_offset(n_tokens) + pos_bytes * n_suffixes
        if pos_bytes not in (4, 8) or n_suffixes + n_passages != n_tokens or path.stat().st_size != expected:
            raise Unavailable(f"{path} is truncated or corrupt: {REBUILD}")
        tokens = np.memmap(path, dtype="<i4", mode="r", offset=HEADER_BYTES, shape=(n_tokens,))
        sa = np.memmap(path, dtype=f"<i{pos_bytes}", mode="r", offset=_sa_offset(n_tokens), shape=(n_suffixes,))
        return cls(tokens, sa, vocab_size)

    def count(self, pattern: Sequence[int]) -> int:
        lo = self._lower(list(pattern), 0, len(self.sa))
        return self._upper(list(pattern), lo, len(self.sa)) - lo

    def lookup(self, context: Sequence[int], *, max_suffix: int = 16, min_suffix: int = 2,
               max_matches: int = 5000, continuation: int = 10) -> Lookup:
        """Longest suffix of `context` (max_suffix..min_suffix tokens) found in the corpus, and the next
        `continuation` tokens after up to `max_matches` of its occurrences."""
        if min_suffix < 1:
            raise InvalidRequest("min_suffix must be >= 1")
        ctx = [int(t) for t in context[-max_suffix:]] if max_suffix > 0 else []
        if any(t < 0 for t in ctx):
            raise InvalidRequest("context token ids must be >= 0")
        n = len(self.sa)
        # 1) binary search over L: if the last L tokens occur, so do the last L-1 (monotone)
        found, missing = min_suffix - 1, len(ctx) + 1  # invariant: L=found occurs (or sentinel), L=missing not
        lo_found = 0
        while missing - found > 1:
            mid = (found + missing) // 2
            pat = ctx[len(ctx) - mid:]
            lo = self._lower(pat, 0, n)
            if lo < n and self._prefix(int(self.sa[lo]), mid) == pat:
                found, lo_found = mid, lo
            else:
                missing = mid
        if found < min_suffix:
            return _empty_lookup(continuation)
        # 2) the suffix-array range of the winning suffix
        pat = ctx[len(ctx) - found:]
        hi = self._upper(pat, lo_found, n)
        total = hi - lo_found
        if total > max_matches:
            slots = lo_found + (np.arange(max_matches, dtype=np.int64) * total) // max_matches
            positions = self.sa[slots].astype(np.int64)
        else:
            positions = self.sa[lo_found:hi].astype(np.int64)
        if continuation <= 0:
            return _empty_lookup(0, found, total)
        # 3) continuations, cut at the first separator (the array ends in one, so clipping is safe)
        idx = np.minimum(positions[:, None] + (found + np.arange(continuation)), self.n_tokens - 1)
        block = self.tokens.take(idx)  # [m, continuation]
        is_sep = block == SEP
        lengths = np.where(is_sep.any(axis=1), is_sep.argmax(axis=1), continuation)  # [m]
        block[np.arange(continuation) >= lengths[:, None]] = SEP
        keep = lengths > 0
        if not keep.all():
            positions, block, lengths = positions[keep], block[keep], lengths[keep]
        return Lookup(found, total, positions, block.astype(np.int32, copy=False), lengths.astype(np.int64))

    def _prefix(self, pos: int, length: int) -> list[int]:
        return self.tokens[pos:pos + length].tolist()  # type: ignore[no-any-return]

    def _lower(self, pat: list[int], lo: int, hi: int) -> int:
        """First slot in [lo, hi) whose suffix's first len(pat) tokens are >= pat."""
        tokens, sa, m = self.tokens, self.sa, len(pat)
        while lo < hi:
            mid = (lo + hi) // 2
            s = sa[mid]
            if tokens[s:s + m].tolist() < pat:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def _upper(self, pat: list[int], lo: int, hi: int) -> int:
        """First slot in [lo, hi) whose suffix's first len(pat) tokens are > pat."""
        tokens, sa, m = self.tokens, self.sa, len(pat)
        while lo < hi:
            mid = (lo + hi) // 2
            s = sa[mid]
            if tokens[s:s + m].tolist() <= pat:
                lo = mid + 1
            else:
                hi = mid
        return lo


def _sa_offset(n_tokens: int) -> int:
    return -(-(HEADER_BYTES + 4 * n_tokens) // 8) * 8


def concat_passages(passages: Iterable[Sequence[int]], vocab_size: int) -> np.ndarray:
    """[n_tokens] int32: each non-empty passage followed by a separator."""
    if not 0 < vocab_size <= 2**31:
        raise InvalidRequest(f"vocab_size {vocab_size} does not fit 32-bit token ids")
    parts: list[np.ndarray] = []
    sep = np.array([SEP], dtype=np.int32)
    for p in passages:
        arr = np.asarray(p, dtype=np.int64)
        if len(arr) == 0:
            continue
        if arr.min() < 0 or arr.max() >= vocab_size:
            raise InvalidRequest(f"token ids must be in [0, {vocab_size})")
        parts += [arr.astype(np.int32), sep]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


@dataclass(frozen=True)
class Stats:
    build_s: float  # encode + suffix array + write
    n_tokens: int  # separators included
    n_passages: int
    bytes: int  # file size


def build_from_texts(texts: Iterable[str], encode: Callable[[str], list[int]], vocab_size: int, path: Path,
                     progress: bool = True) -> Stats:
    """Encode each text as one passage, build the suffix array and write the datastore to `path`."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    tokens = concat_passages((encode(t) for t in tqdm(texts, desc="encode", disable=not progress)), vocab_size)
    with tqdm(total=len(tokens), desc="suffix array", unit="tok", disable=not progress) as bar:

        def report(done: int, total: int) -> None:
            bar.update(done - bar.n)

        store = RestDatastore(tokens, suffix_array(tokens, report), vocab_size)
    size = store.save(path)
    stats = Stats(time.perf_counter() - t0, store.n_tokens, store.n_passages, size)
    log.info("REST datastore %s: %d tokens, %d passages, %d bytes in %.1fs", path, stats.n_tokens,
             stats.n_passages, stats.bytes, stats.build_s)
    return stats
