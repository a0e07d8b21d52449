"""The cart-intent task itself: output schema, prompt builder, parser and scorer.

Training, evaluation, baselines and serving all use these functions, so a prompt
or a score means the same thing everywhere.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .artifacts import MissingArtifact, jsonl_lines
from .catalog import run_catalog

ACTIONS = ("add", "remove")   # the cart operations
# The answer to a message that asks for no cart operation (order status, a product question, thanks, a product the
# catalog does not sell): the same three keys, so every consumer reads one shape, with nothing to put in the cart.
NO_OPERATION = "none"
FIELDS = ("action", "product", "quantity")
ANSWER_FORMS = ('`{"action": "add"|"remove", "product": <catalog name>, "quantity": 1..999}`, or '
                '`{"action": "none", "product": null, "quantity": null}` when the message asks for no cart change')
MAX_QUANTITY = 999  # the schema's bound (constrained decoding enumerates 1..999)
# The longest canonical answer is ~70 characters; 48 tokens covers it even with a character-level tokenizer.
ANSWER_TOKENS = 48

INSTRUCTION = (
    "Extract the shopping cart intent from the message as JSON with action (add or remove), "
    "product (catalog name) and quantity (integer); action none, with product and quantity null, "
    "when the message asks for no cart change."
)


@dataclass
class Completion:
    """What a model answered to one prompt, from any back end or API."""
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    model_calls: int = 0     # forward passes after the prompt's (free decoding: one per new token; APIs: 0)
    cached: bool = False     # an API answer read back from the response cache (nothing paid)
    confidence: dict | None = None   # constrained decoding: the model's probabilities (constrained.confidence)


def is_cart_operation(row: dict) -> bool:
    """Does this labelled row (or answer) ask for a cart change, rather than the none-form?"""
    return row["action"] != NO_OPERATION


def format_answer(action: str, product: str | None, quantity: int | None) -> str:
    """The canonical completion, e.g. {"action": "remove", "product": "Lip Balm", "quantity": 12}, or
    {"action": "none", "product": null, "quantity": null} (product and quantity are ignored for "none")."""
    if action == NO_OPERATION:
        product = quantity = None
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


def chat_template(bos: bool) -> str:
    """A Jinja chat template (transformers, llama.cpp, Ollama) that renders the conversation's last user message
    into exactly build_prompt(message.strip()), the only prompt the model was trained on, after the BOS token when
    the tokenizer adds one (chat front ends tokenize the rendered text without adding it). System and assistant
    messages are ignored, as the model never saw any; a conversation without a user message is an error."""
    head, tail = build_prompt("\0").split("\0")
    for text in (head, tail):
        assert "{" not in text and "%" not in text, "the prompt's fixed text must not hold Jinja syntax"
    return ("{%- set users = messages | selectattr('role', 'equalto', 'user') | list -%}"
            "{%- if not users or users[-1]['content'] is not string -%}"
            "{{ raise_exception('one user message with the shopper\\'s text is needed') }}"
            "{%- endif -%}"
            + ("{{ bos_token }}" if bos else "") + head + "{{ users[-1]['content'] | trim }}" + tail)


def answer_json_schema(products: list[str]) -> dict:
    """The answer as JSON Schema: what `response_format` (OpenAI-compatible servers) and validators take."""
    operation = {"type": "object", "properties": {
        "action": {"type": "string", "enum": list(ACTIONS)}, "product": {"type": "string", "enum": list(products)},
        "quantity": {"type": "integer", "minimum": 1, "maximum": MAX_QUANTITY}},
        "required": list(FIELDS), "additionalProperties": False}
    no_operation = {"type": "object", "properties": {
        "action": {"const": NO_OPERATION}, "product": {"type": "null"}, "quantity": {"type": "null"}},
        "required": list(FIELDS), "additionalProperties": False}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "cart intent",
            "anyOf": [operation, no_operation]}


def answer_gbnf(products: list[str]) -> str:
    """The answer as a llama.cpp GBNF grammar, in the exact form the model was trained to write (its leading
    space, key order and spacing), so grammar-constrained sampling stays on the model's own path."""
    def literal(text: str) -> str:
        return json.dumps(text, ensure_ascii=False)
    assert MAX_QUANTITY == 999, "the quantity rule below spells out 1..999"
    return "\n".join([
        'root ::= " "? "{" ' + literal('"action": "') + " ( operation | none ) " + '"}"',
        "operation ::= action " + literal('", "product": "') + " product " + literal('", "quantity": ') + " quantity",
        "none ::= " + literal(format_answer(NO_OPERATION, None, None)[len('{"action": "'):-1]),
        "action ::= " + " | ".join(literal(a) for a in ACTIONS),
        "product ::= " + " | ".join(literal(p) for p in products),
        'quantity ::= [1-9] [0-9]? [0-9]?',
    ]) + "\n"


def text_key(text: str) -> str:
    """Messages that differ only in case or spacing are one text (the dataset never holds one twice)."""
    return " ".join(text.casefold().split())


def build_completion(action: str, product: str | None, quantity: int | None) -> str:
    return " " + format_answer(action, product, quantity)


def median_answer_tokens(examples: list[dict], count_tokens) -> int:
    """The median length of the examples' completions in a model's tokens (count_tokens: text -> int);
    the shape twin generates exactly this many tokens, so its timing stands for real answers."""
    import statistics
    return int(statistics.median(count_tokens(build_completion(e["action"], e["product"], e["quantity"]))
                                 for e in examples))


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
    """Does pred follow the schema (right keys and types, optionally a catalog product)? The none-form may also
    leave product and quantity out."""
    if isinstance(pred, dict) and pred.get("action") == NO_OPERATION:
        return set(pred) <= set(FIELDS) and pred.get("product") is None and pred.get("quantity") is None
    if not isinstance(pred, dict) or set(pred) != set(FIELDS):
        return False
    quantity = pred["quantity"]
    ok = (pred["action"] in ACTIONS and isinstance(pred["product"], str)
          and isinstance(quantity, int) and not isinstance(quantity, bool) and 1 <= quantity <= MAX_QUANTITY)
    return ok and (catalog_names is None or pred["product"] in catalog_names)


def field_matches(pred: dict | None, gold: dict) -> dict[str, bool]:
    """Per-field correctness; quantity must be an int (the string "3" is wrong). Against the none-form, product
    and quantity are right when null or left out."""
    if not isinstance(pred, dict):
        return {f: False for f in FIELDS}
    quantity = pred.get("quantity")
    if gold["quantity"] is None:
        quantity_right = quantity is None
    else:
        quantity_right = isinstance(quantity, int) and not isinstance(quantity, bool) and quantity == gold["quantity"]
    return {"action": pred.get("action") == gold["action"], "product": pred.get("product") == gold["product"],
            "quantity": quantity_right}


def exact_match(pred: dict | None, gold: dict) -> bool:
    """Strict exact match: a JSON object whose three fields all equal the gold ones."""
    return all(field_matches(pred, gold).values())


class BadExamples(ValueError):
    """A labelled file that is not JSON Lines of valid examples; the message names the file and line."""


def example_problem(row, catalog_names: set[str]) -> str | None:
    """Why row is not a labelled example of this task (text, a known action and catalog product, quantity
    1..MAX_QUANTITY; or action "none" with product and quantity null or left out), or None. Training on such a
    row would teach an answer the schema forbids."""
    if not isinstance(row, dict):
        return "expected a JSON object with text, action, product, quantity"
    missing = [k for k in ("text", "action") if k not in row]
    if missing:
        return f"missing {', '.join(missing)}"
    if not isinstance(row["text"], str) or not row["text"].strip():
        return "text must be a non-empty string"
    if row["action"] == NO_OPERATION:
        extra = [k for k in ("product", "quantity") if row.get(k) is not None]
        return f'action "{NO_OPERATION}" takes no {" or ".join(extra)} (null or left out)' if extra else None
    if row["action"] not in ACTIONS:
        return f"action must be one of {', '.join((*ACTIONS, NO_OPERATION))}, not {row['action']!r}"
    missing = [k for k in ("product", "quantity") if k not in row]
    if missing:
        return f"missing {', '.join(missing)}"
    if not isinstance(row["product"], str) or row["product"] not in catalog_names:
        return f"product {row['product']!r} is not in the catalog"
    quantity = row["quantity"]
    if type(quantity) is not int or not 1 <= quantity <= MAX_QUANTITY:
        return f"quantity must be an integer from 1 to {MAX_QUANTITY}, not {quantity!r}"
    return None


def read_examples(path: Path, catalog_names: set[str]) -> list[dict]:
    """Every labelled example of a JSON Lines file, or BadExamples at the first row that is not one."""
    return [row for _, row in numbered_examples(path, catalog_names)]


def numbered_examples(path: Path, catalog_names: set[str]) -> list[tuple[int, dict]]:
    """(line number, example) for every labelled example of a JSON Lines file, or BadExamples at the first
    row that is not one."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise BadExamples(f"{path}: not UTF-8 text (byte {err.start}); expected JSON Lines of labelled examples") from None
    examples = []
    for number, line in enumerate(jsonl_lines(text), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise BadExamples(f"{path}:{number}: not valid JSON ({err.msg})") from None
        except RecursionError:
            raise BadExamples(f"{path}:{number}: nested deeper than a labelled example is") from None
        problem = example_problem(row, catalog_names)
        if problem:
            raise BadExamples(f"{path}:{number}: {problem}")
        examples.append((number, {"product": None, "quantity": None, **row}))   # the none-form may leave them out
    if not examples:
        raise BadExamples(f"{path}: no examples")
    return examples


def read_split(run_dir: Path, split: str) -> list[dict]:
    """A run's data/<split>.jsonl, every row checked: a bad row is a bad upstream artifact (exit 3)."""
    try:
        return read_examples(run_dir / "data" / f"{split}.jsonl", set(run_catalog(run_dir).names))
    except BadExamples as err:
        # the generator wrote it as it read it: rerunning it alone would write the same row again
        raise MissingArtifact(f"{err}: fix the row where `make generate` took it from (generate.data_file, the "
                              f"catalog), then `make generate FORCE=1` (same CONFIG)") from None
