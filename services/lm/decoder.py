"""Greedy decoding with a per-session KV cache that reuses the longest common prefix of what it already holds.

KV reuse is a property of the cache, not of the caller: asking for logits after a sequence feeds only the
suffix past the longest common prefix with the cached tokens (after cropping the rest). Rolling back is the
same call with a shorter sequence. `reuse=False` re-prefills from scratch (RaLMSpec's paper baseline).

Every operation is written once as a `Work` generator (`ragged.py`): it yields the model feeds it needs and
receives their results, so the same code runs alone (`ragged.run`, the `Session` methods without `_work`) or
interleaved with other sessions' work in one batched forward per tick (`continuous_batching.py`). A feed longer
than `chunk` tokens (a document + context prefill) is fed in chunks, so it never holds a tick for long; the
chunking depends only on the session's own sequence, so a session's numbers do not depend on its batch-mates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from services.lm.model import LoadedLM
from services.lm.prefix_cache import PrefixCache
from services.lm.ragged import Feed, KvStore, Work, run

PREFILL_CHUNK = 128  # tokens per prefill feed (RALMSPEC_PREFILL_CHUNK)


@dataclass
class Emitted:
    """Tokens from one greedy run, with the top-2 logit gap at each (the near-tie certificate)."""

    tokens: list[int] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # logit[top1] - logit[top2] at each emitted token
    forwards: int = 0  # model forward calls spent
    fed: int = 0  # tokens pushed through the model (prefill + decode)
    stopped: bool = False  # a stop token was emitted (it is included in tokens)
    drafted: int = 0  # REST: draft tree nodes proposed to the LM
    draft_accepted: int = 0  # REST: emitted tokens that were draft nodes (each verification adds one token anyway)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Session:
    """One sequence's KV cache. Not thread-safe; one session per request."""

    def __init__(self, lm: LoadedLM, chunk: int = PREFILL_CHUNK, prefixes: PrefixCache | None = None) -> None:
        self.lm = lm
        self.chunk = chunk
        self.prefixes = prefixes  # the replica's shared prefix cache (None: none)
        self.ids: list[int] = []  # tokens whose K/V are in the cache, in order
        self.store = KvStore(int(getattr(lm.model.config, "num_hidden_layers")))  # noqa: B009 - untyped config
        self._last: torch.Tensor | None = None  # [vocab] logits after self.ids
        self._hidden: torch.Tensor | None = None  # [d] final hidden state after self.ids, when it was asked for
        self.forwards = 0
        self.fed_tokens = 0  # tokens pushed through the model (prefill + decode)

    def reset(self) -> None:
        self.ids, self._last, self._hidden = [], None, None
        self.store.crop(0)

    @property
    def held(self) -> int:
        """KV slots this session holds allocated (its memory, in tokens)."""
        return self.store.capacity

    def logits_after_work(self, seq: Sequence[int], reuse: bool = True) -> Work[torch.Tensor]:
        """Next-token logits [vocab] (float32, on CPU) after `seq`, leaving the cache holding exactly `seq`."""
        keep = self.hold_prefix(seq, reuse)
        if keep == len(seq):
            return self._last  # type: ignore[return-value]  # hold_prefix: the logits after seq are cached
        self._last = (yield from self.feed_work(seq[keep:], torch.arange(keep, len(seq)), None, 1))[0]
        self.ids = list(seq)
        return self._last

    def state_after_work(self, seq: Sequence[int]) -> Work[tuple[torch.Tensor, torch.Tensor]]:
        """(final hidden state [d], logits [vocab]) after `seq`, both float32 on CPU: KNN-LM's query (the vector
        the LM head reads, after the final norm) and p_LM. Reuses the cache like `logits_after`."""
        keep = self.hold_prefix(seq)
        if keep == len(seq) and self._hidden is not None:
            return self._hidden, self._last  # type: ignore[return-value]
        keep = min(keep, len(seq) - 1)  # cached logits but no hidden state: feed the last token again
        if keep < len(self.ids):
            self.store.crop(keep)
        self._last = (yield from self.feed_work(seq[keep:], torch.arange(keep, len(seq)), None, 1, hidden=True))[0]
        self.ids = list(seq)
        return self._hidden, self._last  # type: ignore[return-value]

    def shared_prefix_work(self, seq: Sequence[int], n: int, reuse: bool = True) -> Work[None]:
        """Make the cache hold `seq[:n]` (BOS + a document: a prefix other sessions may share) computed the one
        canonical way, alone from position 0 in `chunk`-token feeds: loaded from the replica's prefix cache when
        it is there (`reuse`), else fed and offered to it. A no-op when the cache already holds that prefix (it
        was made the same way) or n is 0; the rest of `seq` is the caller's to feed. `reuse=False` (the paper
        baseline) recomputes the prefix and leaves the prefix cache alone."""
        if not 0 < n < len(seq):
            if n:
                raise ValueError(f"a shared prefix of {n} tokens must leave some of the {len(seq)} to feed")
            return
        if reuse and _common_prefix(self.ids, seq) >= n:
            return
        ids = tuple(seq[:n])
        self.reset()
        hit = self.prefixes.get(ids) if reuse and self.prefixes is not None else None
        if hit is not None:
            self.store.load(hit)
        else:
            yield from self.feed_work(ids, torch.arange(n), None, 0)
            if reuse and self.prefixes is not None:
                self.prefixes.put(ids, self.store.snapshot(n))
        self.ids = list(ids)

    def hold_prefix(self, seq: Sequence[int], reuse: bool = True) -> int:
        """Crop (or reset) the cache to the longest prefix of `seq` it can serve and return that prefix's length.
        It is len(seq) only when the cache already holds exactly `seq` with its logits (`last`); otherwise at
        least the last token of `seq` is left to feed."""
        if not seq:
            raise ValueError("cannot run the LM on an empty sequence")
        keep = _common_prefix(self.ids, seq) if reuse else 0
        if keep == len(seq) == len(self.ids) and self._last is not None:
            return keep
        keep = min(keep, len(seq) - 1)  # the last token must be fed to get its logits
        self._hidden = None
        self.store.crop(keep)
        self.ids, self._last = list(seq[:keep]), None
        return keep

    @property
    def last(self) -> torch.Tensor | None:
        """[vocab] logits after `ids`, when known."""
        return self._last

    def feed_work(self, tokens: Sequence[int], positions: torch.Tensor, allowed: torch.Tensor | None,
                  keep_logits: int, hidden: bool = False) -> Work[torch.Tensor]:
        """Feed `tokens` [n] at `positions` [n] after the cached ones, appending their K/V; returns the logits
        [keep_logits, vocab] (float32, on CPU) of the last `keep_logits` tokens. `allowed` None (causal) or a bool
        [n, cached + n] (True = attend) for one feed. The caller owns `ids`/`last` afterwards (see `compact`).
        `hidden`: also keep the last token's final hidden state (the input of the LM head) for `state_after`.
        A causal feed longer than `chunk` goes in chunks; only the last one returns logits."""
        tokens = list(tokens)
        cut = 0
        if allowed is None:
            while len(tokens) - cut > self.chunk:
                yield from self._feed(tokens[cut: cut + self.chunk], positions[cut: cut + self.chunk], None, 0, False)
                cut += self.chunk
        return (yield from self._feed(tokens[cut:], positions[cut:], allowed, keep_logits, hidden))

    def _feed(self, tokens: list[int], positions: torch.Tensor, allowed: torch.Tensor | None, keep: int,
              hidden: bool) -> Work[torch.Tensor]:
        fed = yield Feed(self.store, tokens, positions, keep, allowed, hidden)
        self._hidden = fed.hidden if hidden else None
        self.forwards += 1
        self.fed_tokens += len(tokens)
        return fed.logits

    def compact(self, keep: torch.Tensor, ids: Sequence[int], last: torch.Tensor) -> None:
        """Keep only the cache slots `keep` [len(ids)] (ascending), which now hold `ids`; `last` [vocab] = the
        logits after them."""
        if len(keep) != len(ids) or (len(keep) and int(keep[-1]) >= self.store.length):
            raise ValueError("compact needs one held slot per kept token")
        if torch.equal(keep, torch.arange(len(ids))):
            self.store.crop(len(ids))
        else:
            self.store.compact(keep)
        self.ids, self._last, self._hidden = list(ids), last, None

    def greedy_work(self, seq: Sequence[int], n: int, stop: frozenset[int], reuse: bool = True) -> Work[Emitted]:
        """Up to n greedy tokens after `seq`; stops after emitting a stop token. Only the first forward may
        re-prefill (reuse=False); the tokens inside the run always extend the cache."""
        out = Emitted()
        ctx = list(seq)
        before, fed = self.forwards, self.fed_tokens
        logits = yield from self.logits_after_work(ctx, reuse=reuse)
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
                logits = yield from self.logits_after_work(ctx)
        out.forwards, out.fed = self.forwards - before, self.fed_tokens - fed
        return out

    # The same operations run alone (a batch of one).
    def logits_after(self, seq: Sequence[int], reuse: bool = True) -> torch.Tensor:
        return run(self.lm, self.logits_after_work(seq, reuse))

    def state_after(self, seq: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return run(self.lm, self.state_after_work(seq))

    def greedy(self, seq: Sequence[int], n: int, stop: frozenset[int], reuse: bool = True) -> Emitted:
        return run(self.lm, self.greedy_work(seq, n, stop, reuse))
