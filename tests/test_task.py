"""The task library: parser never raises and finds the first object; the scorer is strict; labelled files hold
only rows the schema allows."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from cart_intent.artifacts import MissingArtifact, StageRun
from cart_intent.task import (BadExamples, build_completion, build_prompt, exact_match, field_matches, format_answer,
                             is_valid, parse_output, read_examples, read_split)

ROOT = Path(__file__).resolve().parents[1]

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
    assert not is_valid({**GOLD, "quantity": 1000}) and is_valid({**GOLD, "quantity": 999})
    assert not is_valid({**GOLD, "extra": 1})
    assert not is_valid({**GOLD, "action": "delete"})


NONE = {"action": "none", "product": None, "quantity": None}


def test_the_none_form_is_one_shape_scored_like_any_label():
    assert format_answer("none", "Lip Balm", 3) == '{"action": "none", "product": null, "quantity": null}'
    assert is_valid(dict(NONE), {"Lip Balm"}) and is_valid({"action": "none"}, {"Lip Balm"})
    assert not is_valid({"action": "none", "product": "Lip Balm"}) and not is_valid({**NONE, "extra": 1})
    assert exact_match({"action": "none"}, NONE) and exact_match(parse_output(build_completion(**NONE)), NONE)
    assert not exact_match(dict(GOLD), NONE) and not exact_match(dict(NONE), GOLD)
    assert field_matches({"action": "none", "quantity": 0}, NONE) == {"action": True, "product": True,
                                                                       "quantity": False}


def test_a_none_row_may_leave_product_and_quantity_out(tmp_path):
    path = tmp_path / "oos.jsonl"
    path.write_text(json.dumps({"text": "where is my order?", "action": "none"}) + "\n")
    assert read_examples(path, {"Lip Balm"}) == [{"text": "where is my order?", **NONE}]


def test_prompt_and_completion_round_trip():
    prompt = build_prompt("Can you delet 12 lip balms for me?")
    assert prompt.endswith("Message: Can you delet 12 lip balms for me?\nJSON:")
    completion = build_completion("remove", "Lip Balm", 12)
    assert completion == ' {"action": "remove", "product": "Lip Balm", "quantity": 12}'
    assert parse_output(prompt + completion) == GOLD
    shots = build_prompt("dodaj med", [{"text": "add a pen", **GOLD}])
    assert "Message: add a pen\nJSON: " + format_answer(**GOLD) in shots


ROW = {"text": "Can you delet 12 lip balms for me?", **GOLD}


@pytest.mark.parametrize("change, problem", [
    ({"product": "Unicorn"}, "product 'Unicorn' is not in the catalog"),
    ({"product": 7}, "product 7 is not in the catalog"),
    ({"action": "buy"}, "action must be one of add, remove, none, not 'buy'"),
    ({"action": "none"}, 'action "none" takes no product or quantity (null or left out)'),
    ({"action": "none", "product": None}, 'action "none" takes no quantity (null or left out)'),
    ({"product": None}, "product None is not in the catalog"),
    ({"quantity": 0}, "quantity must be an integer from 1 to 999, not 0"),
    ({"quantity": 1000}, "quantity must be an integer from 1 to 999, not 1000"),
    ({"quantity": True}, "quantity must be an integer from 1 to 999, not True"),
    ({"quantity": "12"}, "quantity must be an integer from 1 to 999, not '12'"),
    ({"text": " "}, "text must be a non-empty string"),
])
def test_rows_outside_the_schema_are_rejected_with_file_and_line(tmp_path, change, problem):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROW) + "\n\n")
    assert read_examples(path, {"Lip Balm"}) == [ROW]
    path.write_text(json.dumps(ROW) + "\n\n" + json.dumps({**ROW, **change}) + "\n")  # line 3, after a blank
    with pytest.raises(BadExamples) as err:
        read_examples(path, {"Lip Balm"})
    assert str(err.value) == f"{path}:3: {problem}"


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_line_separators_inside_a_text_survive_the_jsonl_round_trip(tmp_path, separator):
    """Rows are written with ensure_ascii=False, which leaves these unescaped; a reader splitting at them cut a
    row in two ("not valid JSON" in the next stage). Every JSONL reader splits at "\\n" only."""
    from cart_intent.artifacts import read_jsonl, write_jsonl
    row = {**ROW, "text": f"add 12 lip{separator}balms"}
    write_jsonl(tmp_path / "train.jsonl", [row, ROW])
    assert read_examples(tmp_path / "train.jsonl", {"Lip Balm"}) == [row, ROW]
    assert read_jsonl(tmp_path / "train.jsonl") == [row, ROW]


def test_a_bad_row_in_a_run_split_names_the_generate_target(tmp_path):
    stage = StageRun("generate", "data", tmp_path, {}, {}, "code", [])
    (stage.fresh_tmp() / "train.jsonl").write_text(json.dumps(ROW) + "\n" + json.dumps({**ROW, "quantity": 5000}) + "\n")
    stage.publish()
    with pytest.raises(MissingArtifact, match=r"train.jsonl:2: quantity .* `make generate FORCE=1`"):
        read_split(tmp_path, "train")


def test_a_stage_refuses_to_train_on_a_bad_row(tmp_path):
    """The base stage (the first to read the splits) stops with exit 3 and writes nothing."""
    stage = StageRun("generate", "data", tmp_path / "smoke", {}, {}, "code", [])
    out = stage.fresh_tmp()
    (out / "train.jsonl").write_text(json.dumps(ROW) + "\n" + json.dumps({**ROW, "product": "Unicorn"}) + "\n")
    (out / "val.jsonl").write_text(json.dumps(ROW) + "\n")
    stage.publish()
    proc = subprocess.run([sys.executable, "-m", "stages.base", "--config", "configs/smoke.toml", "--set",
                           f"run.artifacts_dir='{tmp_path}'"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert "train.jsonl:2: product 'Unicorn' is not in the catalog" in proc.stderr
    assert not (tmp_path / "smoke" / "base").exists()
