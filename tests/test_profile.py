"""profile-cpu and profile-gpu on the smoke run; the host fingerprint and bandwidth probe (unit)."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, stage
from cart_intent import hardware


def test_host_id_reads_as_hardware_and_is_stable():
    facts = {"cpu_model": "AMD EPYC 9654 96-Core Processor", "usable_cores": 4, "isa": ["avx2", "avx512f"],
             "ram_bytes": 16 * 2**30, "gpus": [{"name": "NVIDIA H100 80GB HBM3"}]}
    assert hardware.host_id(facts) == hardware.host_id(dict(facts))
    assert hardware.host_id(facts).startswith("amd-epyc-9654-4c-h100-80gb-hbm3-")
    assert hardware.host_id({**facts, "isa": ["avx2"]}) != hardware.host_id(facts)   # different kernels, different host


def test_bandwidth_probe_and_percentile():
    probe = hardware.memory_bandwidth(mib=64, repeats=2)
    assert probe["read_gb_s"] > 0.1 and probe["threads"] >= 1
    assert hardware.percentile([1, 2, 3, 4, 5], 50) == 3.0 and hardware.percentile([0, 10], 95) == 9.5


@pytest.mark.integration
def test_profile_cpu_every_variant_and_mode(quantized):
    stage("profile_cpu", quantized.parent, "--set", "profile_cpu.requests=6", "--set", "profile_cpu.warmup=1",
          "--set", "profile_cpu.bandwidth_mib=64", "--set", 'profile_cpu.types=["F16", "Q4_K_M"]')
    (folder,) = (quantized / "profiles").glob("*/cpu")
    results = json.loads((folder / "results.json").read_text())
    assert json.loads((folder / "fingerprint.json").read_text())["host_id"] == folder.parent.name == results["host"]
    rows = {(r["variant"], r["mode"]): r for r in results["rows"]}
    assert set(rows) == {(v, m) for v in ("F16", "Q4_K_M") for m in ("naive", "prefix_cached", "prefix_cached_constrained")}
    for (variant, mode), row in rows.items():
        assert row["requests"] == 6 and row["load_s"] > 0 and row["threads"] >= 1
        assert 0 < row["ttft_mean_s"] <= row["latency_mean_s"] <= row["latency_p95_s"] * 1.0001
        assert row["decode_tok_s"] > 0 and row["prompt_tok_s"] > 0 and row["e2e_tok_s"] > 0
        assert row["peak_rss_bytes"] >= row["rss_after_load_bytes"] > row["rss_before_load_bytes"]
        assert 0 < row["bandwidth_share"] and row["weights_read_per_token_bytes"] > 0
        if mode != "naive":   # the instruction's KV state is reused: fewer tokens processed, same answers
            assert row["processed_tokens_mean"] < rows[(variant, "naive")]["processed_tokens_mean"]
        if mode == "prefix_cached":
            assert row["identical_to_naive"] == 1.0
    assert rows[("F16", "naive")]["plain_llama_cpp"]["decode_tok_s"] > 0
    assert rows[("F16", "naive")]["file_bytes"] > rows[("Q4_K_M", "naive")]["file_bytes"]
    requests = (folder / "requests" / "tiny__F16.jsonl").read_text().splitlines()
    assert len(requests) == 3 * 6 and {"ttft_s", "decode_s", "output"} <= set(json.loads(requests[0]))


@pytest.mark.integration
def test_profile_gpu_without_cuda_is_skipped_with_reason(quantized):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the GPU check script covers this host")
    stage("profile_gpu", quantized.parent)
    (folder,) = (quantized / "profiles").glob("*/gpu")
    results = json.loads((folder / "results.json").read_text())
    assert "no CUDA device" in results["skipped"] and (folder / "manifest.json").is_file()


@pytest.mark.gpu
@pytest.mark.integration
def test_profile_gpu_measures_fp16_and_gptq_on_cuda(quantized):
    """On a CUDA host: memory, speed and load time of both variants, the GPTQ one through a GPU kernel."""
    stage("profile_gpu", quantized.parent)   # variants fp16 and gptq (the default)
    (folder,) = (quantized / "profiles").glob("*/gpu")
    rows = {r["variant"]: r for r in json.loads((folder / "results.json").read_text())["rows"] if "variant" in r}
    assert set(rows) == {"fp16", "gptq"}, rows
    for row in rows.values():
        assert row["torch_peak_allocated_bytes"] > 0 and row["decode_tok_s"] > 0 and row["load_s"] > 0
    assert rows["gptq"]["kernel"], "GPTQ ran without a quantized kernel"


def test_profile_cpu_without_gguf_names_make_target(tmp_path):
    stage("generate", tmp_path)
    proc = stage("profile_cpu", tmp_path, check=False)
    assert proc.returncode == 3 and "make gguf" in proc.stderr


@pytest.mark.integration
def test_gpu_request_timing_logic_on_cpu(quantized):
    """profile-gpu's request loop and batched run, exercised on the CPU (no CUDA here): real answers stop at
    the closing brace; a fixed length with EOS off generates exactly that many tokens."""
    from cart_intent.task import build_prompt
    from stages.profile_gpu import batched_throughput, load_variant, timed_request
    backend = load_variant("fp16", str(quantized / "merge" / "tiny"))
    prompt = build_prompt("dodaj 3 paste za zube")
    answer = timed_request(backend.model, backend.tokenizer, prompt, fixed=0, max_tokens=48)
    assert 1 <= answer["generated_tokens"] <= 48 and 0 < answer["ttft_s"] <= answer["latency_s"]
    fixed = timed_request(backend.model, backend.tokenizer, prompt, fixed=20, max_tokens=48)
    assert fixed["generated_tokens"] == 20
    batch = batched_throughput(backend.model, backend.tokenizer, [prompt, build_prompt("remove 2 apples")], 4,
                               fixed=8, max_tokens=48)
    assert batch["batch"] == 4 and batch["generated_tokens"] >= 4 * 8 - 4 and batch["tok_s"] > 0


@pytest.mark.integration
def test_contention_benchmark_times_every_setting_alone_and_beside_a_competitor(quantized, tmp_path):
    """scripts/bench_contention.py on the smoke run's Q4_K_M and base: a row per setting with both timings."""
    out = tmp_path / "contention.json"
    subprocess.run([sys.executable, "scripts/bench_contention.py", "--run", str(quantized), "--repeats", "1",
                    "--out", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=900)
    result = json.loads(out.read_text())
    assert result["hogs"] == 1 and result["competitor"] == "busy"
    assert {row["work"] for row in result["rows"]} == {"llama.cpp answer", "torch training step"}
    assert len(result["rows"]) == 10   # five settings, two kinds of work
    for row in result["rows"]:
        assert row["alone_s"] > 0 and row["beside_1_busy_s"] > 0
        assert row["fair_slowdown"] == round(max(1.0, (row["threads"] + 1) / result["cores"]), 2)
