"""evaluate on the smoke run: every variant in both decoding modes, saved predictions, batched = batch 1."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, SMOKE, manifest, stage

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def evaluated(quantized):
    stage("evaluate", quantized.parent)
    return quantized


def rows(run_dir, folder="eval"):
    return {(r["variant"], r["decoding"]): r for r in json.loads((run_dir / folder / "results.json").read_text())["rows"]}


def test_every_variant_in_both_modes_with_metrics(evaluated):
    results = rows(evaluated)
    gguf_types = manifest(evaluated, "gguf")["results"]["models"]["tiny"]["variants"]
    expected = {"tiny/fp16", "tiny/gptq", *(f"tiny/gguf-{'f16' if t == 'F16' else t}" for t in gguf_types)}
    assert {v for v, _ in results} == expected
    assert {m for _, m in results} == {"free", "constrained"}
    reference = [json.loads(line)["correct"] for line in
                 (evaluated / "eval" / "predictions" / "tiny__fp16__free.jsonl").read_text().splitlines()]
    for (variant, mode), row in results.items():
        assert row["n"] == 60 and row["exact_match_ci95"][0] <= row["exact_match"] <= row["exact_match_ci95"][1]
        assert set(row["by_language"]) == {"en", "hr", "es"} and row["by_quantity"] and row["by_noise"]
        assert set(row["field_accuracy"]) == {"action", "product", "quantity"}
        assert row["examples_per_s"] > 0
        predictions = evaluated / "eval" / "predictions" / f"{variant.replace('/', '__')}__{mode}.jsonl"
        saved = [json.loads(line) for line in predictions.read_text().splitlines()]
        assert len(saved) == 60 and {"id", "text", "raw", "parsed", "correct", "latency_s"} <= set(saved[0])
        assert sum(p["correct"] for p in saved) / 60 == pytest.approx(row["exact_match"], abs=1e-4)
        # McNemar against FP16's free decoding: its counts are the disagreements in the two prediction files
        mine = [p["correct"] for p in saved]
        assert row["mcnemar_vs_fp16"]["only_reference_correct"] == sum(r and not c for r, c in zip(reference, mine))
        assert row["mcnemar_vs_fp16"]["only_candidate_correct"] == sum(c and not r for r, c in zip(reference, mine))


def test_constrained_is_valid_never_less_accurate_and_needs_fewer_calls(evaluated):
    results = rows(evaluated)
    for (variant, mode), row in results.items():
        if mode != "constrained":
            continue
        free = results[(variant, "free")]
        assert row["json_valid"] == 1.0, variant
        assert row["exact_match"] >= free["exact_match"], variant
        assert row["model_calls_per_answer"] < free["model_calls_per_answer"], variant


def test_batched_answers_equal_batch_size_one(evaluated):
    results = rows(evaluated)
    for variant in ("tiny/fp16", "tiny/gptq"):
        row = results[(variant, "free")]
        assert row["batch1_identical"] is True and row["batch1_examples_per_s"] > 0 and row["batched_speedup"] > 0


def test_custom_data_file_and_malformed_line(evaluated, tmp_path):
    good = [json.dumps({"text": "dodaj 3 mlijeka", "action": "add", "product": "Milk", "quantity": 3, "lang": "hr"}),
            json.dumps({"text": "remove two apples", "action": "remove", "product": "Apple", "quantity": 2})]
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(good) + "\n")
    stage("evaluate", evaluated.parent, "--data", str(data), "--constrained")
    mine = rows(evaluated, "eval-mine")
    assert {m for _, m in mine} == {"constrained"} and all(r["n"] == 2 for r in mine.values())
    # eval/'s fallback thresholds (chosen on validation) applied to the set's constrained Q4_K_M answers
    assert mine[("tiny/gguf-Q4_K_M", "constrained")]["fallback"]["examples"] == 2
    assert "fallback" not in mine[("tiny/fp16", "constrained")]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(good[0] + "\n" + json.dumps({"text": "x", "action": "buy", "product": "Milk", "quantity": 1}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "stages.evaluate", "--config", SMOKE, "--data", str(bad), "--set",
                           f"run.artifacts_dir='{evaluated.parent}'"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{bad}:2: action must be one of add, remove" in proc.stderr
    assert not (evaluated / "eval-bad").exists()


def test_gguf_on_llama_server_slots_gives_the_in_process_answers(evaluated, tmp_path):
    """evaluate.gguf_slots=3: the GGUF variants decoded three messages at a time on llama-server, in both modes,
    answer exactly as one message at a time in process."""
    test_rows = (evaluated / "data" / "test.jsonl").read_text().splitlines()[:12]
    for name, slots in (("in_process", 1), ("slots", 3)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(test_rows) + "\n")
        stage("evaluate", evaluated.parent, "--data", str(tmp_path / f"{name}.jsonl"), "--set",
              f"evaluate.gguf_slots={slots}")
    served = rows(evaluated, "eval-slots")
    gguf = [key for key in served if "gguf" in key[0]]
    assert len(gguf) == 2 * len(manifest(evaluated, "gguf")["results"]["models"]["tiny"]["variants"])
    for variant, mode in gguf:
        assert served[(variant, mode)]["gguf_slots"] == 3
        answers = {}
        for name in ("in_process", "slots"):
            predictions = evaluated / f"eval-{name}" / "predictions" / f"{variant.replace('/', '__')}__{mode}.jsonl"
            answers[name] = [json.loads(line)["raw"] for line in predictions.read_text().splitlines()]
        assert answers["slots"] == answers["in_process"] and len(answers["slots"]) == 12, (variant, mode)


def test_the_fallback_is_chosen_on_validation_and_serve_takes_it_from_there(evaluated):
    from types import SimpleNamespace
    from cart_intent.intent import ServeConfig, thresholds
    chosen = json.loads((evaluated / "eval" / "results.json").read_text())["fallback"]["tiny/gguf-Q4_K_M"]
    val = (evaluated / "data" / "val.jsonl").read_text().splitlines()
    assert chosen["validation"]["examples"] == len(val) and chosen["test"]["examples"] == 60
    assert 0 <= chosen["threshold"] <= 1 and 0 <= chosen["ambiguity_margin"] <= 1
    if chosen["threshold"] or chosen["ambiguity_margin"]:   # room was left: the budget holds on validation
        assert chosen["validation"]["false_rejections"] <= chosen["max_false_rejections"]
    saved = evaluated / "eval" / "predictions" / "val__tiny__gguf-Q4_K_M__constrained.jsonl"
    assert all(json.loads(line)["confidence"]["overall"] > 0 for line in saved.read_text().splitlines())
    gguf = evaluated / "gguf" / "tiny" / "model-Q4_K_M.gguf"
    limits = thresholds(SimpleNamespace(run_dir=evaluated), ServeConfig(), gguf)
    assert (limits.threshold, limits.margin) == (chosen["threshold"], chosen["ambiguity_margin"])
    assert limits.source.startswith("validation split")
    assert thresholds(SimpleNamespace(run_dir=evaluated), ServeConfig(fallback="off"), gguf).threshold == 0.0
