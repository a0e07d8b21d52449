"""The cart-intent task itself: output schema, prompt builder, parser and scorer.

Training, evaluation, baselines and serving all use these functions, so a prompt
or a score means the same thing everywhere.
"""
from __future__ import annotations

import json

ACTIONS = ("add", "remove")
FIELDS = ("action", "product", "quantity")
# The longest canonical answer is ~70 characters; 48 tokens covers it even with a character-level tokenizer.
ANSWER_TOKENS = 48

INSTRUCTION = (
    "Extract the shopping cart intent from the message as JSON with action (add or remove), "
    "product (catalog name) and quantity (integer)."
)


def format_answer(action: str, product: str, quantity: int) -> str:
    """The canonical completion, e.g. {"action": "remove", "product": "Lip Balm", "quantity": 12}."""
    return json.dumps({"action": action, "product": product, "quantity": quantity}, ensure_ascii=False)


def build_prompt(text: str, examples: list[dict] = ()) -> str:
    """Instruction, optional few-shot examples, then the message; the answer follows directly.

    The prompt ends with "JSON:" and no trailing space: the completion starts with " {",
    so the tokenizer sees the same boundary in training and at inference.
    """
    parts = [INSTRUCTION, ""]
    for ex in examples:
        parts += [f"Message: {ex['text']}", "JSON: " + format_answer(ex["action"], ex["product"], ex["quantity"]), ""]
    parts.append(f"Message: {text}")
    return "\n".join(parts) + "\nJSON:"


def build_completion(action: str, product: str, quantity: int) -> str:
    return " " + format_answer(action, product, quantity)


def parse_output(text) -> dict | None:
    """The first JSON object found in arbitrary model text, or None. Never raises."""
    try:
        decoder = json.JSONDecoder()
        start = text.find("{")
        while start != -1:
            try:
                value, _ = decoder.raw_decode(text, start)
            except (ValueError, RecursionError):
                value = None
            if isinstance(value, dict):
                return value
            start = text.find("{", start + 1)
    except Exception:  # noqa: BLE001 - the contract is "never raises", whatever the input
        return None
    return None


def is_valid(pred: dict | None, catalog_names: set[str] | None = None) -> bool:
    """Does pred follow the schema (right keys and types, optionally a catalog product)?"""
    if not isinstance(pred, dict) or set(pred) != set(FIELDS):
        return False
    quantity = pred["quantity"]
    ok = (pred["action"] in ACTIONS and isinstance(pred["product"], str)
          and isinstance(quantity, int) and not isinstance(quantity, bool) and quantity >= 1)
    return ok and (catalog_names is None or pred["product"] in catalog_names)


def field_matches(pred: dict | None, gold: dict) -> dict[str, bool]:
    """Per-field correctness; quantity must be an int (the string "3" is wrong)."""
    if not isinstance(pred, dict):
        return {f: False for f in FIELDS}
    quantity = pred.get("quantity")
    return {
        "action": pred.get("action") == gold["action"],
        "product": pred.get("product") == gold["product"],
        "quantity": isinstance(quantity, int) and not isinstance(quantity, bool)
        and quantity == gold["quantity"],
    }


def exact_match(pred: dict | None, gold: dict) -> bool:
    """Strict exact match: a JSON object whose three fields all equal the gold ones."""
    return all(field_matches(pred, gold).values())
