"""The constrained decoder's schema and vocabulary: forced text, the characters and tokens that keep an
answer valid, and the confidence of its choices on a scripted model (the decoder itself runs on real models in
test_evaluate and test_serve)."""
import math

import pytest

from cart_intent.constrained import AnswerSchema, Stepper, Vocabulary, common_prefix, confidence, decode

SCHEMA = AnswerSchema(["Lip Balm", "Lipstick", "Milk"], max_quantity=50)


def test_schema_forces_fixed_text_and_unambiguous_names():
    assert SCHEMA.forced("") == ' {"action": "'
    assert SCHEMA.forced(' {"action": "r') == 'emove", "product": "'
    assert SCHEMA.forced(' {"action": "add", "product": "Li') == "p"       # Lip Balm or Lipstick
    assert SCHEMA.forced(' {"action": "add", "product": "M') == 'ilk", "quantity": '
    assert SCHEMA.forced(' {"action": "add", "product": "Milk", "quantity": 5') == ""  # 5} or 50}
    assert SCHEMA.complete(' {"action": "add", "product": "Milk", "quantity": 50}')
    assert not SCHEMA.complete(' {"action": "add", "product": "Milk", "quantity": 51}')


def test_schema_next_chars_and_viability():
    assert SCHEMA.next_chars(' {"action": "') == ["a", "n", "r"]
    assert SCHEMA.forced(' {"action": "n') == 'one", "product": null, "quantity": null}'
    assert SCHEMA.complete(' {"action": "none", "product": null, "quantity": null}')
    assert SCHEMA.next_chars(' {"action": "add", "product": "Lip') == [" ", "s"]
    assert SCHEMA.viable(' {"action": "add", "product": "Lip B') and not SCHEMA.viable(' {"action": "buy')
    assert SCHEMA.next_chars(' {"action": "add", "product": "Milk", "quantity": ')[:2] == ["1", "2"]
    assert "0" not in SCHEMA.next_chars(' {"action": "add", "product": "Milk", "quantity": ')


def test_vocabulary_allows_only_viable_tokens():
    vocab = Vocabulary(["a", "add", ' "add",', "r", "remove", "x", "", "\ufffd"])
    allowed = [vocab.strings[t] for t in vocab.allowed(SCHEMA, ' {"action": "')]
    assert sorted(allowed) == ["a", "add", "r", "remove"]   # no token spells the none-form's "n"
    allowed = [vocab.strings[t] for t in vocab.allowed(SCHEMA, ' {"action":')]
    assert allowed == [' "add",']
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0


class ScriptedStepper(Stepper):
    """A character-level model with fixed logits: one token per character of the answers' alphabet."""

    def __init__(self, alphabet: str, scores: dict[str, float]):
        self.alphabet, self.scores = alphabet, scores

    def tokenize(self, text: str) -> list[int]:
        return [self.alphabet.index(c) for c in text if c in self.alphabet]

    def logits(self, ids: list[int]):
        return [self.scores.get(c, 0.0) for c in self.alphabet]


def test_confidence_is_the_product_of_the_model_choices_per_field_with_the_runner_up_products():
    schema = AnswerSchema(["Milk", "Mints", "Bread"], max_quantity=3)
    alphabet = "".join(sorted({c for a in schema.answers for c in a} | set("PZ")))
    vocab = Vocabulary(list(alphabet))
    stepper = ScriptedStepper(alphabet, {"a": 3.0, "M": 2.0, "B": 1.0, "i": 1.0, "l": 1.5, "n": 0.5, "2": 4.0})
    result = decode(stepper, vocab, schema, "P")
    assert result.text == ' {"action": "add", "product": "Milk", "quantity": 2}'
    made = [(d.field, alphabet[d.choice.token]) for d in result.decisions]
    assert made == [("action", "a"), ("product", "M"), ("product", "l"), ("quantity", "2")]
    probability = {c: math.exp(s) / sum(math.exp(stepper.scores.get(x, 0.0)) for x in alphabet)
                   for c, s in stepper.scores.items()}
    found = confidence(result, vocab, schema)
    assert found["action"] == pytest.approx(probability["a"], abs=1e-6)
    assert found["product"] == pytest.approx(probability["M"] * probability["l"], abs=1e-6)
    assert found["overall"] == pytest.approx(probability["a"] * probability["M"] * probability["l"] * probability["2"],
                                             abs=1e-6)
    # the weakest product decision was "l" over "n" (Milk over Mints); its runner-up leads to Mints
    assert found["runner_up"]["products"] == ["Mints"]
    assert found["runner_up"]["probability"] == pytest.approx(probability["n"], abs=1e-6)


def test_the_none_form_needs_one_decision_and_has_no_runner_up_product():
    schema = AnswerSchema(["Milk", "Bread"], max_quantity=3)
    alphabet = "".join(sorted({c for a in schema.answers for c in a} | set("P")))
    vocab = Vocabulary(list(alphabet))
    result = decode(ScriptedStepper(alphabet, {"n": 5.0}), vocab, schema, "P")
    assert result.text == ' {"action": "none", "product": null, "quantity": null}' and len(result.decisions) == 1
    found = confidence(result, vocab, schema)
    assert found["product"] == found["quantity"] == 1.0 and found["runner_up"] is None
    assert 0 < found["overall"] == found["action"] < 1
