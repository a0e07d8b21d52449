"""Scores over saved predictions: exact match with Wilson intervals, per-field and per-group accuracy,
McNemar's exact test between two variants on the same examples, the most frequent confusions, how the
none-form splits the messages (out-of-scope ones turned away, in-scope ones wrongly turned away), and, where the
decoder reported its confidence (constrained decoding), how well it ranks and how well it is calibrated: the
risk-coverage curve of selective prediction and the expected calibration error with its reliability diagram."""
from __future__ import annotations

import math
from collections import Counter, defaultdict

from .fallback import Thresholds, turned_away
from .task import NO_OPERATION, exact_match, field_matches, is_valid, parse_output

QUANTITY_BUCKETS = ((1, 1, "1"), (2, 4, "2-4"), (5, 10, "5-10"), (11, 20, "11-20"), (21, 10**9, "21+"))


def wilson(hits: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval for a proportion (sound at 0 and 1, unlike the normal one)."""
    if n == 0:
        return [0.0, 0.0]
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def mcnemar(reference: list[bool], candidate: list[bool]) -> dict:
    """Exact (binomial) McNemar test on paired correctness; only disagreements carry information."""
    only_ref = sum(r and not c for r, c in zip(reference, candidate, strict=True))
    only_cand = sum(c and not r for r, c in zip(reference, candidate, strict=True))
    n = only_ref + only_cand
    tail = sum(math.comb(n, k) for k in range(min(only_ref, only_cand) + 1)) / 2**n if n else 1.0
    p_value = min(1.0, 2 * tail)
    return {"only_reference_correct": only_ref, "only_candidate_correct": only_cand,
            "p_value": round(p_value, 4), "significant_at_0.05": p_value < 0.05}


def quantity_bucket(quantity: int | None) -> str:
    if quantity is None:   # the none-form
        return NO_OPERATION
    return next(label for low, high, label in QUANTITY_BUCKETS if low <= quantity <= high)


def group_accuracy(rows: list[dict], key) -> dict[str, dict]:
    groups = defaultdict(list)
    for row in rows:
        for group in key(row):
            groups[group].append(row["correct"])
    return {g: {"n": len(v), "exact_match": round(sum(v) / len(v), 4)} for g, v in sorted(groups.items())}


def confusions(rows: list[dict], top: int = 10) -> list[dict]:
    """Most frequent wrong values per field: (field, gold, predicted, count)."""
    counts = Counter()
    for row in rows:
        parsed = row["parsed"] if isinstance(row["parsed"], dict) else {}
        for field in ("action", "product", "quantity"):
            if not row["fields"][field]:
                counts[(field, str(row["gold"][field]), str(parsed.get(field, "<missing>")))] += 1
    return [{"field": f, "gold": g, "predicted": p, "count": c} for (f, g, p), c in counts.most_common(top)]


def rate(hits: int, n: int) -> float | None:
    return round(hits / n, 4) if n else None


def scope(rows: list[dict]) -> dict:
    """Out-of-scope messages (gold none-form) turned away, in-scope ones wrongly turned away, and exact match over
    the in-scope messages the model did answer with a cart operation."""
    outside = [r for r in rows if r["gold"]["action"] == NO_OPERATION]
    inside = [r for r in rows if r["gold"]["action"] != NO_OPERATION]
    def by_model(row):   # the model's own none-form, no fallback
        return turned_away(row, Thresholds())
    answered = [r for r in inside if not by_model(r)]
    return {"out_of_scope": len(outside), "rejected": rate(sum(map(by_model, outside)), len(outside)),
            "in_scope": len(inside), "false_rejections": rate(len(inside) - len(answered), len(inside)),
            "in_scope_exact_match": rate(sum(r["correct"] for r in inside), len(inside)),
            "exact_match_answered": rate(sum(r["correct"] for r in answered), len(answered))}


def score(examples: list[dict], answers, catalog_names: set[str]) -> list[dict]:
    """One prediction row per example: the raw answer, what parses from it, and every correctness flag."""
    rows = []
    for ex, answer in zip(examples, answers, strict=True):
        parsed = parse_output(answer.text)
        rows.append({"id": ex["id"], "lang": ex["lang"], "noise": ex.get("noise", []), "text": ex["text"],
                     "gold": {k: ex[k] for k in ("action", "product", "quantity")}, "raw": answer.text,
                     "parsed": parsed, "valid": is_valid(parsed, catalog_names), "fields": field_matches(parsed, ex),
                     "correct": exact_match(parsed, ex), "latency_s": round(answer.seconds, 5),
                     "prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                     "model_calls": getattr(answer, "model_calls", None),
                     "confidence": getattr(answer, "confidence", None)})
    return rows


CALIBRATION_BINS = 10
COVERAGE_POINTS = 20


def calibration(rows: list[dict]) -> dict | None:
    """Overall confidence against exact match: the expected calibration error over CALIBRATION_BINS equal-width bins,
    the bins themselves (the reliability diagram), and the risk-coverage curve (answer only the most confident
    share; exact match of what is answered) with its area (AURC: lower is better). None without confidences."""
    scored = [(r["confidence"]["overall"], r["correct"]) for r in rows if r.get("confidence")]
    if not scored:
        return None
    n, bins = len(scored), []
    for b in range(CALIBRATION_BINS):
        inside = [(c, ok) for c, ok in scored if b / CALIBRATION_BINS <= c < (b + 1) / CALIBRATION_BINS
                  or (b == CALIBRATION_BINS - 1 and c == 1.0)]
        if inside:
            bins.append({"low": b / CALIBRATION_BINS, "n": len(inside),
                         "confidence": round(sum(c for c, _ in inside) / len(inside), 4),
                         "exact_match": round(sum(ok for _, ok in inside) / len(inside), 4)})
    ece = sum(b["n"] / n * abs(b["confidence"] - b["exact_match"]) for b in bins)
    ranked = [ok for _, ok in sorted(scored, key=lambda pair: -pair[0])]
    hits, risks = 0, []
    for k, ok in enumerate(ranked, 1):
        hits += ok
        risks.append(1 - hits / k)
    curve = [{"coverage": round(i / COVERAGE_POINTS, 3),
              "exact_match": round(1 - risks[max(round(n * i / COVERAGE_POINTS), 1) - 1], 4)}
             for i in range(1, COVERAGE_POINTS + 1)]
    return {"n": n, "ece": round(ece, 4), "reliability": bins, "aurc": round(sum(risks) / n, 4),
            "risk_coverage": curve}


def summarize(rows: list[dict]) -> dict:
    """Every metric of one variant and decoding mode over its predictions."""
    n = len(rows)
    hits = sum(r["correct"] for r in rows)
    return {
        "n": n,
        "exact_match": round(hits / n, 4) if n else 0.0,
        "exact_match_ci95": wilson(hits, n),
        "json_valid": round(sum(r["valid"] for r in rows) / n, 4) if n else 0.0,
        "field_accuracy": {f: round(sum(r["fields"][f] for r in rows) / n, 4) for f in ("action", "product", "quantity")},
        "by_language": group_accuracy(rows, lambda r: [r["lang"]]),
        "by_noise": group_accuracy(rows, lambda r: r.get("noise") or ["none"]),
        "by_quantity": group_accuracy(rows, lambda r: [quantity_bucket(r["gold"]["quantity"])]),
        "top_confusions": confusions(rows),
        "scope": scope(rows),
        "calibration": calibration(rows),
    }
