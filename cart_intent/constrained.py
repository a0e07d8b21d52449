"""Schema-constrained greedy decoding with jump-forward, one algorithm for every back end.

The valid answers are ' {"action": "<add|remove>", "product": "<catalog name>", "quantity": <1..999>}' and the
none-form ' {"action": "none", "product": null, "quantity": null}': a finite set, kept sorted, so "is this text the start of a valid answer" is a binary search and the
answers that start with a text form one contiguous range.

Decoding loop (greedy):
- jump-forward: when every valid continuation of the answer so far starts with the same characters
  (the schema's fixed parts, or the rest of a product name once it is unambiguous), they are appended
  without a decode step; the text is re-tokenized and only the tokens past the cached prefix are fed;
- otherwise one forward pass gives the next-token logits, masked to tokens that keep the text a prefix
  of a valid answer, and the best one is taken; the last token of the forced text is first backed off
  (token healing), so the model picks the token it was trained to emit there, e.g. ' "remove",' whole;
- the answer is complete when the text is a valid answer (no closing decode step either).

A back end provides a `Stepper`: `tokenize(text)` and `choose(ids, allowed)`, the allowed token the model
scores highest after `ids` with the model's probabilities (a back end that has the logits here defines `logits(ids)`
for the last position, reusing its KV cache for the longest common prefix; one behind a server asks it).

Confidence: each decision keeps the model's own probability of the chosen token (softmax over the whole
vocabulary, no mask: a model that wanted to write something outside the schema was not sure) and the likeliest
other allowed token among its TOP_K (llama-server reports exactly these). A field's confidence is the product over
its decisions (1 when the schema forced it whole), the answer's the product over all; the most uncertain product
decision names the runner-up products.
"""
from __future__ import annotations

import bisect
import json
from dataclasses import dataclass

from .task import ACTIONS, MAX_QUANTITY, NO_OPERATION, format_answer

LAST_CHAR = chr(0x10FFFF)
TOP_K = 10   # the model's likeliest tokens a runner-up is looked for among
FIELD_KEYS = (("quantity", '"quantity":'), ("product", '"product":'), ("action", ""))


class AnswerSchema:
    def __init__(self, products: list[str], max_quantity: int = MAX_QUANTITY):
        self.answers = sorted([" " + format_answer(a, p, q) for a in ACTIONS for p in products
                               for q in range(1, max_quantity + 1)] + [" " + format_answer(NO_OPERATION, None, None)])
        self._complete = set(self.answers)

    def _range(self, text: str) -> tuple[int, int]:
        return bisect.bisect_left(self.answers, text), bisect.bisect_right(self.answers, text + LAST_CHAR)

    def viable(self, text: str) -> bool:
        lo, hi = self._range(text)
        return lo < hi

    def complete(self, text: str) -> bool:
        return text in self._complete

    def forced(self, text: str) -> str:
        """The characters every valid answer starting with `text` continues with (may be empty)."""
        lo, hi = self._range(text)
        if lo >= hi:
            return ""
        first, last = self.answers[lo], self.answers[hi - 1]
        n = len(text)
        while n < min(len(first), len(last)) and first[n] == last[n]:
            n += 1
        return first[len(text):n]

    def products_after(self, text: str, limit: int) -> list[str]:
        """The first `limit` products of the valid answers that start with `text` (a prefix inside a product name)."""
        lo, hi = self._range(text)
        names = []
        while lo < hi and len(names) < limit:
            answer = self.answers[lo]
            names.append(json.loads(answer)["product"])
            same_product = answer[: answer.rindex(', "quantity": ')]
            lo = bisect.bisect_right(self.answers, same_product + LAST_CHAR, lo, hi)
        return names

    def next_chars(self, text: str) -> list[str]:
        """Every character that can follow `text` in a valid answer, jumping over whole blocks."""
        chars, (lo, hi) = [], self._range(text)
        while lo < hi:
            if len(self.answers[lo]) == len(text):  # text itself is complete
                lo += 1
                continue
            char = self.answers[lo][len(text)]
            chars.append(char)
            lo = bisect.bisect_right(self.answers, text + char + LAST_CHAR, lo, hi)
        return chars


class Vocabulary:
    """Token strings in a character trie, so masking visits only the prefixes that stay viable."""

    def __init__(self, token_strings: list[str]):
        self.strings = token_strings
        self.trie: dict = {}
        self._memo: dict = {}
        for token, text in enumerate(token_strings):
            if text and "\ufffd" not in text:
                node = self.trie
                for char in text:
                    node = node.setdefault(char, {})
                node.setdefault(None, []).append(token)  # key None: tokens ending here

    def allowed(self, schema: AnswerSchema, answer: str) -> list[int]:
        """Tokens that keep `answer` a prefix of a valid answer; states recur across prompts, so memoized."""
        key = (id(schema), answer)
        found = self._memo.get(key)   # one lookup: another thread (serve) may clear the memo meanwhile
        if found is None:
            if len(self._memo) > 100_000:
                self._memo.clear()
            found = self._memo[key] = self._walk(schema, answer)
        return found

    def _walk(self, schema: AnswerSchema, answer: str) -> list[int]:
        tokens, stack = [], [(self.trie, answer)]
        while stack:
            node, text = stack.pop()
            for char, child in node.items():
                if char is not None and schema.viable(text + char):
                    tokens += child.get(None, ())
                    stack.append((child, text + char))
        return tokens


@dataclass
class Choice:
    token: int
    probability: float           # the model's probability of the chosen token, over its whole vocabulary
    runner_up: int | None        # the likeliest other allowed token among the model's TOP_K, if any
    runner_up_probability: float = 0.0


def choice_from_logits(logits, allowed: list[int]) -> Choice:
    """The allowed token with the highest logit, with the probabilities a Choice holds."""
    import numpy as np
    scores = np.asarray(logits, dtype=np.float64)
    probabilities = np.exp(scores - scores.max())
    probabilities /= probabilities.sum()
    best = max(allowed, key=lambda t: scores[t])
    top = set(np.argpartition(-scores, TOP_K)[:TOP_K].tolist()) if len(scores) > TOP_K else set(range(len(scores)))
    others = [t for t in allowed if t != best and t in top]
    runner_up = max(others, key=lambda t: scores[t], default=None)
    return Choice(best, float(probabilities[best]), runner_up,
                  float(probabilities[runner_up]) if runner_up is not None else 0.0)


class Stepper:
    """One model decision at a time; subclasses define tokenize() and logits() (or choose() itself)."""

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def logits(self, ids: list[int]):
        raise NotImplementedError

    def choose(self, ids: list[int], allowed: list[int]) -> Choice:
        return choice_from_logits(self.logits(ids), allowed)


@dataclass
class Decision:
    field: str              # action, product or quantity: the value being written when the model chose
    before: str             # the answer text the chosen token continues
    choice: Choice


@dataclass
class ConstrainedResult:
    text: str
    model_calls: int       # forward passes, each one model decision (forced text needs none)
    decisions: list[Decision] = None


def decode(stepper, vocabulary: Vocabulary, schema: AnswerSchema, prompt: str,
           max_steps: int = 64) -> ConstrainedResult:
    answer, calls, heal, decisions = "", 0, True, []
    while not schema.complete(answer) and calls < max_steps:
        answer += schema.forced(answer)
        if schema.complete(answer):
            break
        ids = stepper.tokenize(prompt + answer)
        # Token healing: forced text may end inside a token the model was trained to emit whole
        # (' "' where training saw ' "remove",'): back off the last token and let the model choose
        # any token that re-covers it and goes on.
        last = vocabulary.strings[ids[-1]] if heal else ""
        base = answer[: len(answer) - len(last)] if last and answer.endswith(last) else answer
        allowed = [t for t in vocabulary.allowed(schema, base) if (base + vocabulary.strings[t]).startswith(answer)]
        if not allowed and base != answer:
            base, allowed = answer, vocabulary.allowed(schema, answer)
        calls += 1
        if allowed:
            choice = stepper.choose(ids[:-1] if base != answer else ids, allowed)
            again = decisions and decisions[-1].before == base and decisions[-1].choice.token == choice.token
            if len(allowed) > 1 and not again:   # one allowed token is no choice; a healed one chosen again, once
                decisions.append(Decision(field_at(base), base, choice))
            chosen = base + vocabulary.strings[choice.token]
        else:  # no single token fits (a vocabulary without that character): take the first valid one
            chosen = answer + schema.next_chars(answer)[0]
        heal = chosen != answer  # re-choosing the healed token itself: next step decodes without healing
        answer = chosen
    return ConstrainedResult(answer, calls, decisions)


def field_at(text: str) -> str:
    """Which field's value an answer prefix is in."""
    return next(name for name, key in FIELD_KEYS if key in text)


def confidence(result: ConstrainedResult, vocabulary: Vocabulary, schema: AnswerSchema, limit: int = 3) -> dict:
    """Per field and overall (products of the decisions' probabilities), and the runner-up at the most uncertain
    product decision: its probability and the products it leads to (up to `limit`)."""
    fields = {name: 1.0 for name, _ in FIELD_KEYS}
    for decision in result.decisions:
        fields[decision.field] *= decision.choice.probability
    out = {"overall": round(fields["action"] * fields["product"] * fields["quantity"], 6),
           **{name: round(value, 6) for name, value in fields.items()}, "runner_up": None}
    product_decisions = [d for d in result.decisions if d.field == "product" and d.choice.runner_up is not None]
    if product_decisions:
        weakest = min(product_decisions, key=lambda d: d.choice.probability)
        prefix = weakest.before + vocabulary.strings[weakest.choice.runner_up]
        out["runner_up"] = {"probability": round(weakest.choice.runner_up_probability, 6),
                            "margin": round(weakest.choice.probability - weakest.choice.runner_up_probability, 6),
                            "products": schema.products_after(prefix, limit)}
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
