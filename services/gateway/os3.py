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
No gamble before evidence: with s = 0 allowed, the scheduler takes plain steps until it has measured a, b and
`min_rounds` outcomes (plain steps observe all three for free: their step time, their search, and a shadow
lookup of the cache that says whether a guess would have been right). RaLMSpec's code starts at a fixed stride;
on a CPU, where a wrong document guess costs a document prefill (~0.5 s) and the search it saves 5-30 ms,
that first unprofitable round cost more than a whole request could win back.
A third addition: b depends on s. The paper treats a batched verification as one cost, which holds on a GPU;
on a CPU a batch of s exact searches costs up to s single ones (FAISS scans once per query below its BLAS
threshold, `services/retriever/dense.py`). So b(s) = b0 + b1·s is fitted online by least squares over recent
(batch size, seconds) samples, and the scheduler sees that a longer stride buys no cheaper verification.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

Cost = float | Callable[[int], float]  # verification latency: a constant, or a function of the batch size s


def _at(b: Cost, s: int) -> float:
    return b(s) if callable(b) else b


def expected_verified(s: int, gamma: float) -> float:
    """E(s) = 1 + γ + ... + γ^(s-1): verified steps per round of stride s."""
    return float(s) if gamma >= 1.0 else (1.0 - gamma**s) / (1.0 - gamma)


def round_latency(s: int, a: float, b: Cost, gamma: float, asynchronous: bool) -> float:
    b = _at(b, s)
    hit = gamma**s
    if not asynchronous:
        return s * a + b + (1.0 - hit) * a
    return hit * ((s - 1) * a + max(a, b)) + (1.0 - hit) * (s * a + b + a)


def optimal_stride(a: float, b: Cost, gamma: float, asynchronous: bool = False, max_stride: int = 16,
                   allow_plain: bool = False, min_gain: float = 0.0) -> int:
    """The first local maximum of E(s) / round_latency(s), searching s = 1, 2, ... up to max_stride;
    0 (do not speculate) when `allow_plain` and speculation's best rate is not `min_gain` above a plain step's,
    1 / (a + b)."""
    best_s, best = 1, expected_verified(1, gamma) / round_latency(1, a, b, gamma, asynchronous)
    for s in range(2, max_stride + 1):
        value = expected_verified(s, gamma) / round_latency(s, a, b, gamma, asynchronous)
        if value <= best:
            break
        best_s, best = s, value
    if allow_plain and (1.0 + min_gain) / (a + _at(b, 1)) >= best:
        return 0
    return best_s


@dataclass(frozen=True)
class OS3Config:
    window: int = 5  # rounds in the γ estimate (RaLMSpec's code: 5)
    gamma_cap: float = 0.6  # RaLMSpec's code caps γ at 0.6
    max_stride: int = 16
    initial_stride: int = 3  # before any evidence, when plain steps are not allowed (the paper's fixed stride)
    min_rounds: int = 3  # outcomes observed before the first speculation (with allow_plain)
    asynchronous: bool = False
    latency_window: int = 16  # recent a / b samples averaged
    allow_plain: bool = True  # s = 0 (plain retrieval step) is a candidate
    # Speculate only when the model predicts at least this gain over plain steps: what it does not price (cache
    # lookups, inserts, the LM slowed by a verification on the other core; a few % measured) must not flip it.
    min_gain: float = 0.05


class OS3:
    """Online scheduler: feed it each round's outcome and the measured latencies, ask for the next stride."""

    def __init__(self, config: OS3Config = OS3Config()) -> None:
        self.config = config
        self._rounds: deque[tuple[int, int]] = deque(maxlen=config.window)  # (stride s, matched M)
        self._a: deque[float] = deque(maxlen=config.latency_window)
        self._b: deque[tuple[int, float]] = deque(maxlen=config.latency_window)  # (batch size, seconds)
        self.measured_a = self.measured_b = 0  # samples this scheduler measured itself (not seeded)

    def observe_round(self, stride: int, matched: int) -> None:
        if not 0 <= matched <= stride:
            raise ValueError(f"matched steps {matched} outside 0..{stride}")
        self._rounds.append((stride, matched))

    def observe_speculation(self, seconds: float) -> None:
        self._a.append(seconds)
        self.measured_a += 1

    def observe_verification(self, seconds: float, queries: int = 1) -> None:
        self._b.append((queries, seconds))
        self.measured_b += 1

    def verification_cost(self) -> Cost:
        """b(s) = b0 + b1·s by least squares over the recent samples (b1, b0 ≥ 0). When every sample had the same
        batch size q (nothing to fit: plain steps search one key), b(s) = mean·s/q, the CPU's scan path, where a
        batch of s costs s singles: a longer stride is not assumed cheaper to verify until it was measured so
        (assuming a constant b made KNN-LM +S pick s = 3 at 600k entries and lose 4%)."""
        n = len(self._b)
        xs = [float(q) for q, _ in self._b]
        ys = [t for _, t in self._b]
        mx, my = sum(xs) / n, sum(ys) / n
        sxx = sum((x - mx) ** 2 for x in xs)
        if sxx == 0.0:
            return lambda s: my * s / mx
        b1 = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx)
        b0 = max(0.0, my - b1 * mx)
        return lambda s: b0 + b1 * s

    @property
    def gamma(self) -> float:
        matched = sum(m for _, m in self._rounds)
        misses = sum(1 for s, m in self._rounds if m < s)
        if matched + misses == 0:
            return 0.0
        return min(self.config.gamma_cap, matched / (matched + misses))

    def evidence(self) -> bool:
        """Whether a, b and γ have been measured (γ over at least `min_rounds` outcomes with allow_plain)."""
        need = self.config.min_rounds if self.config.allow_plain else 1
        return len(self._rounds) >= need and bool(self._a) and bool(self._b)

    def next_stride(self) -> int:
        if not self.evidence():
            return 0 if self.config.allow_plain else self.config.initial_stride
        return self._stride(self.gamma)

    def _stride(self, gamma: float) -> int:
        c = self.config
        a = statistics.median(self._a)  # one slow step (a page fault, a first call) must not steer the next 16
        return optimal_stride(a, self.verification_cost(), gamma, c.asynchronous, c.max_stride, c.allow_plain,
                              c.min_gain)

    def worth_watching(self) -> bool:
        """Whether speculation could pay at the best γ allowed (the cap), given the measured a and b. When it could
        not (iterative RaLM on a CPU: a stride costs 10-20 searches), plain steps need no shadow lookups or cache
        inserts: γ cannot change the answer. Before a and b are measured: True."""
        if not self.config.allow_plain or not self._a or not self._b:
            return True
        return self._stride(self.config.gamma_cap) > 0


class CostMemory:
    """a and b as earlier requests measured them, for one engine and workload (RaLM: retriever and stride;
    KNN-LM: index and k). They are the machine's costs, not the request's, so a new request starts from them:
    when they say that even γ at its cap could not pay (`OS3.worth_watching`), its plain steps are the
    baseline's from the first one (no shadow lookup, no cache insert, the cache never opened), where a request
    measuring them itself spent its first steps watching: most of a short QA answer (1-2 strides). γ is the
    request's own: speculation still waits for its own shadow lookups. Every request's plain steps keep
    measuring a and b, and `learn` takes them in, so the memory follows the machine. Thread-safe."""

    def __init__(self, keep: int = 16) -> None:
        self._a: deque[float] = deque(maxlen=keep)
        self._b: deque[tuple[int, float]] = deque(maxlen=keep)
        self._lock = threading.Lock()

    def seed(self, os3: OS3) -> None:
        with self._lock:
            os3._a.extend(self._a)
            os3._b.extend(self._b)

    def learn(self, os3: OS3) -> None:
        """Take in what `os3` measured itself (not what it was seeded with)."""
        a, b = list(os3._a), list(os3._b)
        with self._lock:
            self._a.extend(a[len(a) - min(os3.measured_a, len(a)):])
            self._b.extend(b[len(b) - min(os3.measured_b, len(b)):])


class CostMemories:
    """One `CostMemory` per workload key, made on first use (thread-safe)."""

    def __init__(self) -> None:
        self._by_key: dict[Hashable, CostMemory] = {}
        self._lock = threading.Lock()

    def __call__(self, key: Hashable) -> CostMemory:
        with self._lock:
            return self._by_key.setdefault(key, CostMemory())
