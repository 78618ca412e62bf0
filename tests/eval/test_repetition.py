"""kdistill.eval.metrics.repetition: the loop detector behind the sequence-level KD report."""

import pytest

from kdistill.eval.metrics import repetition


def test_a_loop_is_caught_and_its_distinct_ngrams_counted():
    loop = [1, 2, 3, 4, 1, 2, 3, 4]  # 4-grams: 1234 2341 3412 4123 1234 -> 4 distinct of 5
    assert repetition([loop], span=4, n=4) == {"repeating": 1.0, "distinct_ngrams": 0.8}
    assert repetition([loop], span=5, n=4)["repeating"] == 0.0  # no 5-token window occurs twice


def test_fresh_text_does_not_repeat_and_the_share_is_over_sequences():
    fresh = list(range(20))
    got = repetition([fresh, [7] * 12], span=8, n=4)
    assert got["repeating"] == 0.5
    assert got["distinct_ngrams"] == pytest.approx((17 + 1) / (17 + 9))  # n-grams pooled over both
    assert repetition([[1, 2]], span=8, n=4) == {"repeating": 0.0, "distinct_ngrams": 1.0}  # too short: nothing
    assert repetition([], span=8) == {"repeating": 0.0, "distinct_ngrams": 1.0}
    with pytest.raises(ValueError, match="positive"):
        repetition([fresh], span=0)
