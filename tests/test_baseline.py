"""baseline: few-shot base model, and API models against a real OpenAI-compatible server on 127.0.0.1
(llama-cpp-python's server with the smoke GGUF): retries while it starts late, the cache, skips."""
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from cart_intent.child import free_port
from conftest import ROOT, SMOKE, manifest

pytestmark = pytest.mark.integration
SECRET = "sk-test-do-not-write-me-4242"


def start_server(model, port):
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "512"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return proc


def wait_ready(port, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "server exited"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError("server did not start")


def baseline(artifacts_dir, *sets, env=None):
    cmd = [sys.executable, "-m", "stages.baseline", "--config", SMOKE, "--set", f"run.artifacts_dir='{artifacts_dir}'",
           "--set", "baseline.limit=12", "--force"]
    for item in sets:
        cmd += ["--set", item]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OPENAI_API_KEY": SECRET, "HF_HUB_OFFLINE": "1", **(env or {})})


def test_open_weight_few_shot_and_unusable_models_are_skipped(quantized):
    proc = baseline(quantized.parent, "baseline.models=['tiny', 'classic:char-ngram', 'no-such-org/no-such-model', "
                                      "'shape:llama-3.2-1b']")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["model"]: r for r in manifest(quantized, "baseline")["results"]["rows"]}
    classic = rows["classic:char-ngram"]   # trained on the smoke run's 486 training messages (~10 per product)
    train_size = len((quantized / "data" / "train.jsonl").read_text().splitlines())
    assert classic["kind"] == "classic" and classic["shots"] == 0 and classic["train_examples"] == train_size
    assert classic["n"] == 12 and classic["train_s"] > 0 and classic["field_accuracy"]["action"] >= 0.75
    assert (quantized / "baseline" / "predictions" / "classic_char-ngram.jsonl").exists()
    assert rows["tiny"]["n"] == 12 and 0 <= rows["tiny"]["exact_match"] <= 1 and rows["tiny"]["shots"] == 2
    assert "weights unavailable" in rows["no-such-org/no-such-model"]["skipped"]
    assert "random weights" in rows["shape:llama-3.2-1b"]["skipped"]
    assert (quantized / "baseline" / "predictions" / "tiny.jsonl").exists()


def test_api_model_retries_a_late_server_then_reuses_the_cache(quantized):
    port = free_port()
    url = f"'http://127.0.0.1:{port}/v1'"
    sets = ["baseline.models=[]", "baseline.api_models=['smoke-gguf']", f"baseline.api.base_url={url}",
            "baseline.api.backoff_s=0.5", "baseline.api.max_retries=7", "baseline.api.concurrency=2"]
    gguf = quantized / "gguf" / "tiny" / "model-Q4_K_M.gguf"
    server = None
    try:
        first = subprocess.Popen([sys.executable, "-m", "stages.baseline", "--config", SMOKE, "--force", "--set",
                                  f"run.artifacts_dir='{quantized.parent}'", "--set", "baseline.limit=12",
                                  *[a for s in sets for a in ("--set", s)]], cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True, env={**os.environ, "OPENAI_API_KEY": SECRET})
        seen = []
        for line in first.stderr:  # start the server only once the stage has met the closed port
            seen.append(line)
            if "APIConnectionError, retry" in line:
                break
        server = start_server(gguf, port)
        wait_ready(port, server)
        _, err = first.communicate(timeout=300)
        err = "".join(seen) + err
        assert first.returncode == 0, err[-2000:]
        [row] = manifest(quantized, "baseline")["results"]["rows"]
        assert row["n"] == 12 and row["retries"] >= 1 and row["requests"] >= 12 and row["cache_hits"] == 0
        assert row["json_valid"] >= 0 and row["endpoint"] == url.strip("'")

        again = baseline(quantized.parent, *sets)
        assert again.returncode == 0, again.stderr[-2000:]
        [row] = manifest(quantized, "baseline")["results"]["rows"]
        assert row["requests"] == 0 and row["cache_hits"] == 12  # nothing asked twice
    finally:
        if server:
            server.terminate()
            server.wait(timeout=30)
    for path in quantized.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".md", ".log"):
            assert SECRET not in path.read_text(errors="ignore"), path


def test_unreachable_endpoint_and_missing_key_are_skipped(quantized):
    port = free_port()
    proc = baseline(quantized.parent, "baseline.models=[]", "baseline.api_models=['down', 'gpt-4.1-nano']",
                    "baseline.api.max_retries=1", "baseline.api.backoff_s=0.1",
                    f"baseline.api.base_url='http://127.0.0.1:{port}/v1'")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = manifest(quantized, "baseline")["results"]["rows"]
    assert all("failed 2 times: APIConnectionError" in r["skipped"] for r in rows)
    proc = baseline(quantized.parent, "baseline.models=[]", "baseline.api_models=['gpt-4.1']",
                    env={"OPENAI_API_KEY": ""})
    assert proc.returncode == 0
    [row] = manifest(quantized, "baseline")["results"]["rows"]
    assert row["skipped"] == "OPENAI_API_KEY is not set"
