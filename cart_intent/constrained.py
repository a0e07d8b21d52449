"""Schema-constrained greedy decoding with jump-forward, one algorithm for every back end.

The valid answers are ' {"action": "<add|remove>", "product": "<catalog name>", "quantity": <1..999>}':
a finite set, kept sorted, so "is this text the start of a valid answer" is a binary search and the
answers that start with a text form one contiguous range.

Decoding loop (greedy):
- jump-forward: when every valid continuation of the answer so far starts with the same characters
  (the schema's fixed parts, or the rest of a product name once it is unambiguous), they are appended
  without a decode step; the text is re-tokenized and only the tokens past the cached prefix are fed;
- otherwise one forward pass gives the next-token logits, masked to tokens that keep the text a prefix
  of a valid answer, and the best one is taken; the last token of the forced text is first backed off
  (token healing), so the model picks the token it was trained to emit there, e.g. ' "remove",' whole;
- the answer is complete when the text is a valid answer (no closing decode step either).

A back end provides a `Stepper`: `tokenize(text)` and `best(ids, allowed)`, the allowed token the model
scores highest after `ids` (a back end that has the logits here defines `logits(ids)` for the last position,
reusing its KV cache for the longest common prefix; one behind a server asks it for the choice).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from .task import ACTIONS, MAX_QUANTITY, format_answer

LAST_CHAR = chr(0x10FFFF)


class AnswerSchema:
    def __init__(self, products: list[str], max_quantity: int = MAX_QUANTITY):
        self.answers = sorted(" " + format_answer(a, p, q) for a in ACTIONS for p in products
                              for q in range(1, max_quantity + 1))
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


class Stepper:
    """One model decision at a time; subclasses define tokenize() and logits() (or best() itself)."""

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def logits(self, ids: list[int]):
        raise NotImplementedError

    def best(self, ids: list[int], allowed: list[int]) -> int:
        logits = self.logits(ids)
        return max(allowed, key=lambda t: logits[t])


@dataclass
class ConstrainedResult:
    text: str
    model_calls: int       # forward passes, each one model decision (forced text needs none)


def decode(stepper, vocabulary: Vocabulary, schema: AnswerSchema, prompt: str,
           max_steps: int = 64) -> ConstrainedResult:
    answer, calls, heal = "", 0, True
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
            chosen = base + vocabulary.strings[stepper.best(ids[:-1] if base != answer else ids, allowed)]
        else:  # no single token fits (a vocabulary without that character): take the first valid one
            chosen = answer + schema.next_chars(answer)[0]
        heal = chosen != answer  # re-choosing the healed token itself: next step decodes without healing
        answer = chosen
    return ConstrainedResult(answer, calls)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
