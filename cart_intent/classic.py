"""The classic NLU baseline a shop gets for free: char n-gram TF-IDF features and one linear classifier per field.

As Rasa-style pipelines do it (character n-gram features, a classifier, an entity extractor for numbers):
- action (add, remove or none, the none-form as one more intent, as Rasa's out-of-scope intent) and product:
  scikit-learn's `TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True)`
  then `LogisticRegression` (defaults; enough iterations to converge), one pair per field, seeded;
- quantity: the first number written in digits, read by a regular expression (the entity extractor); when the
  message has none ("two", "dva", "una docena", "a pair"), the quantity is a class the same kind of classifier
  predicts from the training messages' quantities.
Product and quantity learn from the cart operations only (a none-form row has neither). Trained on the run's
training split only; answers are the task's JSON, scored by the same scorer as every model.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from .task import Completion, format_answer, is_cart_operation

KIND = "classic"
MODELS = ("classic:char-ngram",)                 # the `classic:` model specs baseline.models may name
DIGITS = re.compile(r"(?<![\d.,])(\d{1,4})(?![\d.,]*\d)")


def first_number(text: str) -> int | None:
    """The first whole number written in digits (1-9999), or None."""
    match = DIGITS.search(text)
    return int(match.group(1)) if match and int(match.group(1)) >= 1 else None


def _classifier(seed: int):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    return make_pipeline(TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True),
                         LogisticRegression(max_iter=2000, random_state=seed))


@dataclass
class CharNgramModel:
    """`fit(rows)` on labelled rows (text, action, product, quantity), then `answer(texts)` -> Completions."""
    seed: int = 0
    fields: dict = field(default_factory=dict)
    train_s: float = 0.0

    def fit(self, rows: list[dict]) -> "CharNgramModel":
        began = time.perf_counter()
        operations = [row for row in rows if is_cart_operation(row)]
        for name in ("action", "product", "quantity"):
            learn_from = rows if name == "action" else operations
            texts, labels = [row["text"] for row in learn_from], [str(row[name]) for row in learn_from]
            if len(set(labels)) == 1:   # one class: nothing to learn, always that answer
                self.fields[name] = labels[0]
            else:
                self.fields[name] = _classifier(self.seed).fit(texts, labels)
        self.train_s = time.perf_counter() - began
        return self

    def _predict(self, name: str, texts: list[str]) -> list[str]:
        model = self.fields[name]
        return [model] * len(texts) if isinstance(model, str) else list(model.predict(texts))

    def answer(self, texts: list[str]) -> list[Completion]:
        """One answer per text; each Completion carries its share of the batch's time."""
        began = time.perf_counter()
        actions, products = self._predict("action", texts), self._predict("product", texts)
        guessed = self._predict("quantity", texts)
        answers = [format_answer(action, product, first_number(text) or int(quantity))
                   for text, action, product, quantity in zip(texts, actions, products, guessed, strict=True)]
        each = (time.perf_counter() - began) / max(len(texts), 1)
        return [Completion(answer, 0, 0, each) for answer in answers]
