"""profile-gpu: FP16 (transformers) vs GPTQ 4-bit (gptqmodel), optionally bitsandbytes NF4, on an NVIDIA GPU.

Each variant runs in a fresh process: load time, VRAM (NVML's figure for the process and torch's
peak allocated), the parameter-only footprint, then `requests` batch-1 requests timed phase by phase
(prefill, time to first token, decode, end to end), energy per generated token from NVML's total-energy
counter where the GPU has one, else from a power-sampling thread integrated over the run (the row says
which), and a batched-throughput run per `batch_sizes`. The GPU, compute capability, driver, CUDA and
torch versions and the GPTQ kernel gptqmodel selected are recorded: the paper's 82% GPTQ slowdown on
a T4 is most likely a slow fallback kernel, and this is where that shows. Fine-tuned models answer
for real; a shape twin generates a fixed number of tokens (the test split's median answer), EOS off.
Without a CUDA device the stage records a skipped result with the reason and succeeds.

    python -m stages.profile_gpu --config configs/smoke.toml
    python -m stages.profile_gpu --config configs/llama-1b-shape.toml     # the real 1B shape, on a GPU host

Writes artifacts/<run>/profiles/<host-id>/gpu/: results.json, fingerprint.json.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.text import Text

from cart_intent import artifacts, cli, hardware, registry
from cart_intent.backends import GPTQBackend, TransformersBackend
from cart_intent.config import as_dict, require
from cart_intent.models import quantization_sources
from cart_intent.records import GpuRow, checked
from cart_intent.task import ANSWER_TOKENS, build_prompt, median_answer_tokens, read_split

PACKAGES = ["torch", "transformers", "gptqmodel", "bitsandbytes", "nvidia-ml-py"]
VARIANTS = ("fp16", "gptq", "nf4")


@dataclass
class ProfileGPUConfig:
    variants: list[str] = field(default_factory=lambda: ["fp16", "gptq"])   # add "nf4" for bitsandbytes 4-bit
    requests: int = 100                # timed batch-1 requests per variant
    warmup: int = 3
    batch_sizes: list[int] = field(default_factory=lambda: [16, 64])        # batched-throughput runs
    power_sample_ms: int = 20          # power sampling when the GPU has no energy counter
    timeout_s: int = 1800              # per variant process

    def validate(self) -> None:
        require(self.variants and set(self.variants) <= set(VARIANTS), "variants", f"some of {', '.join(VARIANTS)}")
        require(self.requests >= 1 and self.warmup >= 0, "requests", "requests >= 1 and warmup >= 0")
        require(all(b >= 2 for b in self.batch_sizes), "batch_sizes", "batch sizes >= 2 (batch 1 always runs)")
        require(self.power_sample_ms >= 5 and self.timeout_s >= 10, "power_sample_ms", ">= 5 (and timeout_s >= 10)")


# ---- the worker: one variant, in its own process ----------------------------------------------------------

class Energy:
    """Joules used by the GPU over a span: NVML's total-energy counter, else integrated power samples."""

    def __init__(self, nvml, handle, sample_s: float):
        self.nvml, self.handle, self.sample_s = nvml, handle, sample_s
        try:
            nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            self.method = "nvml total energy counter"
        except nvml.NVMLError:
            self.method = f"power sampled every {sample_s * 1000:.0f} ms, integrated"

    def __enter__(self) -> "Energy":
        self.joules, self.samples, self._stop = 0.0, [], threading.Event()
        if self.method.startswith("nvml"):
            self._start_mj = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000))
            self._stop.wait(self.sample_s)

    def __exit__(self, *exc) -> None:
        if self.method.startswith("nvml"):
            self.joules = (self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self._start_mj) / 1000
        else:
            self._stop.set()
            self._thread.join()
            pairs = zip(self.samples, self.samples[1:])
            self.joules = sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in pairs)


def load_variant(variant: str, path: str):
    import torch
    if variant == "gptq":
        return GPTQBackend.load(Path(path))
    if variant == "fp16":
        return TransformersBackend.load(Path(path))
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cuda:0")
    return TransformersBackend(model, AutoTokenizer.from_pretrained(path))


def timed_request(model, tokenizer, prompt: str, fixed: int, max_tokens: int) -> dict:
    """Greedy answer with a KV cache, CUDA-synchronized per phase; `fixed` > 0 forces the length, EOS off."""
    import torch
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # CPU: the tests' path
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
    eos = tokenizer.eos_token_id
    with torch.inference_mode():
        sync()
        began = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        new = []
        while True:
            logits = out.logits[0, -1]
            if fixed:
                logits[eos] = -float("inf")
            new.append(int(logits.argmax()))
            if len(new) == 1:
                sync()
                first = time.perf_counter()
            done = len(new) >= (fixed or max_tokens) or (not fixed and (new[-1] == eos or "}" in tokenizer.decode(new[-1:])))
            if done:
                break
            out = model(input_ids=torch.tensor([[new[-1]]], device=model.device), past_key_values=out.past_key_values,
                        use_cache=True)
        sync()
        ended = time.perf_counter()
    return {"prompt_tokens": ids.shape[1], "generated_tokens": len(new), "ttft_s": first - began,
            "decode_s": ended - first, "latency_s": ended - began}


def batched_throughput(model, tokenizer, prompts: list[str], batch: int, fixed: int, max_tokens: int) -> dict:
    import torch
    chunk = (prompts * (batch // len(prompts) + 1))[:batch]
    inputs = tokenizer(chunk, return_tensors="pt", padding=True).to(model.device)
    extra = {"min_new_tokens": fixed} if fixed else {"stop_strings": ["}"], "tokenizer": tokenizer}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    began = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=fixed or max_tokens,
                             pad_token_id=tokenizer.pad_token_id, **extra)
    sync()
    seconds = time.perf_counter() - began
    new = out[:, inputs["input_ids"].shape[1]:]
    generated = int((new != tokenizer.pad_token_id).sum())
    return {"batch": batch, "seconds": round(seconds, 4), "generated_tokens": generated,
            "tok_s": round(generated / seconds, 2), "requests_per_s": round(batch / seconds, 2)}


def worker(spec_file: Path) -> int:
    import pynvml as nvml
    import torch
    spec = json.loads(spec_file.read_text())
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    backend = load_variant(spec["variant"], spec["path"])
    torch.cuda.synchronize()
    load_s = time.perf_counter() - began
    model, tokenizer = backend.model, backend.tokenizer
    model.eval()
    prompts, fixed, max_tokens = spec["prompts"], spec["fixed_tokens"], spec["max_tokens"]
    for prompt in prompts[: spec["warmup"]]:
        timed_request(model, tokenizer, prompt, fixed, max_tokens)
    with Energy(nvml, handle, spec["power_sample_ms"] / 1000) as energy:
        requests = [timed_request(model, tokenizer, p, fixed, max_tokens) for p in prompts]
    latencies = [r["latency_s"] for r in requests]
    generated = sum(r["generated_tokens"] for r in requests)
    batched = [batched_throughput(model, tokenizer, prompts, b, fixed, max_tokens) for b in spec["batch_sizes"]]
    pid = os.getpid()
    process_bytes = max((p.usedGpuMemory or 0 for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                         if p.pid == pid), default=None)
    result = {"variant": spec["variant"], "load_s": round(load_s, 3), "kernel": getattr(backend, "kernel", None),
              "parameter_bytes": model.get_memory_footprint(), "torch_peak_allocated_bytes": torch.cuda.max_memory_allocated(),
              "nvml_process_bytes": process_bytes, "requests": len(requests),
              "generated_tokens_mean": round(generated / len(requests), 2),
              "decode_tok_s": round(sum(r["generated_tokens"] - 1 for r in requests) / sum(r["decode_s"] for r in requests), 2),
              "e2e_tok_s": round(generated / sum(latencies), 2),
              "ttft_mean_s": round(statistics.mean(r["ttft_s"] for r in requests), 4),
              "latency_mean_s": round(statistics.mean(latencies), 4),
              "latency_p95_s": round(hardware.percentile(latencies, 95), 4),
              "energy_j": round(energy.joules, 3), "energy_j_per_token": round(energy.joules / generated, 5),
              "energy_method": energy.method, "batched": batched}
    nvml.nvmlShutdown()
    artifacts.write_json(Path(spec["result"]), result)
    return 0


# ---- the stage ---------------------------------------------------------------------------------------------

def gpu_facts() -> dict:
    import torch
    props = torch.cuda.get_device_properties(0)
    versions = artifacts.package_versions(["transformers", "gptqmodel", "bitsandbytes"])  # "not installed" if absent
    return {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "memory_bytes": props.total_memory, "cuda": torch.version.cuda, "torch": torch.__version__,
            "driver": (hardware.gpus() or [{}])[0].get("driver"), **versions}


def median_answer_tokens_hf(tokenizer_dir: str, examples: list[dict]) -> int:
    """The test split's median answer length in this model's tokens (the shape twin's fixed length)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return median_answer_tokens(examples, lambda text: len(tok(text, add_special_tokens=False)["input_ids"]))


def run(run_cfg, cfg: ProfileGPUConfig, args) -> int:
    run_dir = run_cfg.run_dir
    manifests = registry.upstream(run_dir, "profile_gpu", skip=() if "gptq" in cfg.variants else ("gptq",))
    facts = hardware.fingerprint()
    host = hardware.host_id(facts)
    stage = artifacts.StageRun("profile-gpu", f"profiles/{host}/gpu", run_dir, as_dict(cfg),
                               artifacts.input_fingerprint(manifests), artifacts.code_hash(__file__), PACKAGES)
    if cli.already_done(stage, args):
        return 0
    import torch
    out = stage.fresh_tmp()
    artifacts.write_json(out / "fingerprint.json", {**facts, "host_id": host})
    if not torch.cuda.is_available():
        reason = "no CUDA device on this host (torch.cuda.is_available() is False)"
        artifacts.write_json(out / "results.json", {"host": host, "skipped": reason, "rows": []})
        stage.results.update(host=host, skipped=reason)
        stage.publish()
        cli.console.print(Text.assemble(("profile-gpu skipped", "yellow"), f": {reason}"))
        return 0
    test = read_split(run_dir, "test")
    prompts = [build_prompt(test[i % len(test)]["text"]) for i in range(cfg.requests)]
    gpu = gpu_facts()
    rows = []
    for slug, source in quantization_sources(run_dir).items():
        if "skipped" in source:
            rows.append(checked(GpuRow, {"model": slug, "skipped": source["skipped"]}))
            continue
        fixed = median_answer_tokens_hf(source["path"], test) if source["kind"] == "shape" else 0
        paths = {"fp16": source["path"], "nf4": source["path"], "gptq": str(run_dir / "gptq" / slug)}
        for variant in cfg.variants:
            if variant == "gptq" and not (run_dir / "gptq" / slug / "quantize_config.json").is_file():
                rows.append(checked(GpuRow, {"model": slug, "variant": variant,
                                             "skipped": "no GPTQ folder (see the gptq stage)"}))
                continue
            cli.console.rule(f"{slug} {variant}" + (f" (shape twin: {fixed} tokens, EOS off)" if fixed else ""))
            spec = {"variant": variant, "path": paths[variant], "prompts": prompts, "warmup": cfg.warmup,
                    "fixed_tokens": fixed, "max_tokens": ANSWER_TOKENS, "batch_sizes": cfg.batch_sizes,
                    "power_sample_ms": cfg.power_sample_ms, "result": str(out / f".{slug}__{variant}.json")}
            try:
                result = hardware.run_worker("stages.profile_gpu", spec, cfg.timeout_s)
            except RuntimeError as err:
                cli.console.print(Text.assemble(("profile-gpu failed ", "red"), str(err)))
                return 1
            rows.append(checked(GpuRow, {"model": slug, "source": source["kind"], "fixed_tokens": fixed, **result}))
    artifacts.write_json(out / "results.json", {"host": host, "gpu": gpu, "rows": rows})
    stage.results.update(host=host, gpu=gpu, rows=rows)
    stage.publish()
    display = {f"{r['model']} {r.get('variant', '')}": r if "skipped" in r else {
        "load s": r["load_s"], "VRAM GB": round((r["nvml_process_bytes"] or r["torch_peak_allocated_bytes"]) / 1e9, 2),
        "params GB": round(r["parameter_bytes"] / 1e9, 2), "decode tok/s": r["decode_tok_s"], "e2e tok/s": r["e2e_tok_s"],
        "p95 s": r["latency_p95_s"], "J/token": r["energy_j_per_token"], "kernel": r["kernel"] or "-"} for r in rows}
    cli.show_results(f"GPU profile: {gpu['gpu']} (sm {gpu['compute_capability']}, CUDA {gpu['cuda']})", display,
                     ["load s", "VRAM GB", "params GB", "decode tok/s", "e2e tok/s", "p95 s", "J/token", "kernel"])
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"] and len(argv) == 2:
        return worker(Path(argv[1]))
    return cli.run_stage(__doc__, "profile_gpu", ProfileGPUConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
