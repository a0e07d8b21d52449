"""The constrained decoder's schema and vocabulary: forced text, the characters and tokens that keep an
answer valid (the decoder itself runs on real models in test_evaluate and test_serve)."""
from cart_intent.constrained import AnswerSchema, Vocabulary, common_prefix

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
    assert SCHEMA.next_chars(' {"action": "') == ["a", "r"]
    assert SCHEMA.next_chars(' {"action": "add", "product": "Lip') == [" ", "s"]
    assert SCHEMA.viable(' {"action": "add", "product": "Lip B') and not SCHEMA.viable(' {"action": "buy')
    assert SCHEMA.next_chars(' {"action": "add", "product": "Milk", "quantity": ')[:2] == ["1", "2"]
    assert "0" not in SCHEMA.next_chars(' {"action": "add", "product": "Milk", "quantity": ')


def test_vocabulary_allows_only_viable_tokens():
    vocab = Vocabulary(["a", "add", ' "add",', "r", "remove", "x", "", "\ufffd"])
    allowed = [vocab.strings[t] for t in vocab.allowed(SCHEMA, ' {"action": "')]
    assert sorted(allowed) == ["a", "add", "r", "remove"]
    allowed = [vocab.strings[t] for t in vocab.allowed(SCHEMA, ' {"action":')]
    assert allowed == [' "add",']
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0
