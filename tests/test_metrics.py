import pytest

from trainer.evaluation.metrics import character_error_rate, edit_distance, wilson_interval


def test_edit_distance_and_cer():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3
    assert character_error_rate("1234", "1234") == 0.0
    assert character_error_rate("124", "1234") == 0.25


@pytest.mark.parametrize("successes,n", [(0, 24), (24, 24), (0, 1), (7, 10), (50, 100)])
def test_wilson_interval_contains_the_estimate(successes, n):
    low, high = wilson_interval(successes, n)
    assert 0.0 <= low <= successes / n <= high <= 1.0


def test_wilson_interval_known_value():
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
