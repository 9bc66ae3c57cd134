import pytest

from services.common.equivalence import NEAR_TIE, compare


def test_identical():
    assert compare([1, 2, 3], [1.0] * 3, [1, 2, 3], [1.0] * 3).identical


def test_difference_where_both_runs_are_at_a_near_tie_is_certified():
    v = compare([1, 2, 3], [1.0, 5e-5, 1.0], [1, 4, 5], [1.0, 6e-5, 1.0])
    assert not v.identical and v.near_tie and v.position == 1 and v.ok and v.gap == 6e-5


@pytest.mark.parametrize("ref_gap, other_gap", [(5e-5, 0.3), (0.3, 5e-5), (0.0, 2 * NEAR_TIE)])
def test_near_tie_on_one_side_only_is_a_mismatch(ref_gap, other_gap):
    # both runs saw the same context: noise flips a token only where BOTH were undecided
    v = compare([1, 2, 3], [1.0, ref_gap, 1.0], [1, 4, 3], [1.0, other_gap, 1.0])
    assert not v.ok and not v.near_tie and v.position == 1 and v.gap == max(ref_gap, other_gap)


def test_difference_with_a_clear_gap_fails():
    v = compare([1, 2, 3], [1.0, 0.5, 1.0], [1, 4], [1.0, 0.5])
    assert not v.ok and v.position == 1 and v.gap == 0.5


@pytest.mark.parametrize("ref, other", [([1, 2], [1, 2, 3]), ([1, 2, 3], [1, 2])])
def test_prefix_difference_is_never_a_tie_even_at_a_tiny_gap(ref, other):
    tiny = [1e-6] * 3
    v = compare(ref, tiny[: len(ref)], other, tiny[: len(other)])
    assert not v.ok and v.position == 2 and v.gap is None


def test_a_sampled_position_is_never_a_near_tie_whichever_side_it_is_on():
    nan = float("nan")
    for a, b in (([1.0, nan], [1.0, 5e-5]), ([1.0, 5e-5], [1.0, nan])):
        v = compare([1, 2], a, [1, 3], b)
        assert not v.ok and v.position == 1


def test_a_run_without_its_gap_there_certifies_nothing():
    v = compare([1, 2], [1.0], [1, 3], [1.0, 5e-5])
    assert not v.ok and v.position == 1 and v.gap is None
