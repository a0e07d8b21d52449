"""GPTQ and GGUF stages on the smoke run: every configured file, each loads and answers, manifest records."""
import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, SMOKE, manifest, stage
from stages.gguf.stage import SUPPORTED, GGUFConfig
from cart_intent.config import load_stage_config
from cart_intent.task import build_prompt

pytestmark = pytest.mark.integration
PROMPT = build_prompt("dodaj 3 paste za zube")


def smoke_types():
    return load_stage_config(SMOKE, "gguf", GGUFConfig)[1].types


def test_gguf_writes_every_configured_type_with_records(quantized):
    record = manifest(quantized, "gguf")["results"]
    assert re.fullmatch(r"[0-9a-f]{40}", record["llama_cpp_commit"]) and record["llama_cpp_python"] == "0.3.36"
    variants = record["models"]["tiny"]["variants"]
    assert set(variants) == {"F16", *smoke_types()}
    for name, variant in variants.items():
        path = quantized / "gguf" / "tiny" / variant["file"]
        assert path.stat().st_size == variant["bytes"] > 0
        # the smoke model's k-quants give FP16's answer on 75-80% of the parity prompts
        assert variant["parity"]["identical_to_fp16"] >= 0.5 and variant["parity"]["prompts"] == 20
    bpw = {name: v["bits_per_weight"] for name, v in variants.items()}
    assert bpw["Q3_K_M"] < bpw["Q4_K_M"] < bpw["Q5_K_M"] < bpw["F16"] and 15.5 < bpw["F16"] < 17
    # F16 is the same weights in llama.cpp: its answers match transformers' (FP32 compute) nearly always
    assert variants["F16"]["parity"]["identical_to_fp16"] >= 0.9


def test_each_gguf_loads_and_answers(quantized):
    from cart_intent.backends import GGUFBackend
    for path in sorted((quantized / "gguf" / "tiny").glob("*.gguf")):
        [completion] = GGUFBackend(path, n_threads=2).generate([PROMPT])
        assert completion.completion_tokens > 0 and completion.text.strip(), path.name
        assert completion.prompt_tokens > 10 and completion.seconds > 0


def test_gptq_folder_records_and_loads_in_gptqmodel_and_transformers(quantized):
    record = manifest(quantized, "gptq")["results"]["models"]["tiny"]
    assert (record["bits"], record["group_size"]) == (4, 128)
    assert record["calibration_per_language"] == {"en": 16, "es": 16, "hr": 16}
    assert record["calibration_texts_used"] == 48 and record["quantize_s"] > 0 and record["kernel"]
    assert record["bits_per_weight"] < 16 and record["size_vs_fp16"] < 1
    # 4-bit g128 of the smoke model gives the same greedy answers as FP16 on 20/20 validation prompts here;
    # a broken quantization (or parity check) falls far below
    assert record["parity"]["prompts"] == 20 and record["parity"]["identical_to_fp16"] >= 0.8
    folder = quantized / "gptq" / "tiny"
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 4

    from cart_intent.backends import GPTQBackend, TransformersBackend
    backend = GPTQBackend.load(folder)
    assert backend.kernel == record["kernel"]
    assert backend.generate([PROMPT])[0].completion_tokens > 0
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    assert any(hasattr(m, "qweight") for m in model.modules())
    hf = TransformersBackend(model, backend.tokenizer)
    assert hf.generate([PROMPT])[0].completion_tokens > 0


def test_unknown_gguf_type_is_one_line_listing_supported(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stages.gguf", "--config", SMOKE, "--set", "gguf.types=['Q9_K']",
                           "--set", f"run.artifacts_dir='{tmp_path}'"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if "config error" in line]
    assert "gguf.types" in line and "Q9_K" in line and all(t in line for t in SUPPORTED)


def test_gptq_without_merge_names_make_target(tmp_path):
    proc = stage("gptq", tmp_path, check=False)
    assert proc.returncode == 3 and "make generate" in proc.stderr and "Traceback" not in proc.stderr
