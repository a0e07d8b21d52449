"""The training chain on the smoke config: base -> finetune -> merge, resume after SIGTERM, parity."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, SMOKE, manifest, stage

pytestmark = pytest.mark.integration


def test_base_is_a_loadable_tiny_llama(chain):
    base = manifest(chain, "base")["results"]["models"]["tiny"]
    folder = chain / "base" / "tiny"
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer.json"):
        assert (folder / name).exists(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["hidden_size"] % 256 == 0 and config["intermediate_size"] % 256 == 0
    # scored on as many validation examples as configured; a 4 M model trained only on the catalog's words is
    # no specialist before fine-tuning
    assert base["fewshot_probe_examples"] == manifest(chain, "base")["config"]["fewshot_probe"]
    assert base["fewshot_3shot_exact_match"] < 0.5
    assert base["history"][-1]["loss"] < base["history"][0]["loss"]


def test_finetune_records_history_and_throughput(chain):
    record = manifest(chain, "finetune")["results"]["models"]["tiny"]
    assert (chain / "finetune" / "tiny" / "adapter" / "adapter_model.safetensors").exists()
    assert not (chain / "finetune" / "tiny" / "checkpoints").exists()
    assert record["evaluations"] and all("val_exact_match" in h and "eval_loss" in h for h in record["evaluations"])
    assert record["train_tokens_per_s"] > 0 and record["peak_rss_mib"] > 0
    assert record["best_checkpoint"].startswith("checkpoint-")
    assert record["shared_prefix_tokens"] > 5  # the smoke config trains through the shared-prefix path
    assert record["plain_loop"]["tokens_per_s"] > 0 and record["vs_plain_loop"] > 0
    history = json.loads((chain / "finetune" / "tiny" / "history.json").read_text())
    every = manifest(chain, "finetune")["config"]["logging_steps"]
    logged = [row["step"] for row in history["step_log"] if "loss" in row]
    assert logged == list(range(every, record["steps"] + 1, every))  # one row per logging step


def test_merge_parity_and_model_folder(chain):
    record = manifest(chain, "merge")["results"]["models"]["tiny"]
    assert record["parity_prompts"] >= 50 and record["parity_agreement"] >= 0.98
    folder = chain / "merge" / "tiny"
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.model", "README.md"):
        assert (folder / name).exists(), name
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float16"


def test_rerun_skips_unchanged_stages(chain):
    before = manifest(chain, "finetune")["finished"]
    proc = stage("finetune", chain.parent)
    assert "up to date" in proc.stderr and manifest(chain, "finetune")["finished"] == before


# measured, not reproduced: elapsed and throughput fields, and which checkpoint a run resumed from
TIMING_FIELDS = {"elapsed_s", "train_elapsed_s", "wall_s", "train_tokens_per_s", "peak_rss_mib", "plain_loop", "vs_plain_loop",
                 "resumed_from"}


def reproducible_history(run_dir) -> dict:
    history = json.loads((run_dir / "finetune" / "tiny" / "history.json").read_text())
    strip = lambda rows: [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in rows]  # noqa: E731
    return {k: strip(v) if isinstance(v, list) else v for k, v in history.items() if k not in TIMING_FIELDS}


def finetune_run(root, chain, *extra):
    """A finetune of the chain's data and base under root/smoke, checkpointing every 10 steps (mid-epoch)."""
    run_dir = root / "smoke"
    run_dir.mkdir(parents=True)
    for folder in ("data", "base"):
        os.symlink(chain / folder, run_dir / folder)
    cmd = [sys.executable, "-m", "stages.finetune", "--config", SMOKE, "--set", f"run.artifacts_dir='{root}'",
           "--set", "finetune.eval_steps=10", "--set", "finetune.logging_steps=7", *extra]
    return run_dir, cmd


def test_finetune_resume_is_bit_identical_to_an_uninterrupted_run(chain, tmp_path):
    """SIGTERM after a checkpoint in the second epoch, not on a logging step; the rerun resumes from it and
    publishes the adapter and history an uninterrupted run publishes (batch order, RNG, averaged loss)."""
    whole_dir, cmd = finetune_run(tmp_path / "whole", chain)
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    run_dir, cmd = finetune_run(tmp_path / "resumed", chain)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    saved = run_dir / ".finetune.tmp" / "tiny" / "checkpoints" / "checkpoint-40" / "cart_resume.json"
    deadline = time.time() + 600
    while time.time() < deadline and not saved.exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    assert not (run_dir / "finetune").exists()  # nothing half-trained is published
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    record = manifest(run_dir, "finetune")["results"]["models"]["tiny"]
    assert record["resumed_from"] in ("checkpoint-40", "checkpoint-50", "checkpoint-60")
    adapter = "finetune/tiny/adapter/adapter_model.safetensors"
    assert (run_dir / adapter).read_bytes() == (whole_dir / adapter).read_bytes()
    assert reproducible_history(run_dir) == reproducible_history(whole_dir)
    assert [row["step"] for row in reproducible_history(run_dir)["evaluations"]] == [10, 20, 30, 40, 50, 60, 62]


def read_events(folder) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from TensorBoard event files (TFRecord framing: length, crc, event, crc)."""
    import struct
    from tensorboardX.proto.event_pb2 import Event
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_events_hold_the_logged_steps(chain, tmp_path):
    run_dir = tmp_path / "smoke"
    run_dir.mkdir()
    for folder in ("data", "base"):
        os.symlink(chain / folder, run_dir / folder)
    stage("finetune", tmp_path, "--set", 'finetune.report_to=["tensorboard"]', "--set", "finetune.plain_loop_steps=0")
    history = json.loads((run_dir / "finetune" / "tiny" / "history.json").read_text())
    events = read_events(run_dir / "finetune" / "tiny" / "tensorboard")
    logged = [(row["step"], row["loss"]) for row in history["step_log"] if "loss" in row]
    assert [step for step, _ in events["train/loss"]] == [step for step, _ in logged]
    assert [round(v, 4) for _, v in events["train/loss"]] == [round(v, 4) for _, v in logged]
    assert "eval/loss" in events and "train/learning_rate" in events


def test_missing_upstream_names_make_target(tmp_path):
    proc = stage("finetune", tmp_path, check=False)
    assert proc.returncode == 3 and "make generate" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_hub_model_is_one_line(chain, tmp_path):
    run_dir = tmp_path / "smoke"
    run_dir.mkdir()
    os.symlink(chain / "data", run_dir / "data")
    env_cmd = ["--set", "base.models=['no-such-org/no-such-model']"]
    proc = subprocess.run([sys.executable, "-m", "stages.base", "--config", SMOKE, "--set",
                           f"run.artifacts_dir='{tmp_path}'", *env_cmd], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert "no-such-org/no-such-model" in proc.stderr and "HF_TOKEN" in proc.stderr
