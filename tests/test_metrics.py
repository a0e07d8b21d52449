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


def scored_row(gold: dict, parsed: dict, confidence: float | None = None) -> dict:
    fields = {f: parsed.get(f) == gold[f] for f in gold}
    return {"lang": "en", "noise": [], "gold": gold, "parsed": parsed, "valid": True, "fields": fields,
            "correct": all(fields.values()), "confidence": {"overall": confidence} if confidence is not None else None}


def test_scope_counts_out_of_scope_turned_away_and_cart_operations_wrongly_turned_away():
    none = {"action": "none", "product": None, "quantity": None}
    milk = {"action": "add", "product": "Milk", "quantity": 2}
    rows = [scored_row(none, none), scored_row(none, milk), scored_row(milk, milk), scored_row(milk, none),
            scored_row(milk, {**milk, "quantity": 3}), scored_row(milk, milk)]
    assert summarize(rows)["scope"] == {"out_of_scope": 2, "rejected": 0.5, "in_scope": 4, "false_rejections": 0.25,
                                        "in_scope_exact_match": 0.5, "exact_match_answered": 0.6667}
    assert summarize(rows)["by_quantity"]["none"] == {"n": 2, "exact_match": 0.5}
    assert summarize(rows)["calibration"] is None   # free decoding reports no confidence


def test_calibration_bins_ece_and_risk_coverage_on_known_values():
    milk = {"action": "add", "product": "Milk", "quantity": 2}
    wrong = {**milk, "product": "Bread"}
    # 10 answers at 0.95 confidence (9 right), 10 at 0.55 (5 right)
    rows = [scored_row(milk, milk if i < 9 else wrong, 0.95) for i in range(10)]
    rows += [scored_row(milk, milk if i < 5 else wrong, 0.55) for i in range(10)]
    found = summarize(rows)["calibration"]
    assert found["n"] == 20
    assert found["reliability"] == [{"low": 0.5, "n": 10, "confidence": 0.55, "exact_match": 0.5},
                                    {"low": 0.9, "n": 10, "confidence": 0.95, "exact_match": 0.9}]
    assert found["ece"] == pytest.approx(0.5 * 0.05 + 0.5 * 0.05)
    curve = {p["coverage"]: p["exact_match"] for p in found["risk_coverage"]}
    assert curve[0.5] == 0.9 and curve[1.0] == 0.7    # the confident half first
    assert 0 < found["aurc"] < 0.3
