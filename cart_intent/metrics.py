"""Scores over saved predictions: exact match with Wilson intervals, per-field and per-group accuracy,
McNemar's exact test between two variants on the same examples, and the most frequent confusions."""
from __future__ import annotations

import math
from collections import Counter, defaultdict

from .task import exact_match, field_matches, is_valid, parse_output

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


def quantity_bucket(quantity: int) -> str:
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
                     "model_calls": getattr(answer, "model_calls", None)})
    return rows


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
    }
