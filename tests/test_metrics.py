"""Metrics: known values, edge cases."""
import pytest

from cart_intent.metrics import mcnemar, quantity_bucket, summarize, wilson


def test_wilson_matches_published_values():
    assert wilson(0, 10) == [0.0, 0.2775]
    assert wilson(5, 10) == [0.2366, 0.7634]
    assert wilson(494, 500) == [0.9741, 0.9945]   # the paper's 0.988 on 500 examples
    assert wilson(0, 0) == [0.0, 0.0]


def test_mcnemar_exact_two_sided():
    both = [True] * 10
    assert mcnemar(both, both)["p_value"] == 1.0
    # the paper's 0.988 vs 0.984: two examples apart, far from significant
    ref, cand = [True] * 494 + [False] * 6, [True] * 492 + [False] * 8
    result = mcnemar(ref, cand)
    assert result["only_reference_correct"] == 2 and result["p_value"] == 0.5 and not result["significant_at_0.05"]
    ref, cand = [True] * 10, [False] * 10
    assert mcnemar(ref, cand)["p_value"] == pytest.approx(0.002, abs=1e-4)
    assert mcnemar(ref, cand)["significant_at_0.05"]


def test_quantity_buckets_cover_every_quantity():
    assert [quantity_bucket(q) for q in (1, 2, 4, 5, 10, 11, 20, 21, 50)] == \
        ["1", "2-4", "2-4", "5-10", "5-10", "11-20", "11-20", "21+", "21+"]


def test_summarize_breaks_down_by_group():
    gold = {"action": "add", "product": "Milk", "quantity": 2}
    row = {"lang": "hr", "noise": ["typo"], "gold": gold, "parsed": {**gold, "product": "Bread"}, "valid": True,
           "fields": {"action": True, "product": False, "quantity": True}, "correct": False}
    good = {**row, "lang": "en", "noise": [], "parsed": gold, "fields": dict.fromkeys(gold, True), "correct": True}
    summary = summarize([row, good])
    assert summary["exact_match"] == 0.5 and summary["field_accuracy"]["product"] == 0.5
    assert summary["by_language"] == {"en": {"n": 1, "exact_match": 1.0}, "hr": {"n": 1, "exact_match": 0.0}}
    assert summary["by_noise"]["typo"]["exact_match"] == 0.0 and summary["by_noise"]["none"]["n"] == 1
    assert summary["top_confusions"] == [{"field": "product", "gold": "Milk", "predicted": "Bread", "count": 1}]
