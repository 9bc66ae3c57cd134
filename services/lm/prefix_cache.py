"""The replica's prefix cache: the keys and values of shared sequence prefixes (BOS + a retrieved document), kept
across sessions so that a document another request (or this one, a few strides ago) already read costs a copy
instead of a prefill. vLLM calls this automatic prefix caching.

Iterative RaLM puts the retrieved document in front of the context, so every retrieval that changes the document
re-prefills document + prompt + answer so far; at 256 document tokens that is ~80% of each re-prefill, and on a
CPU a prefill costs ~4 ms a token. The same documents recur within a request (A -> B -> A) and across requests.

Bit-stability: a cached prefix is only ever computed one way, alone from position 0 in `chunk`-token feeds
(`Session.shared_prefix_work`), and a session whose cache does not already hold the prefix computes it that
way too, so loaded or computed, a prefix's keys and values are the same bits; whether another request put it in
the cache never shows in a request's tokens. Entries are kept least-recently-used within a token budget
(`RALMSPEC_PREFIX_CACHE_TOKENS`, 0 = off).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

Prefix = tuple[int, ...]  # the token ids of a prefix (the key)
Layers = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer: (keys, values) [kv heads, n, head dim]


@dataclass
class PrefixStats:
    hits: int = 0
    misses: int = 0
    tokens_reused: int = 0  # prefix tokens loaded instead of fed
    evicted: int = 0


class PrefixCache:
    """Prefixes' keys and values by token ids, least-recently-used within `budget_tokens`. Thread-safe (in-process
    engines run sessions on several threads; the LM service on its scheduler thread)."""

    def __init__(self, budget_tokens: int) -> None:
        self.budget = budget_tokens
        self.held = 0  # tokens of all entries
        self.stats = PrefixStats()
        self._entries: OrderedDict[Prefix, Layers] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, ids: Prefix) -> Layers | None:
        with self._lock:
            hit = self._entries.get(ids)
            if hit is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(ids)
            self.stats.hits += 1
            self.stats.tokens_reused += len(ids)
            return hit

    def put(self, ids: Prefix, layers: Layers) -> None:
        """Keep `layers` (copies the caller will not write to) for `ids`, evicting the least recently used."""
        n = len(ids)
        if n == 0 or n > self.budget:
            return
        with self._lock:
            if ids in self._entries:
                self._entries.move_to_end(ids)
                return
            while self.held + n > self.budget:
                old, _ = self._entries.popitem(last=False)
                self.held -= len(old)
                self.stats.evicted += 1
            self._entries[ids] = layers
            self.held += n
