"""The task library: parser never raises and finds the first object; the scorer is strict."""
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from stages.lib.task import (build_completion, build_prompt, exact_match, field_matches, format_answer,
                             is_valid, parse_output)

GOLD = {"action": "remove", "product": "Lip Balm", "quantity": 12}
answers = st.fixed_dictionaries({"action": st.sampled_from(["add", "remove"]),
                                 "product": st.text(min_size=1, max_size=20),
                                 "quantity": st.integers(1, 10_000)})


@settings(max_examples=300)
@given(st.text())
def test_parser_never_raises(text):
    result = parse_output(text)
    assert result is None or isinstance(result, dict)


@settings(max_examples=200)
@given(st.text(alphabet=st.characters(blacklist_characters="{}")), answers, st.text())
def test_parser_finds_object_after_arbitrary_prefix(prefix, answer, suffix):
    assert parse_output(prefix + json.dumps(answer, ensure_ascii=False) + suffix) == answer


@given(st.integers(1, 200))
def test_parser_survives_deep_nesting_and_junk(depth):
    assert parse_output("{" * depth) is None
    assert parse_output("[" * 5000 + "]" * 5000) is None
    assert parse_output(f'{"{" * depth} junk {json.dumps(GOLD)}') == GOLD


def test_parser_adversarial_cases():
    assert parse_output(None) is None
    assert parse_output("") is None
    assert parse_output('{"a": 1') is None
    assert parse_output('[1, 2] {"action": "add"} {"b": 2}') == {"action": "add"}
    assert parse_output('```json\n{"action": "add", "product": "Pen", "quantity": 2}\n```') == \
        {"action": "add", "product": "Pen", "quantity": 2}
    assert set(parse_output('{"x": NaN}')) == {"x"}  # Python's json accepts NaN; it must not raise
    assert parse_output("{bad} {\"ok\": true}") == {"ok": True}


def test_scorer_is_strict():
    assert exact_match(dict(GOLD), GOLD)
    assert not exact_match({**GOLD, "quantity": "12"}, GOLD)
    assert not exact_match({**GOLD, "quantity": 12.0}, GOLD)
    assert not exact_match({**GOLD, "quantity": True}, {**GOLD, "quantity": 1})
    assert not exact_match({**GOLD, "product": "lip balm"}, GOLD)
    assert not exact_match({"action": "remove", "product": "Lip Balm"}, GOLD)
    assert not exact_match(None, GOLD)
    assert field_matches({**GOLD, "action": "add"}, GOLD) == {"action": False, "product": True, "quantity": True}


def test_validity_checks_schema_and_catalog():
    assert is_valid(dict(GOLD), {"Lip Balm"})
    assert not is_valid(dict(GOLD), {"Pen"})
    assert not is_valid({**GOLD, "quantity": 0})
    assert not is_valid({**GOLD, "extra": 1})
    assert not is_valid({**GOLD, "action": "delete"})


def test_prompt_and_completion_round_trip():
    prompt = build_prompt("Can you delet 12 lip balms for me?")
    assert prompt.endswith("Message: Can you delet 12 lip balms for me?\nJSON:")
    completion = build_completion("remove", "Lip Balm", 12)
    assert completion == ' {"action": "remove", "product": "Lip Balm", "quantity": 12}'
    assert parse_output(prompt + completion) == GOLD
    shots = build_prompt("dodaj med", [{"text": "add a pen", **GOLD}])
    assert "Message: add a pen\nJSON: " + format_answer(**GOLD) in shots
