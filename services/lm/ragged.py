"""One model forward over the new tokens of many sessions (a ragged batch), batch-invariant.

All sessions' new tokens are flattened into one row batch [1, T] for the model's linear layers (that is where a
small model's step time goes: reading the weights once serves every row), while attention runs per session
against that session's own `KvStore`, with its own mask (causal, or a REST draft tree's). transformers calls the
attention function we register (`ATTENTION`) with the layer's post-RoPE queries and keys [1, heads, T, dim]; the
per-session split (`Plan`) travels in the forward's kwargs, which every decoder layer passes down.

Batch invariance (a row's numbers must not depend on its batch-mates): attention is per session, norms and
activations are row-wise, so the linear layers are what is left. A CPU GEMM picks its kernel, hence its
reduction order, by the row count M, in classes that differ between machines; `kernel_classes` probes them once
per process (one intra-op thread: with two there is no stable rule) and says how to group rows. `forward` puts
the single-token feeds (decodes) first, and `prepare`'s linear layers compute the rows as that plan says: on
this AVX2 machine every row of a tick in one call padded to >= 4 rows; on an AVX-512 one, decodes in blocks of
2-15 rows and the rest in one call padded to >= 16. Either way a feed's rows always land in the same class, so
its numbers are those it gets alone. What it costs is in docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from services.lm.kernel_classes import RowPlan, row_plan
from services.lm.model import LoadedLM

ATTENTION = "ralmspec_ragged"
GROW = 256  # KV slots a store grows by
NO_MASK = torch.zeros(1, 1, 0, 0)  # a 4D mask makes transformers skip building its own (attention is ours)
R = TypeVar("R")


class KvStore:
    """One sequence's keys and values for every layer: slot i holds the i-th token of `Session.ids`, at position
    `pos[i]`. Grown in GROW-slot blocks; a rollback is `crop`, a tree's accepted path is `compact`."""

    def __init__(self, layers: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * layers  # [kv heads, capacity, head dim]
        self.v: list[torch.Tensor | None] = [None] * layers
        self.pos = torch.empty(0, dtype=torch.long)  # [length] position id of each slot

    @property
    def length(self) -> int:
        """Slots held (committed)."""
        return len(self.pos)

    @property
    def capacity(self) -> int:
        """Slots allocated (what the store costs in memory, in tokens)."""
        k = self.k[0]
        return 0 if k is None else int(k.shape[1])

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Put a forward's new keys/values [kv heads, n, dim] after the held ones; return all [kv heads, len + n,
        dim]. `commit` advances `length` once every layer has written."""
        end = self.length + k.shape[1]
        held_k, held_v = self.k[layer], self.v[layer]
        if held_k is None or held_k.shape[1] < end:
            cap = -(-end // GROW) * GROW
            new_k = k.new_empty(k.shape[0], cap, k.shape[2])
            new_v = v.new_empty(v.shape[0], cap, v.shape[2])
            if held_k is not None and held_v is not None:
                new_k[:, : self.length] = held_k[:, : self.length]
                new_v[:, : self.length] = held_v[:, : self.length]
            self.k[layer], self.v[layer] = held_k, held_v = new_k, new_v
        assert held_v is not None
        held_k[:, self.length:end] = k
        held_v[:, self.length:end] = v
        return held_k[:, :end], held_v[:, :end]

    def commit(self, positions: torch.Tensor) -> None:
        self.pos = torch.cat([self.pos, positions])

    def crop(self, n: int) -> None:
        self.pos = self.pos[:n]

    @torch.inference_mode()
    def snapshot(self, n: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Copies of the first n slots' keys and values, per layer [kv heads, n, head dim]."""
        if n > self.length:
            raise ValueError(f"snapshot of {n} slots, but the store holds {self.length}")
        return tuple((k[:, :n].clone(), v[:, :n].clone()) for k, v in zip(self.k, self.v)  # type: ignore[index]
                     if k is not None and v is not None)

    @torch.inference_mode()
    def load(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Hold exactly `layers` (a `snapshot`) at positions 0..n-1, replacing everything held."""
        self.crop(0)
        for i, (k, v) in enumerate(layers):
            self.write(i, k, v)
        self.commit(torch.arange(layers[0][0].shape[1]))

    @torch.inference_mode()
    def compact(self, keep: torch.Tensor) -> None:
        """Keep only slots `keep` [m] (ascending), moved to the front."""
        for k, v in zip(self.k, self.v):
            if k is not None and v is not None:
                k[:, : len(keep)] = k.index_select(1, keep)
                v[:, : len(keep)] = v.index_select(1, keep)
        self.pos = self.pos[keep]


@dataclass
class Feed:
    """One forward's worth of one session's work: `tokens` [n] at `positions` [n] after the store's slots.

    `allowed` None is causal; else a bool [n, length + n] (True = attend), e.g. a draft tree's. The logits of the
    last `keep` rows come back (0: none, a prefill chunk that is not the last), and with `hidden` the last row's
    final hidden state (the LM head's input: KNN-LM's query)."""

    store: KvStore
    tokens: list[int]
    positions: torch.Tensor
    keep: int = 1
    allowed: torch.Tensor | None = None
    hidden: bool = False


@dataclass
class Fed:
    logits: torch.Tensor  # [keep, vocab] float32 on CPU
    hidden: torch.Tensor | None = None  # [d] float32 on CPU


# A unit of session work: yields the feeds it needs one at a time, receives each one's result, returns its value.
Work = Generator[Feed, Fed, R]


@dataclass
class _Segment:
    start: int
    stop: int
    feed: Feed
    masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)  # sliding window -> mask

    def mask(self, window: int | None) -> torch.Tensor | None:
        """bool [n, length + n] for a layer with this sliding window (None: full attention), None when every
        column is visible (a causal decode row)."""
        if window not in self.masks:
            f, n = self.feed, self.stop - self.start
            past = f.store.length
            allowed = f.allowed
            if allowed is None and n > 1:
                allowed = torch.ones(n, past + n, dtype=torch.bool).tril(past)
            if window is not None:
                key_pos = torch.cat([f.store.pos[:past], f.positions])  # [past + n]
                near = key_pos[None, :] > f.positions[:, None] - window  # [n, past + n]
                allowed = near if allowed is None else allowed & near
            self.masks[window] = allowed
        return self.masks[window]


@dataclass
class Plan:
    """How the flattened rows split into sessions (passed to the attention function in the forward's kwargs)."""

    segments: list[_Segment]


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
               **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query [1, heads, T, dim], key/value [1, kv heads, T, dim] -> [1, T, heads, dim]; per session of the plan.
    Without a plan (a plain transformers forward of a prepared model), transformers' SDPA path."""
    plan: Plan | None = kwargs.pop("ragged", None)
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,  # type: ignore[return-value]
                                      dropout=dropout, **kwargs)
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    window = kwargs.get("sliding_window")
    out = query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])
    for seg in plan.segments:
        a, b = seg.start, seg.stop
        k, v = seg.feed.store.write(layer, key[0, :, a:b], value[0, :, a:b])  # [kv heads, past + n, dim]
        o = F.scaled_dot_product_attention(query[:, :, a:b], k[None], v[None], attn_mask=seg.mask(window),
                                           scale=scaling, enable_gqa=True)  # [1, heads, n, dim]
        out[0, a:b] = o[0].transpose(0, 1)
    return out, None


AttentionInterface.register(ATTENTION, _attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # plain forwards of a prepared model get SDPA's masks


# Set during a ragged forward: how many leading rows are decodes, and the machine's row plan.
_ROWS: ContextVar[tuple[int, RowPlan] | None] = ContextVar("ragged_rows", default=None)


def _gemm(self: torch.nn.Linear, rows: torch.Tensor, at_least: int) -> torch.Tensor:
    m = rows.shape[0]
    if m < at_least:
        rows = torch.cat([rows, rows.new_zeros(at_least - m, rows.shape[1])])
    return F.linear(rows, self.weight, self.bias)[:m]


def _invariant_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear's forward; inside a ragged forward, rows grouped by the row plan: the leading decode rows (of the
    token rows, and of the kept rows the LM head reads: one per decode feed either way) in blocks of the narrow
    class when the plan has one, the other rows in one call padded into the open class."""
    at = _ROWS.get()
    if at is None:
        return F.linear(x, self.weight, self.bias)
    narrow, rp = at
    rows = x.reshape(-1, x.shape[-1])  # [M, in]
    if rp.narrow is None:
        return _gemm(self, rows, rp.wide).reshape(*x.shape[:-1], -1)
    lo, hi = rp.narrow
    parts = [_gemm(self, rows[a: min(a + hi, narrow)], lo) for a in range(0, narrow, hi)]
    if rows.shape[0] > narrow:
        parts.append(_gemm(self, rows[narrow:], rp.wide))
    return torch.cat(parts).reshape(*x.shape[:-1], -1)


def prepare(lm: LoadedLM) -> None:
    """Make `lm` ready for ragged forwards (once): our attention function, and linear layers that keep a row in
    its kernel class inside a ragged forward (plain forwards are unchanged)."""
    model = lm.model
    if getattr(model, "_ralmspec_ragged", False):
        return
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.forward = _invariant_linear.__get__(mod)  # type: ignore[method-assign]
    model.config._attn_implementation = ATTENTION  # type: ignore[union-attr]
    for mod in model.modules():  # sub-configs (e.g. Gemma 3's text config) carry their own copy
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = ATTENTION
    model._ralmspec_ragged = True  # type: ignore[assignment]


def _narrow(f: Feed) -> bool:
    return len(f.tokens) == 1 and f.keep == 1


@torch.inference_mode()
def forward(lm: LoadedLM, feeds: Sequence[Feed]) -> list[Fed]:
    """One model forward over every feed's tokens; each feed's store gains its tokens' keys and values. Results
    in the order of `feeds`."""
    prepare(lm)
    narrow = [_narrow(f) for f in feeds]
    order = sorted(range(len(feeds)), key=lambda i: not narrow[i])  # decodes first (stable)
    segments: list[_Segment] = []
    keep: list[int] = []
    start = 0
    for i in order:
        f = feeds[i]
        n = len(f.tokens)
        if n == 0 or not 0 <= f.keep <= n or len(f.positions) != n:
            raise ValueError(f"a feed needs tokens, one position each and 0 <= keep <= n (n={n}, keep={f.keep})")
        segments.append(_Segment(start, start + n, f))
        keep.extend(range(start + n - f.keep, start + n))
        start += n
    dev = lm.device
    ids = torch.tensor([[t for s in segments for t in s.feed.tokens]], dtype=torch.long, device=dev)  # [1, T]
    pos = torch.cat([s.feed.positions for s in segments])[None].to(dev)  # [1, T]
    want_hidden = any(f.hidden for f in feeds)
    rp = row_plan(lm.model) if lm.batch_invariant else None
    token = _ROWS.set((sum(narrow), rp) if rp is not None else None)  # None: the BLAS library's own kernels
    try:
        out = lm.model(input_ids=ids, position_ids=pos, attention_mask=NO_MASK.to(dev), use_cache=False,
                       logits_to_keep=torch.tensor(keep or [0], dtype=torch.long, device=dev),
                       output_hidden_states=want_hidden, ragged=Plan(segments))
    finally:
        _ROWS.reset(token)
    logits = out.logits[0].float().cpu()  # [len(keep), vocab]
    hidden = out.hidden_states[-1][0] if want_hidden else None  # [T, d]: the final norm's output
    results: list[Fed | None] = [None] * len(feeds)
    at = 0
    for i, seg in zip(order, segments):
        f = seg.feed
        f.store.commit(f.positions)
        h = hidden[seg.stop - 1].float().cpu() if hidden is not None and f.hidden else None
        results[i] = Fed(logits[at: at + f.keep], h)
        at += f.keep
    return results  # type: ignore[return-value]


def run(lm: LoadedLM, work: Work[R]) -> R:
    """Drive one session's work alone: each feed is its own forward (a batch of one)."""
    try:
        feed = next(work)
        while True:
            feed = work.send(forward(lm, [feed])[0])
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
