"""OS³ with the worked examples of anchors.md (pure logic)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.gateway.os3 import OS3, OS3Config, expected_verified, optimal_stride, round_latency


@pytest.mark.parametrize("gamma,want", [(0.3, 3), (0.6, 6)])
def test_expensive_verification_wants_longer_strides(gamma, want):
    assert optimal_stride(a=0.1, b=4.3, gamma=gamma) == want


def test_cheap_verification_wants_stride_one():
    assert optimal_stride(a=0.1, b=0.03, gamma=0.6) == 1
    assert optimal_stride(a=0.1, b=0.03, gamma=0.6, asynchronous=True) == 1


def test_cheap_verification_and_costly_misses_mean_do_not_speculate():
    # an LM stride on 2 CPU cores (0.5 s) against a 30 ms search: a wrong guess costs more than waiting
    assert optimal_stride(a=0.5, b=0.03, gamma=0.6, allow_plain=True) == 0
    assert optimal_stride(a=0.5, b=0.03, gamma=0.6, asynchronous=True, allow_plain=True) == 0
    # the paper's regime (retrieval dominates): speculation wins, plain steps allowed or not
    assert optimal_stride(a=0.1, b=4.3, gamma=0.6, allow_plain=True) == 6
    assert optimal_stride(a=0.1, b=0.09, gamma=0.95, asynchronous=True, allow_plain=True) >= 1


def test_expected_verified_is_the_geometric_sum():
    assert expected_verified(1, 0.5) == 1.0
    assert expected_verified(3, 0.5) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_verified(4, 1.0) == 4.0


def test_async_round_hides_verification_when_all_guesses_hit():
    # γ = 1: every round overlaps verification with the next step: (s-1)·a + max(a, b)
    assert round_latency(3, a=0.1, b=0.05, gamma=1.0, asynchronous=True) == pytest.approx(0.3)
    # γ = 0: the full round, plus redoing the wrong step
    assert round_latency(3, a=0.1, b=0.05, gamma=0.0, asynchronous=True) == pytest.approx(0.45)
    assert round_latency(3, a=0.1, b=0.05, gamma=0.5, asynchronous=False) == pytest.approx(0.35 + 0.875 * 0.1)


@given(st.floats(0.001, 1.0), st.floats(0.001, 10.0), st.floats(0.0, 0.95), st.booleans())
def test_chosen_stride_is_a_local_maximum(a, b, gamma, asynchronous):
    s = optimal_stride(a, b, gamma, asynchronous, max_stride=64)

    def value(x: int) -> float:
        return expected_verified(x, gamma) / round_latency(x, a, b, gamma, asynchronous)

    assert 1 <= s <= 64
    assert s == 1 or value(s) > value(s - 1)
    assert s == 64 or value(s + 1) <= value(s)


def test_online_gamma_over_a_window_with_cap():
    os3 = OS3(OS3Config(window=5, gamma_cap=0.6, allow_plain=False))
    assert os3.gamma == 0.0 and os3.next_stride() == 3  # nothing observed yet: the initial stride
    for _ in range(5):
        os3.observe_round(stride=4, matched=1)  # ΣM = 5, 5 rounds with M < s
    assert os3.gamma == pytest.approx(0.5)
    for _ in range(5):
        os3.observe_round(stride=4, matched=4)  # all hit: raw γ = 1, capped
    assert os3.gamma == 0.6


def test_online_stride_follows_measured_latencies():
    os3 = OS3(OS3Config(gamma_cap=0.6, allow_plain=False))
    for _ in range(5):
        os3.observe_round(4, 4)
    os3.observe_speculation(0.1)
    os3.observe_verification(4.3, 1)
    os3.observe_verification(4.3, 4)  # the paper's regime: a batch costs what one query costs (a GPU)
    assert os3.next_stride() == 6
    with pytest.raises(ValueError):
        os3.observe_round(2, 3)
    plain = OS3(OS3Config(allow_plain=True))
    for _ in range(5):
        plain.observe_round(1, 1)
    plain.observe_speculation(0.5)
    plain.observe_verification(0.03)
    assert plain.next_stride() == 0


def test_verification_that_costs_per_query_removes_the_incentive_to_speculate():
    # the paper's regime with a constant batched cost speculates; if a batch of s costs s single searches
    # (exact search on a CPU), nothing is saved by batching and a plain step is optimal
    assert optimal_stride(a=0.1, b=4.3, gamma=0.6, allow_plain=True) == 6
    assert optimal_stride(a=0.1, b=lambda s: 4.3 * s, gamma=0.6, allow_plain=True) == 0
    # a fixed cost plus a small per-query cost (a BLAS product) still rewards batching
    assert optimal_stride(a=0.1, b=lambda s: 4.0 + 0.1 * s, gamma=0.6, allow_plain=True) >= 3


def test_online_fit_of_the_verification_cost():
    os3 = OS3(OS3Config())
    for q, t in [(1, 0.05), (3, 0.15), (5, 0.25), (1, 0.05)]:
        os3.observe_verification(t, q)
    cost = os3.verification_cost()
    assert callable(cost) and cost(4) == pytest.approx(0.2) and cost(1) == pytest.approx(0.05)
    same = OS3(OS3Config())
    for t in (0.1, 0.3):
        same.observe_verification(t, 2)
    cost = same.verification_cost()  # one batch size: nothing to fit; the mean, scaled per query (a CPU scan)
    assert callable(cost) and cost(2) == pytest.approx(0.2) and cost(4) == pytest.approx(0.4)


def test_no_speculation_before_evidence():
    # plain steps allowed: plain until a, b and min_rounds outcomes are measured, whatever γ looks like
    os3 = OS3(OS3Config(min_rounds=3, asynchronous=True))
    assert os3.next_stride() == 0
    os3.observe_speculation(0.06)
    os3.observe_verification(0.05)  # KNN-LM at 600k: a 60 ms LM step, a 50 ms search
    for n in range(3):
        assert os3.next_stride() == 0, n
        os3.observe_round(1, 1)  # shadow lookups that would have been right
    assert os3.evidence() and os3.next_stride() >= 1


def test_plain_steps_stop_watching_where_no_gamma_could_pay():
    # iterative RaLM on a CPU: a 0.4 s stride against a 20 ms search; even γ at its cap cannot make a guess pay
    ralm = OS3(OS3Config(asynchronous=True, gamma_cap=0.6))
    assert ralm.worth_watching()  # nothing measured yet
    ralm.observe_speculation(0.4)
    ralm.observe_verification(0.02)
    assert not ralm.worth_watching()
    # KNN-LM at 600k entries: a 120 ms step, a 35 ms search: worth measuring γ for
    knn = OS3(OS3Config(asynchronous=True, gamma_cap=0.95))
    knn.observe_speculation(0.12)
    knn.observe_verification(0.035)
    assert knn.worth_watching()
    # the margin: a predicted gain of ~1% (a 7 ms IVF search) is not taken
    assert optimal_stride(0.12, 0.007, 0.95, asynchronous=True, allow_plain=True, min_gain=0.05) == 0
    assert optimal_stride(0.12, 0.007, 0.95, asynchronous=True, allow_plain=True) >= 1


def test_cost_memory_starts_a_request_from_earlier_costs_and_learns_only_what_it_measured():
    from services.gateway.os3 import CostMemories

    memories = CostMemories()
    memory = memories(("exact", 4))
    assert memories(("exact", 4)) is memory and memories(("exact", 2)) is not memory
    first = OS3(OS3Config())
    memory.seed(first)
    assert first.worth_watching()  # nothing known yet: watch
    first.observe_speculation(0.5)  # a stride's decode with its re-prefill (RaLM on a CPU)
    first.observe_verification(0.01)  # a search
    assert not first.worth_watching()  # no γ could pay for a 0.5 s step with a 10 ms search
    memory.learn(first)
    second = OS3(OS3Config())
    memory.seed(second)
    assert not second.worth_watching()  # from its first step: no shadow lookups, the baseline's step
    assert (second.a_spec.measured, second.b.measured) == (0, 0)
    second.observe_speculation(0.4)
    second.observe_plain(0.3)
    memory.learn(second)  # only the 0.4 it measured, not the seeded 0.5 again
    third = OS3(OS3Config())
    memory.seed(third)
    assert sorted(third.a_spec.recent) == [0.4, 0.5] and list(third.a_plain.recent) == [0.3]
    assert list(third.b.recent) == [(1, 0.01)]


def test_a_speculation_step_slowed_by_the_verification_beside_it_is_priced_as_measured():
    # KNN-LM at 2M entries, IVF, k = 1024 (measured): a 131 ms LM step alone, 151 ms beside an asynchronous
    # verification (memory bus shared), a 17 ms search. One a for both speculated and lost (0.88x).
    assert optimal_stride(0.131, 0.017, 0.95, asynchronous=True, allow_plain=True, min_gain=0.05) >= 1
    assert optimal_stride(0.151, 0.017, 0.95, asynchronous=True, allow_plain=True, min_gain=0.05, a_plain=0.131) == 0
    # 600k, exact: 132 ms alone, 156 ms beside a 66 ms scan: still worth speculating
    assert optimal_stride(0.156, 0.066, 0.95, asynchronous=True, allow_plain=True, min_gain=0.05, a_plain=0.132) == 1
    os3 = OS3(OS3Config(asynchronous=True, gamma_cap=0.95))
    for _ in range(5):
        os3.observe_round(1, 1)
    os3.observe_plain(0.131)
    os3.observe_verification(0.017)
    assert os3.latencies() == (0.131, 0.131)  # no speculation step measured yet: a_spec = a_plain
    assert os3.next_stride() == 1
    for _ in range(3):
        os3.observe_speculation(0.151)
    assert os3.latencies() == (0.151, 0.131) and os3.next_stride() == 0
