"""make publish without the network: which files go to which repo, cards checked first, the token never shown;
a Hub that does not answer (a closed port on 127.0.0.1) is one line and exit 1."""
import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, SMOKE
from cart_intent.artifacts import StageRun
from cart_intent.config import ConfigError
from stages.publish import PublishConfig, plan

TOKEN = "hf_test_secret_never_shown_0123456789"


def publish(artifacts_dir, *sets, env_extra=None, dry_run=True):
    cmd = [sys.executable, "-m", "stages.publish", "--config", SMOKE, "--set", f"run.artifacts_dir='{artifacts_dir}'",
           *[arg for item in sets for arg in ("--set", item)], *(["--dry-run"] if dry_run else [])]
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.integration
def test_the_plan_sends_what_a_user_needs_and_nothing_else(quantized):
    proc = publish(quantized.parent, "publish.namespace='someone'", "publish.folders=['data','merge','gguf']")
    assert proc.returncode == 0, proc.stderr[-2000:]
    uploads = {item["repo_id"]: item for item in json.loads(proc.stdout)}
    assert set(uploads) == {"someone/cart-intent-smoke", "someone/cart-intent-smoke-tiny-merge",
                            "someone/cart-intent-smoke-tiny-gguf"}
    data = uploads["someone/cart-intent-smoke"]
    assert data["repo_type"] == "dataset"
    assert set(data["files"]) == {"README.md", "stats.json", "catalog.json", "train.jsonl", "val.jsonl", "test.jsonl"}
    gguf = set(uploads["someone/cart-intent-smoke-tiny-gguf"]["files"])
    assert {"README.md", "schema.json", "answer.gbnf", "Modelfile", "model-Q4_K_M.gguf", "model-f16.gguf"} <= gguf
    assert not {f for f in gguf if f.endswith(".log") or f == "manifest.json"}
    merged = set(uploads["someone/cart-intent-smoke-tiny-merge"]["files"])
    assert {"model.safetensors", "config.json", "tokenizer_config.json", "README.md"} <= merged
    assert all(item["bytes"] > 0 for item in uploads.values())


@pytest.mark.integration
def test_no_token_is_one_line_and_a_dead_hub_is_exit_1_without_the_token(quantized):
    proc = publish(quantized.parent, "publish.namespace='someone'", env_extra={"HF_TOKEN": ""}, dry_run=False)
    assert proc.returncode == 2 and "HF_TOKEN is not set" in proc.stderr and "Traceback" not in proc.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = publish(quantized.parent, "publish.namespace='someone'", dry_run=False,
                   env_extra={"HF_TOKEN": TOKEN, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_ETAG_TIMEOUT": "2",
                              "HF_HUB_DOWNLOAD_TIMEOUT": "2"})
    assert proc.returncode == 1 and "publish failed" in proc.stderr and "Traceback" not in proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr


def test_a_card_without_front_matter_stops_the_plan(tmp_path):
    stage = StageRun("generate", "data", tmp_path / "smoke", {}, {}, "code", [])
    out = stage.fresh_tmp()
    (out / "train.jsonl").write_text("{}\n")
    (out / "README.md").write_text("# A dataset\n\nno front matter\n")
    stage.publish()
    with pytest.raises(ConfigError, match=r"data/README.md: no YAML front matter .*make generate FORCE=1"):
        plan(tmp_path / "smoke", "smoke", PublishConfig(namespace="someone", folders=["data"]))


def test_a_missing_folder_names_its_target(tmp_path):
    from cart_intent.artifacts import MissingArtifact
    with pytest.raises(MissingArtifact, match="make gguf"):
        plan(tmp_path / "smoke", "smoke", PublishConfig(namespace="someone", folders=["gguf"]))
