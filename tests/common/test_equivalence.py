from services.common.equivalence import compare


def test_identical():
    assert compare([1, 2, 3], [1.0] * 3, [1, 2, 3], [1.0] * 3).identical


def test_difference_at_a_near_tie_is_certified():
    v = compare([1, 2, 3], [1.0, 5e-5, 1.0], [1, 4, 5], [1.0, 6e-5, 1.0])
    assert not v.identical and v.near_tie and v.position == 1 and v.ok


def test_difference_with_a_clear_gap_fails():
    v = compare([1, 2, 3], [1.0, 0.5, 1.0], [1, 4], [1.0, 0.5])
    assert not v.ok and v.position == 1 and v.gap == 0.5


def test_prefix_difference_is_not_a_tie():
    v = compare([1, 2], [1.0, 1.0], [1, 2, 3], [1.0, 1.0, 1.0])
    assert not v.ok and v.position == 2


def test_a_sampled_position_is_never_a_near_tie_whichever_side_it_is_on():
    nan = float("nan")
    for a, b in (([1.0, nan], [1.0, 5e-5]), ([1.0, 5e-5], [1.0, nan])):
        v = compare([1, 2], a, [1, 3], b)
        assert not v.ok and v.position == 1
