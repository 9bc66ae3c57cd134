from services.common.qa_metrics import exact_match, f1, normalize


def test_normalize_drops_case_punctuation_and_articles():
    assert normalize("The  Denver Broncos!") == "denver broncos"


def test_exact_match_takes_the_best_gold():
    assert exact_match("denver broncos", ["Carolina", "The Denver Broncos"]) == 1.0
    assert exact_match("Broncos", ["Denver Broncos"]) == 0.0


def test_f1_is_token_overlap():
    assert f1("Broncos", ["Denver Broncos"]) == 2 * 1.0 * 0.5 / 1.5
    assert f1("", ["x"]) == 0.0 and f1("x y", ["x y"]) == 1.0
