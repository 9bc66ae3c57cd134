"""What the gateway's controller drives, behind one interface per service, in either runtime.

- in-process (`local_backends`): engine objects called directly (library API, tests, algorithm benchmarks);
- distributed (`services/gateway/remote.py`): the same calls as messages over Redis streams to the services.
The controller (`ralm.py`, `ralmspec.py`) sees only these protocols, so both runtimes emit the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from services.common.errors import InvalidRequest
from services.datastore.draft_tree import DraftTree
from services.datastore.proposers import LocalDrafts
from services.datastore.rest_datastore import RestDatastore
from services.datastore.speculation_cache import SpeculationCache
from services.lm.decoder import Emitted
from services.lm.engine import LmEngine
from services.lm.types import SamplingParams
from services.retriever.retriever import Retriever
from services.retriever.types import Hit, QueryKey


class LmBackend(Protocol):
    def open(self) -> str: ...

    def step(self, sid: str, seq: Sequence[int], n: int, stop_at_newline: bool,
             reprefill: bool = False, tree: DraftTree | None = None,
             sampling: SamplingParams | None = None, prefix: int = 0) -> Emitted: ...

    def close(self, sid: str) -> bool: ...


class Cache(Protocol):
    """One request's speculation cache."""

    def insert(self, pids: Sequence[int]) -> int: ...

    def lookup(self, key: QueryKey, k: int = 1) -> list[Hit]: ...

    def __len__(self) -> int: ...

    def close(self) -> None: ...


class CacheBackend(Protocol):
    def open(self, retriever: str) -> Cache: ...


class VerifyBackend(Protocol):
    def verify(self, retriever: str, keys: Sequence[QueryKey], guesses: Sequence[int], k: int) -> list[list[Hit]]:
        """The true top-k of each key, in one batched search."""
        ...


class DraftBackend(Protocol):
    def propose(self, kind: str, context: Sequence[int], budget: int) -> DraftTree:
        """A draft tree of at most `budget` nodes continuing `context`; kind: rest | prompt | both."""
        ...


@dataclass
class Backends:
    lm: LmBackend
    retrievers: dict[str, Retriever]  # embed + search (the baseline) for each retriever name
    caches: CacheBackend
    verifier: VerifyBackend
    drafts: DraftBackend | None = None  # REST / prompt-lookup drafting (None: no datastore loaded)


def drafted_decode(backends: Backends, sid: str, seq: Sequence[int], n: int, stop_at_newline: bool, draft: str,
                   budget: int, sampling: SamplingParams | None = None, *,
                   clock: Callable[[], None] = lambda: None, prefix: int = 0) -> Emitted:
    """Up to n tokens after `seq` by REST: draft a tree, verify it in one LM forward, re-draft after each step
    (the context grew), until n tokens or a stop token. Greedy tokens (the same as plain greedy decoding), or with
    `sampling` sampled ones (distributed exactly as plain sampling's; each step seeds from its position).
    `clock` is checked before every step (the request's deadline and cancellation); `prefix`: the shared prefix
    (BOS + document) in front of `seq`, see `LmEngine.step_work`."""
    if backends.drafts is None:
        raise InvalidRequest("drafting needs the REST datastore, which this runtime did not load")
    out = Emitted()
    while len(out.tokens) < n and not out.stopped:
        clock()
        ctx = list(seq) + out.tokens
        tree = backends.drafts.propose(draft, ctx, budget)
        e = backends.lm.step(sid, ctx, n - len(out.tokens), stop_at_newline, tree=tree, sampling=sampling,
                             prefix=prefix)
        if len(tree.tokens):  # a tree step emits its accepted path and one token more (fewer at a stop or n)
            out.drafted += len(tree.tokens)
            out.draft_accepted += min(len(tree.tokens), max(0, len(e.tokens) - 1))
        out.tokens += e.tokens
        out.gaps += e.gaps
        out.forwards += e.forwards
        out.fed += e.fed
        out.stopped = e.stopped
    return out


class LocalCache(SpeculationCache):
    def close(self) -> None:
        pass


@dataclass
class LocalCaches:
    retrievers: dict[str, Retriever]

    def open(self, retriever: str) -> Cache:
        return LocalCache(self.retrievers[retriever].score)


@dataclass
class LocalVerifier:
    retrievers: dict[str, Retriever]

    def verify(self, retriever: str, keys: Sequence[QueryKey], guesses: Sequence[int], k: int) -> list[list[Hit]]:
        return self.retrievers[retriever].search_embedded(keys, k)


def local_backends(lm: LmEngine, retrievers: dict[str, Retriever], datastore: RestDatastore | None = None) -> Backends:
    return Backends(lm, retrievers, LocalCaches(retrievers), LocalVerifier(retrievers), LocalDrafts(datastore))
