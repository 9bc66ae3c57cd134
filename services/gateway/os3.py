"""OS³: RaLMSpec's optimal speculation stride scheduler.

One round = s speculation steps, then one batched verification. With
  a = latency of one speculation step (LM stride + cache lookup),
  b = latency of one batched verification,
  γ = probability that one speculation is correct,
the expected number of verified steps per round is E(s) = (1 - γ^s) / (1 - γ), and the scheduler picks the
s that maximises verified steps per second:
  synchronous:  E(s) / (s·a + b + (1 - γ^s)·a)
  asynchronous: E(s) / (γ^s·((s-1)·a + max(a, b)) + (1 - γ^s)·(s·a + b + a))
    (all s guesses right: the last verification overlaps the next round's first step; otherwise the round
    pays the full verification). s grows from 1 while the objective still improves.
Two additions to the paper's objective, both exact accounting rather than new heuristics:
- `(1 - γ^s)·a`: a round with a mismatch also redoes the wrong step with the true document (E(s) counts
  that step as verified, so its cost belongs to the round too);
- s = 0, a plain retrieval step (a + b, always right), is a candidate: where verification is cheap next to
  a wrong guess (an LM on 2 CPU cores, a small index), not speculating is optimal, and the paper's search,
  which starts at s = 1, would lose time to every wrong guess.
γ is estimated online as ΣM / (ΣM + #{rounds with M < s}) over a window of recent rounds (M = matched
steps), capped (RaLMSpec's code caps it at 0.6) so one lucky window cannot push s far out.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


def expected_verified(s: int, gamma: float) -> float:
    """E(s) = 1 + γ + ... + γ^(s-1): verified steps per round of stride s."""
    return float(s) if gamma >= 1.0 else (1.0 - gamma**s) / (1.0 - gamma)


def round_latency(s: int, a: float, b: float, gamma: float, asynchronous: bool) -> float:
    hit = gamma**s
    if not asynchronous:
        return s * a + b + (1.0 - hit) * a
    return hit * ((s - 1) * a + max(a, b)) + (1.0 - hit) * (s * a + b + a)


def optimal_stride(a: float, b: float, gamma: float, asynchronous: bool = False, max_stride: int = 16,
                   allow_plain: bool = False) -> int:
    """The first local maximum of E(s) / round_latency(s), searching s = 1, 2, ... up to max_stride;
    0 (do not speculate) when `allow_plain` and a plain step, 1 / (a + b), is at least as fast."""
    best_s, best = 1, expected_verified(1, gamma) / round_latency(1, a, b, gamma, asynchronous)
    for s in range(2, max_stride + 1):
        value = expected_verified(s, gamma) / round_latency(s, a, b, gamma, asynchronous)
        if value <= best:
            break
        best_s, best = s, value
    if allow_plain and 1.0 / (a + b) >= best:
        return 0
    return best_s


@dataclass(frozen=True)
class OS3Config:
    window: int = 5  # rounds in the γ estimate (RaLMSpec's code: 5)
    gamma_cap: float = 0.6  # RaLMSpec's code caps γ at 0.6
    max_stride: int = 16
    initial_stride: int = 3  # before any round has been observed (the paper's fixed stride)
    asynchronous: bool = False
    latency_window: int = 16  # recent a / b samples averaged
    allow_plain: bool = True  # s = 0 (plain retrieval step) is a candidate


class OS3:
    """Online scheduler: feed it each round's outcome and the measured latencies, ask for the next stride."""

    def __init__(self, config: OS3Config = OS3Config()) -> None:
        self.config = config
        self._rounds: deque[tuple[int, int]] = deque(maxlen=config.window)  # (stride s, matched M)
        self._a: deque[float] = deque(maxlen=config.latency_window)
        self._b: deque[float] = deque(maxlen=config.latency_window)

    def observe_round(self, stride: int, matched: int) -> None:
        if not 0 <= matched <= stride:
            raise ValueError(f"matched steps {matched} outside 0..{stride}")
        self._rounds.append((stride, matched))

    def observe_speculation(self, seconds: float) -> None:
        self._a.append(seconds)

    def observe_verification(self, seconds: float) -> None:
        self._b.append(seconds)

    @property
    def gamma(self) -> float:
        matched = sum(m for _, m in self._rounds)
        misses = sum(1 for s, m in self._rounds if m < s)
        if matched + misses == 0:
            return 0.0
        return min(self.config.gamma_cap, matched / (matched + misses))

    def next_stride(self) -> int:
        if not self._rounds or not self._a or not self._b:
            return self.config.initial_stride
        a = sum(self._a) / len(self._a)
        b = sum(self._b) / len(self._b)
        return optimal_stride(a, b, self.gamma, self.config.asynchronous, self.config.max_stride,
                              self.config.allow_plain)
