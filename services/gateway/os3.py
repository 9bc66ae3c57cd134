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
A fourth: a depends on what runs beside the step. A speculation step of +A shares the memory bus with the
verification of the round before it, and does a cache lookup; a plain step runs alone. Measured for KNN-LM (LM
step with a verification beside it / alone): 1.15x beside a 17 ms IVF search at 2M entries, 1.18x beside a 66 ms
exact scan at 600k, 1.5x beside a 200 ms exact scan at 2M. So a is kept per kind of step: rounds are priced at
a_spec (speculation steps as measured), the plain candidate at a_plain. One a for both had OS³ speculate at 2M
(IVF, k = 1024) where a round cost more than the plain steps it replaced: 0.88x of the baseline. Before a
speculation step was measured (by this request or an earlier one, `CostMemory`), a_spec = a_plain.
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
                   allow_plain: bool = False, min_gain: float = 0.0, a_plain: float | None = None) -> int:
    """The first local maximum of E(s) / round_latency(s), searching s = 1, 2, ... up to max_stride;
    0 (do not speculate) when `allow_plain` and speculation's best rate is not `min_gain` above a plain step's,
    1 / (a_plain + b) (`a`: a speculation step's latency; `a_plain`: a plain step's, by default the same)."""
    best_s, best = 1, expected_verified(1, gamma) / round_latency(1, a, b, gamma, asynchronous)
    for s in range(2, max_stride + 1):
        value = expected_verified(s, gamma) / round_latency(s, a, b, gamma, asynchronous)
        if value <= best:
            break
        best_s, best = s, value
    if allow_plain and (1.0 + min_gain) / ((a if a_plain is None else a_plain) + _at(b, 1)) >= best:
        return 0
    return best_s


class _Samples:
    """A window of recent samples of one latency; `measured`: how many this scheduler took itself (not seeded)."""

    def __init__(self, keep: int) -> None:
        self.recent: deque = deque(maxlen=keep)
        self.measured = 0

    def add(self, sample: object) -> None:
        self.recent.append(sample)
        self.measured += 1

    def own(self) -> list:
        """The samples this scheduler measured that are still in the window."""
        kept = list(self.recent)
        return kept[len(kept) - min(self.measured, len(kept)):]


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
        self.a_spec = _Samples(config.latency_window)  # speculation steps' seconds
        self.a_plain = _Samples(config.latency_window)  # plain steps' seconds (the search not included)
        self.b = _Samples(config.latency_window)  # verifications' (batch size, seconds)

    def observe_round(self, stride: int, matched: int) -> None:
        if not 0 <= matched <= stride:
            raise ValueError(f"matched steps {matched} outside 0..{stride}")
        self._rounds.append((stride, matched))

    def observe_speculation(self, seconds: float) -> None:
        self.a_spec.add(seconds)

    def observe_plain(self, seconds: float) -> None:
        self.a_plain.add(seconds)

    def observe_verification(self, seconds: float, queries: int = 1) -> None:
        self.b.add((queries, seconds))

    def latencies(self) -> tuple[float, float]:
        """(a_spec, a_plain): medians of the recent samples (one slow step, a page fault or a first call, must not
        steer the next 16); a kind not measured yet takes the other's."""
        spec = statistics.median(self.a_spec.recent) if self.a_spec.recent else None
        plain = statistics.median(self.a_plain.recent) if self.a_plain.recent else spec
        assert plain is not None, "no step measured"
        return (plain if spec is None else spec), plain

    def verification_cost(self) -> Cost:
        """b(s) = b0 + b1·s by least squares over the recent samples (b1, b0 ≥ 0). When every sample had the same
        batch size q (nothing to fit: plain steps search one key), b(s) = mean·s/q, the CPU's scan path, where a
        batch of s costs s singles: a longer stride is not assumed cheaper to verify until it was measured so
        (assuming a constant b made KNN-LM +S pick s = 3 at 600k entries and lose 4%)."""
        n = len(self.b.recent)
        xs = [float(q) for q, _ in self.b.recent]
        ys = [t for _, t in self.b.recent]
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
        return len(self._rounds) >= need and self._measured()

    def _measured(self) -> bool:
        return bool(self.a_spec.recent or self.a_plain.recent) and bool(self.b.recent)

    def next_stride(self) -> int:
        if not self.evidence():
            return 0 if self.config.allow_plain else self.config.initial_stride
        return self._stride(self.gamma)

    def _stride(self, gamma: float) -> int:
        c = self.config
        a_spec, a_plain = self.latencies()
        return optimal_stride(a_spec, self.verification_cost(), gamma, c.asynchronous, c.max_stride, c.allow_plain,
                              c.min_gain, a_plain)

    def worth_watching(self) -> bool:
        """Whether speculation could pay at the best γ allowed (the cap), given the measured a and b. When it could
        not (iterative RaLM on a CPU: a stride costs 10-20 searches), plain steps need no shadow lookups or cache
        inserts: γ cannot change the answer. Before a and b are measured: True."""
        if not self.config.allow_plain or not self._measured():
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

    KINDS = ("a_spec", "a_plain", "b")  # the OS3 windows it keeps

    def __init__(self, keep: int = 16) -> None:
        self._kept: dict[str, deque] = {name: deque(maxlen=keep) for name in self.KINDS}
        self._lock = threading.Lock()

    def seed(self, os3: OS3) -> None:
        with self._lock:
            for name, kept in self._kept.items():
                getattr(os3, name).recent.extend(kept)

    def learn(self, os3: OS3) -> None:
        """Take in what `os3` measured itself (not what it was seeded with)."""
        own = {name: getattr(os3, name).own() for name in self.KINDS}
        with self._lock:
            for name, samples in own.items():
                self._kept[name].extend(samples)


class CostMemories:
    """One `CostMemory` per workload key, made on first use (thread-safe)."""

    def __init__(self) -> None:
        self._by_key: dict[Hashable, CostMemory] = {}
        self._lock = threading.Lock()

    def __call__(self, key: Hashable) -> CostMemory:
        with self._lock:
            return self._by_key.setdefault(key, CostMemory())
