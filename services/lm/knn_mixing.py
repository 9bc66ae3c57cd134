"""KNN-LM interpolation: p(y) = λ·p_kNN(y) + (1 − λ)·p_LM(y).

p_kNN is a softmax over the negative squared L2 distances of the k neighbours (divided by a temperature),
summed per neighbour value (the token that followed the neighbour's context). The mixture is formed in
float64 log space, so the top-2 gap of a greedy choice (the near-tie certificate) is a log-probability gap.
Defaults are kNN-LM's: k = 1024, λ = 0.25, temperature 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from services.common.errors import InvalidRequest
from services.lm.model import LoadedLM
from services.lm.types import KnnLmConfig

# (queries [q, d] float32, k, index) -> (squared L2 distances [q, k], entry ids [q, k], -1 = none)
Search = Callable[[np.ndarray, int, str], tuple[np.ndarray, np.ndarray]]


def log_mixture(logits: torch.Tensor, dists: np.ndarray, tokens: np.ndarray, cfg: KnnLmConfig) -> torch.Tensor:
    """log p [vocab] float64 from the LM's logits [vocab] and the neighbours' squared distances [m] and values
    [m] (m ≤ k; a padded neighbour has token −1 and is ignored; no neighbour at all gives p_LM)."""
    log_lm = torch.log_softmax(logits.double(), -1)
    real = tokens >= 0
    if cfg.lam == 0.0 or not real.any():
        return log_lm
    d = torch.from_numpy(np.asarray(dists, dtype=np.float64)[real])
    tok = torch.from_numpy(np.asarray(tokens, dtype=np.int64)[real])
    w = torch.softmax(-d / cfg.temperature, 0)  # [m]
    p_knn = torch.zeros_like(log_lm).index_add_(0, tok, w)  # [vocab], aggregated by token
    if cfg.lam == 1.0:
        return torch.log(p_knn)
    return torch.logaddexp(math.log(cfg.lam) + torch.log(p_knn), math.log1p(-cfg.lam) + log_lm)


def next_token(logits: torch.Tensor, dists: np.ndarray, tokens: np.ndarray, cfg: KnnLmConfig) -> tuple[int, float]:
    """Greedy KNN-LM token and its top-2 log-probability gap."""
    top = torch.topk(log_mixture(logits, dists, tokens, cfg), 2)
    return int(top.indices[0]), float(top.values[0] - top.values[1])


def log_prob(logits: torch.Tensor, dists: np.ndarray, tokens: np.ndarray, cfg: KnnLmConfig, target: int) -> float:
    """log p(target) under the mixture (perplexity)."""
    return float(log_mixture(logits, dists, tokens, cfg)[target])


@dataclass
class Perplexity:
    tokens: int  # predicted tokens
    lm: float  # perplexity of the LM alone
    knnlm: list[float]  # perplexity of the interpolation, one per config


@torch.inference_mode()
def perplexity(lm: LoadedLM, texts: Sequence[Sequence[int]], search: Search, values: np.ndarray,
               configs: Sequence[KnnLmConfig], max_len: int = 512) -> Perplexity:
    """Perplexity of token-id texts (each cut to `max_len`) under the LM alone and under KNN-LM with each config
    (which must share k and index: the neighbours are searched once), from one forward and one batched datastore
    search per text (every position's query at once)."""
    if not configs or len({(c.k, c.index) for c in configs}) != 1:
        raise InvalidRequest("perplexity configs must share k and index")
    k, index = configs[0].k, configs[0].index
    nll_lm, nll_knn, n = 0.0, [0.0] * len(configs), 0
    for ids in texts:
        ids = list(ids)[:max_len]
        if len(ids) < 2:
            continue
        out = lm.model(input_ids=torch.tensor([ids], device=lm.device), output_hidden_states=True)
        hidden = out.hidden_states[-1][0, :-1].float().cpu().numpy()  # [L-1, d]: queries for tokens 1..L-1
        logits = out.logits[0, :-1].float().cpu()  # [L-1, vocab]
        dists, found = search(np.ascontiguousarray(hidden), k, index)
        for j, target in enumerate(ids[1:]):
            vals = np.where(found[j] >= 0, values[np.maximum(found[j], 0)], -1)
            nll_lm -= float(torch.log_softmax(logits[j].double(), -1)[target])
            for c, cfg in enumerate(configs):
                nll_knn[c] -= log_prob(logits[j], dists[j], vals, cfg, target)
            n += 1
    if n == 0:
        raise InvalidRequest("perplexity needs at least one text of two or more tokens")
    return Perplexity(n, math.exp(nll_lm / n), [math.exp(x / n) for x in nll_knn])
