"""The LM's request value types: light (no torch), so codecs and other services read them without loading a model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from services.common.bounds import Bound
from services.common.errors import InvalidRequest
from services.retriever.types import check_knn_index, check_knn_k

KNN_LAM = Bound(0.0, 1.0)  # λ, the weight of p_kNN
# The softmax over -d/T: on tiny the k = 1024 neighbours' squared distances d lie in ~300-2200 (gap between the
# first two ~20), so at T = 1e-3 p_kNN is all on the nearest neighbour and at 1e3 within ~2x of uniform. Beyond,
# only the arithmetic changes: a subnormal T makes every -d/T = -inf and p_kNN NaN.
KNN_TEMPERATURE = Bound(1e-3, 1e3)


@dataclass(frozen=True)
class SamplingParams:
    """Sampled decoding's settings (`sampling.py` draws with them)."""

    temperature: float = 0.0  # 0: greedy; > 0: softmax(logits / temperature)
    top_p: float = 1.0  # nucleus: keep the smallest most-likely set with this much mass; 1: keep every token
    seed: int | None = None  # per request: the same seed and request give the same tokens; None: not replayable

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> SamplingParams:
        """Self, or InvalidRequest naming the bad value."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequest(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:  # NaN fails this too
            raise InvalidRequest(f"top_p must be in (0, 1] (1 = no nucleus cut), got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 1 << 64:
            raise InvalidRequest(f"seed must be an unsigned 64-bit integer, got {self.seed}")
        return self


@dataclass(frozen=True)
class KnnLmConfig:
    """KNN-LM's settings (`knn_mixing.py`): the search half (k, index) follows the retriever's KNN rules."""

    k: int = 1024  # neighbours per token
    lam: float = 0.25  # weight of p_kNN
    temperature: float = 1.0  # of the softmax over negative distances
    index: str = "exact"  # exact (FAISS flat L2) | approx (IVF)

    def validate(self) -> None:
        check_knn_k(self.k)
        KNN_LAM.check("lambda (the kNN weight)", self.lam)
        KNN_TEMPERATURE.check("the kNN temperature", self.temperature)
        check_knn_index(self.index)


@dataclass(frozen=True, eq=False)
class Draft:
    """A draft tree as the LM verifies it (`tree_attention.py`): nodes in BFS order, each parent before its children."""

    tokens: np.ndarray  # [n] int64 token of each node
    parents: np.ndarray  # [n] int64 parent node index, -1 for children of the root
