"""Greedy decoding with a per-session KV cache that reuses the longest common prefix of what it already holds.

KV reuse is a property of the cache, not of the caller: asking for logits after a sequence feeds only the
suffix past the longest common prefix with the cached tokens (after cropping the rest). Rolling back is the
same call with a shorter sequence. `reuse=False` re-prefills from scratch (RaLMSpec's paper baseline).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from services.lm.model import LoadedLM


@dataclass
class Emitted:
    """Tokens from one greedy run, with the top-2 logit gap at each (the near-tie certificate)."""

    tokens: list[int] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # logit[top1] - logit[top2] at each emitted token
    forwards: int = 0  # model forward calls spent
    fed: int = 0  # tokens pushed through the model (prefill + decode)
    stopped: bool = False  # a stop token was emitted (it is included in tokens)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Session:
    """One sequence's KV cache. Not thread-safe; one session per request."""

    def __init__(self, lm: LoadedLM) -> None:
        self.lm = lm
        self.ids: list[int] = []  # tokens whose K/V are in the cache, in order
        self._cache: DynamicCache | None = None
        self._last: torch.Tensor | None = None  # [vocab] logits after self.ids
        self._hidden: torch.Tensor | None = None  # [d] final hidden state after self.ids, when it was asked for
        self.forwards = 0
        self.fed_tokens = 0  # tokens pushed through the model (prefill + decode)
        # Sliding-window layers (Gemma 3) keep only the last `window` positions: past that, a crop cannot
        # restore what was evicted, so a rollback re-prefills instead.
        self._window: int | None = getattr(lm.model.config, "sliding_window", None)  # type: ignore[attr-defined]

    def reset(self) -> None:
        self.ids, self._cache, self._last, self._hidden = [], None, None, None

    @torch.inference_mode()
    def logits_after(self, seq: Sequence[int], reuse: bool = True) -> torch.Tensor:
        """Next-token logits [vocab] (float32, on CPU) after `seq`, leaving the cache holding exactly `seq`."""
        keep = self.hold_prefix(seq, reuse)
        if keep == len(seq):
            return self._last  # type: ignore[return-value]  # hold_prefix: the logits after seq are cached
        pos = torch.arange(keep, len(seq))  # [n]
        self._last = self.forward(seq[keep:], pos, None, 1)[0]
        self.ids = list(seq)
        return self._last

    @torch.inference_mode()
    def state_after(self, seq: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(final hidden state [d], logits [vocab]) after `seq`, both float32 on CPU: KNN-LM's query (the vector
        the LM head reads, after the final norm) and p_LM. Reuses the cache like `logits_after`."""
        keep = self.hold_prefix(seq)
        if keep == len(seq) and self._hidden is not None:
            return self._hidden, self._last  # type: ignore[return-value]
        keep = min(keep, len(seq) - 1)  # cached logits but no hidden state: feed the last token again
        if keep < len(self.ids):
            self._cache.crop(keep - len(self.ids))  # type: ignore[union-attr]
        pos = torch.arange(keep, len(seq))  # [n]
        self._last = self.forward(seq[keep:], pos, None, 1, hidden=True)[0]
        self.ids = list(seq)
        return self._hidden, self._last  # type: ignore[return-value]

    def hold_prefix(self, seq: Sequence[int], reuse: bool = True) -> int:
        """Crop (or reset) the cache to the longest prefix of `seq` it can serve and return that prefix's length.
        It is len(seq) only when the cache already holds exactly `seq` with its logits (`last`); otherwise at
        least the last token of `seq` is left to feed."""
        if not seq:
            raise ValueError("cannot run the LM on an empty sequence")
        keep = _common_prefix(self.ids, seq) if reuse and self._cache is not None else 0
        if keep == len(seq) == len(self.ids) and self._last is not None:
            return keep
        keep = min(keep, len(seq) - 1)  # the last token must be fed to get its logits
        self._hidden = None
        if keep < len(self.ids) and self._window is not None and len(self.ids) > self._window:
            keep = 0
        if keep == 0:
            self._cache = DynamicCache(config=self.lm.model.config)  # type: ignore[arg-type]
        elif keep < len(self.ids):
            self._cache.crop(keep - len(self.ids))  # type: ignore[union-attr]  # negative: drop the tail
        self.ids, self._last = list(seq[:keep]), None
        return keep

    @property
    def last(self) -> torch.Tensor | None:
        """[vocab] logits after `ids`, when known."""
        return self._last

    @torch.inference_mode()
    def forward(self, tokens: Sequence[int], positions: torch.Tensor, mask: torch.Tensor | None,
                keep_logits: int, hidden: bool = False) -> torch.Tensor:
        """One forward of `tokens` after the cached ones, appending their K/V; returns the logits [keep_logits,
        vocab] (float32, on CPU) of the last `keep_logits` tokens. `positions` [n]; `mask` None (causal) or an
        additive [1, 1, n, cached + n] mask. The caller owns `ids`/`last` afterwards (see `compact`). `hidden`: also
        keep the last token's final hidden state (the input of the LM head) for `state_after`."""
        if self._cache is None:
            self._cache = DynamicCache(config=self.lm.model.config)  # type: ignore[arg-type]
        dev = self.lm.device
        new = torch.tensor([list(tokens)], dtype=torch.long, device=dev)  # [1, n]
        out = self.lm.model(input_ids=new, past_key_values=self._cache, position_ids=positions.to(dev).unsqueeze(0),
                            attention_mask=None if mask is None else mask.to(dev), use_cache=True,
                            logits_to_keep=keep_logits, output_hidden_states=hidden)
        self._cache = out.past_key_values
        # hidden_states[-1] is the final norm's output (checked equal to base_model's last_hidden_state)
        self._hidden = out.hidden_states[-1][0, -1].float().cpu() if hidden else None
        self.forwards += 1
        self.fed_tokens += new.shape[1]
        return out.logits[0].float().cpu()

    def compact(self, keep: torch.Tensor, ids: Sequence[int], last: torch.Tensor) -> None:
        """Keep only the cache slots `keep` [len(ids)] (ascending), which now hold `ids`; `last` [vocab] = the
        logits after them."""
        if self._cache is None or len(keep) != len(ids):
            raise ValueError("compact needs a cache and one slot per kept token")
        held = self._cache.get_seq_length()
        if torch.equal(keep, torch.arange(len(ids))):
            if len(ids) < held:
                self._cache.crop(len(ids) - held)
        else:
            for layer in self._cache.layers:
                idx = keep.to(layer.keys.device)  # type: ignore[union-attr]
                layer.keys = layer.keys.index_select(-2, idx)  # type: ignore[union-attr]  # [batch, heads, seq, dim]
                layer.values = layer.values.index_select(-2, idx)  # type: ignore[union-attr]
                if hasattr(layer, "cumulative_length"):  # sliding-window layers count what they were fed
                    layer.cumulative_length = len(ids)
        self.ids, self._last, self._hidden = list(ids), last, None

    def greedy(self, seq: Sequence[int], n: int, stop: frozenset[int], reuse: bool = True) -> Emitted:
        """Up to n greedy tokens after `seq`; stops after emitting a stop token. Only the first forward may
        re-prefill (reuse=False); the tokens inside the run always extend the cache."""
        out = Emitted()
        ctx = list(seq)
        before, fed = self.forwards, self.fed_tokens
        logits = self.logits_after(ctx, reuse=reuse)
        for i in range(n):
            top = torch.topk(logits, 2)
            tok = int(top.indices[0])
            out.tokens.append(tok)
            out.gaps.append(float(top.values[0] - top.values[1]))
            if tok in stop:
                out.stopped = True
                break
            ctx.append(tok)
            if i + 1 < n:  # the last token is fed lazily, by whoever continues this sequence
                logits = self.logits_after(ctx)
        out.forwards, out.fed = self.forwards - before, self.fed_tokens - fed
        return out
