"""The fallback, as Rasa's FallbackClassifier: a valid cart operation whose overall confidence is below a threshold,
or whose product beat the runner-up by less than a margin, is not acted on. The thresholds are chosen on the
validation split (`evaluate`), so that at most a set share of its cart operations is turned away; `serve` and
`predict` use what `evaluate` chose for their variant, or the [serve] keys."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .artifacts import read_manifest
from .task import FIELDS, NO_OPERATION

LOW_CONFIDENCE, AMBIGUOUS = "low_confidence", "ambiguous"


@dataclass(frozen=True)
class Thresholds:
    threshold: float = 0.0        # overall confidence below it: low_confidence (0: off)
    margin: float = 0.0           # chosen product's probability minus the runner-up's below it: ambiguous (0: off)
    source: str = "off"           # where they come from: "validation split of <variant>", "config" or "off"


def reason(pred: dict, confidence: dict | None, thresholds: Thresholds) -> str | None:
    """Why this valid answer must not be acted on (low_confidence, ambiguous), or None."""
    if not confidence or pred["action"] == NO_OPERATION:
        return None
    if confidence["overall"] < thresholds.threshold:
        return LOW_CONFIDENCE
    runner_up = confidence.get("runner_up")
    if runner_up and runner_up["margin"] < thresholds.margin:
        return AMBIGUOUS
    return None


def candidates(pred: dict, confidence: dict) -> list[dict]:
    """The model's answer, then the same operation on each runner-up product, with their probabilities."""
    runner_up = confidence["runner_up"] or {"products": [], "probability": 0.0}
    return [{**{k: pred[k] for k in FIELDS}, "confidence": confidence["overall"]}] + [
        {**{k: pred[k] for k in FIELDS}, "product": product, "confidence": runner_up["probability"]}
        for product in runner_up["products"] if product != pred["product"]]


def chosen(run_dir) -> dict:
    """variant -> the thresholds `evaluate` chose on the run's validation split (eval/'s manifest), {} before."""
    return (read_manifest(run_dir / "eval") or {}).get("results", {}).get("fallback") or {}


def turned_away(row: dict, thresholds: Thresholds) -> bool:
    """A scored row (metrics.score) answered with the none-form, or by the fallback."""
    parsed = row["parsed"] if isinstance(row["parsed"], dict) else {}
    if parsed.get("action") == NO_OPERATION:
        return True
    return row["valid"] and reason(parsed, row.get("confidence"), thresholds) is not None


def choose(rows: list[dict], max_false_rejections: float, source: str) -> tuple[Thresholds, dict]:
    """The highest threshold, then margin, that turn away at most `max_false_rejections` of the cart operations in
    `rows` (scored, constrained, with confidences) together with those the model itself answered with the
    none-form; half the room each. Returns them and what they do on these rows."""
    inside = [r for r in rows if r["gold"]["action"] != NO_OPERATION]
    answered = [r for r in inside if not turned_away(r, Thresholds())]
    room = math.floor(max_false_rejections * len(inside)) - (len(inside) - len(answered))
    threshold = _cut([r["confidence"]["overall"] for r in answered], room // 2)
    kept = [r for r in answered if r["confidence"]["overall"] >= threshold]
    margins = [r["confidence"]["runner_up"]["margin"] for r in kept if r["confidence"]["runner_up"]]
    margin = _cut(margins, room - (len(answered) - len(kept)))
    chosen = Thresholds(threshold, margin, source)
    return chosen, effect(rows, chosen)


def _cut(values: list[float], budget: int) -> float:
    """The largest cut that leaves at most `budget` of `values` strictly below it (0 when there is no room)."""
    if budget <= 0 or not values:
        return 0.0
    ordered = sorted(values)
    return ordered[budget] if budget < len(ordered) else ordered[-1] + 1e-9


def effect(rows: list[dict], thresholds: Thresholds) -> dict:
    """On scored rows: cart operations turned away, out-of-scope messages turned away, exact match of the cart
    operations still answered, with these thresholds."""
    inside = [r for r in rows if r["gold"]["action"] != NO_OPERATION]
    outside = [r for r in rows if r["gold"]["action"] == NO_OPERATION]
    answered = [r for r in inside if not turned_away(r, thresholds)]
    def share(hits, n):
        return round(hits / n, 4) if n else None
    return {"examples": len(rows), "false_rejections": share(len(inside) - len(answered), len(inside)),
            "out_of_scope_turned_away": share(sum(turned_away(r, thresholds) for r in outside), len(outside)),
            "exact_match_answered": share(sum(r["correct"] for r in answered), len(answered))}
