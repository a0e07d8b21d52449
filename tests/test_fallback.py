"""The fallback's rule and the choice of its thresholds on scored rows (as evaluate writes them)."""
import pytest

from cart_intent.fallback import AMBIGUOUS, LOW_CONFIDENCE, Thresholds, candidates, choose, effect, reason

MILK = {"action": "add", "product": "Milk", "quantity": 2}
NONE = {"action": "none", "product": None, "quantity": None}


def row(gold, parsed, overall=0.9, margin=None):
    runner_up = {"probability": 0.1, "margin": margin, "products": ["Mints"]} if margin is not None else None
    return {"gold": gold, "parsed": parsed, "valid": True, "correct": gold == parsed,
            "confidence": {"overall": overall, "runner_up": runner_up}}


def test_the_rule_and_the_candidates():
    confidence = {"overall": 0.4, "runner_up": {"probability": 0.3, "margin": 0.05, "products": ["Milk", "Mints"]}}
    assert reason(MILK, confidence, Thresholds(0.5, 0.0)) == LOW_CONFIDENCE
    assert reason(MILK, confidence, Thresholds(0.3, 0.1)) == AMBIGUOUS
    assert reason(MILK, confidence, Thresholds(0.3, 0.01)) is None
    assert reason(NONE, confidence, Thresholds(1.0, 1.0)) is None      # already no cart operation
    assert reason(MILK, None, Thresholds(1.0, 1.0)) is None            # free decoding: no confidence to judge
    assert candidates(MILK, confidence) == [{**MILK, "confidence": 0.4}, {**MILK, "product": "Mints", "confidence": 0.3}]


def test_thresholds_turn_away_at_most_the_allowed_share_of_cart_operations():
    # 100 cart operations: confidences 0.01..1.00, margins alike; 2 out-of-scope messages at low confidence
    rows = [row(MILK, MILK, overall=i / 100, margin=i / 100) for i in range(1, 101)]
    rows += [row(NONE, MILK, overall=0.005), row(NONE, NONE, overall=0.9)]
    limits, seen = choose(rows, 0.04, "validation")
    assert limits.threshold == pytest.approx(0.03) and limits.margin == pytest.approx(0.05)
    assert seen == {"examples": 102, "false_rejections": 0.04, "out_of_scope_turned_away": 1.0,
                    "exact_match_answered": 1.0}
    # the model's own none-forms on cart operations use up the room first
    crowded = rows[:96] + [row(MILK, NONE)] * 4
    limits, seen = choose(crowded, 0.04, "validation")
    assert limits == Thresholds(0.0, 0.0, "validation") and seen["false_rejections"] == 0.04
    assert effect(rows, Thresholds())["out_of_scope_turned_away"] == 0.5
