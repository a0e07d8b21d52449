"""The result rows' declarations: what metrics.summarize returns is exactly a Scores record, a renamed or dropped
field is refused where it is written and where it is read."""
import json

import pytest

from cart_intent.artifacts import MissingArtifact
from cart_intent.metrics import score, summarize
from cart_intent.records import BaselineRow, EvalRow, Scores, checked, read_rows
from cart_intent.task import Completion

EXAMPLE = {"id": "t1", "lang": "en", "text": "add 2 apples", "action": "add", "product": "Apple", "quantity": 2}


def summarized() -> dict:
    answer = Completion(text='{"action": "add", "product": "Apple", "quantity": 2}', prompt_tokens=30,
                        completion_tokens=14, seconds=0.1)
    return summarize(score([EXAMPLE], [answer], {"Apple"}))


def test_summarize_returns_exactly_the_declared_scores():
    assert set(summarized()) == Scores.__required_keys__


def test_a_renamed_or_dropped_field_is_refused():
    row = {"model": "tiny", "kind": "open-weight", "shots": 3, "examples_per_s": 2.0, **summarized()}
    assert checked(BaselineRow, row) is row
    renamed = {("em" if key == "exact_match" else key): value for key, value in row.items()}
    with pytest.raises(ValueError, match=r"missing \['exact_match'\], undeclared \['em'\]"):
        checked(BaselineRow, renamed)
    with pytest.raises(ValueError, match="missing"):
        checked(EvalRow, row)   # a baseline row is not an evaluation row
    assert checked(EvalRow, {"variant": "x/gptq", "skipped": "no GPTQ folder"})


def test_reading_rows_another_version_wrote_names_the_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"rows": [{"variant": "tiny/fp16", "exact_match": 0.9}]}))
    with pytest.raises(MissingArtifact, match=r"results.json row 1: does not match EvalRow .*FORCE=1"):
        read_rows(path, EvalRow)
