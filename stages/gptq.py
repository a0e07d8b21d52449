"""gptq: 4-bit GPTQ (gptqmodel) of each merged FP16 model, and of a shape twin's weights directly.

Calibration: prompt+completion texts from the training split, `calibration_per_language` per
language (the paper's notebook: 100 English, 100 Croatian, 100 Spanish), drawn with a fixed seed.
Runs on CUDA, or on the CPU (gptqmodel's CPU worker pool is sized here: GPTQMODEL_CPU_WORKERS >= 2).
The result is loaded back to record the inference kernel gptqmodel picks and the share of greedy
answers identical to the FP16 model's on validation prompts (recorded, not a gate).

    python -m stages.gptq --config configs/tiny.toml
    python -m stages.gptq --config configs/smoke.toml        # seconds

Writes artifacts/<run>/gptq/<slug>/: a folder both gptqmodel and transformers load
(model.safetensors, quantize_config.json, config.json with its quantization_config, tokenizer).
"""
from __future__ import annotations

import contextlib
import os
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cart_intent import artifacts, cli, registry
from cart_intent.backends import GPTQBackend, TransformersBackend, agreement
from cart_intent.cards import card, model_meta, model_origin
from cart_intent.config import as_dict, require
from cart_intent.models import count_parameters, quantization_sources, safetensors_bytes
from cart_intent.task import build_completion, build_prompt, read_split

PACKAGES = ["torch", "transformers", "gptqmodel", "optimum", "safetensors"]


@dataclass
class GPTQConfig:
    bits: int = 4
    group_size: int = 128               # -1: one group per row
    calibration_per_language: int = 100
    calibration_seed: int = 42
    calibration_min_tokens: int = 10    # gptqmodel drops shorter texts (its calibration_data_min_length)
    batch_size: int = 8                 # calibration texts per forward pass
    parity_prompts: int = 100           # validation prompts compared with the FP16 model (0: skip)
    cpu_max_parameters: int = 200_000_000  # larger models are skipped on a CPU-only host (0: no limit):
                                        # the 1B shape twin takes ~40 min on 2 cores; quantize it on a GPU host

    def validate(self) -> None:
        require(self.bits in (2, 3, 4, 8), "bits", "2, 3, 4 or 8")
        require(self.group_size == -1 or self.group_size in (32, 64, 128, 256), "group_size",
                "-1, 32, 64, 128 or 256")
        require(self.calibration_per_language >= 1, "calibration_per_language", "an integer >= 1")
        require(self.calibration_min_tokens >= 1, "calibration_min_tokens", "an integer >= 1")
        require(self.batch_size >= 1, "batch_size", "an integer >= 1")
        require(self.parity_prompts >= 0, "parity_prompts", "an integer >= 0")
        require(self.cpu_max_parameters >= 0, "cpu_max_parameters", "an integer >= 0 (0: no limit)")


def calibration_texts(train: list[dict], per_language: int, seed: int) -> tuple[list[str], dict[str, int]]:
    """Language-balanced prompt+completion texts, the format the model was fine-tuned on."""
    rng = random.Random(seed)
    texts, counts = [], {}
    for lang in sorted({ex["lang"] for ex in train}):
        pool = [ex for ex in train if ex["lang"] == lang]
        chosen = rng.sample(pool, min(per_language, len(pool)))
        texts += [build_prompt(ex["text"]) + build_completion(ex["action"], ex["product"], ex["quantity"])
                  for ex in chosen]
        counts[lang] = len(chosen)
    return texts, counts


def quantize_one(source: dict, cfg: GPTQConfig, texts: list[str], probe: list[str], out: Path) -> dict:
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    record = {"source": source["kind"], "bits": cfg.bits, "group_size": cfg.group_size,
              "device": "cuda" if torch.cuda.is_available() else "cpu"}
    with artifacts.timer(record, "load_fp16_s"):
        # absolute: gptqmodel reads the checkpoint lazily during quantize(), which runs in another cwd
        model = GPTQModel.load(str(Path(source["path"]).resolve()),
                               QuantizeConfig(bits=cfg.bits, group_size=cfg.group_size))
    lengths = [len(model.tokenizer(text)["input_ids"]) for text in texts]
    record["calibration_texts_used"] = sum(n >= cfg.calibration_min_tokens for n in lengths)
    record["calibration_mean_tokens"] = round(sum(lengths) / len(lengths), 1)
    # gptqmodel writes a scratch log under ./logs: keep it out of the working tree (quant_log.csv is saved)
    with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch), artifacts.timer(record, "quantize_s"):
        model.quantize(texts, batch_size=cfg.batch_size, calibration_data_min_length=cfg.calibration_min_tokens)
    model.save(str(out))
    del model

    parameters = count_parameters(Path(source["path"]))
    record.update(parameters=parameters, bytes=safetensors_bytes(out), fp16_bytes=safetensors_bytes(Path(source["path"])))
    record["bits_per_weight"] = round(8 * record["bytes"] / parameters, 3)
    record["size_vs_fp16"] = round(record["bytes"] / record["fp16_bytes"], 4)
    with artifacts.timer(record, "load_quantized_s"):
        quantized = GPTQBackend.load(out)
    record["kernel"] = quantized.kernel
    if source["kind"] == "shape" or not probe:
        record["parity"] = {"skipped": "shape twin: random weights" if probe else "parity_prompts = 0"}
        return record
    with cli.progress("FP16 parity answers", len(probe)) as advance:
        reference = [c.text for c in TransformersBackend.load(Path(source["path"])).generate(probe, on_done=advance)]
    with cli.progress("GPTQ parity answers", len(probe)) as advance:
        outputs = [c.text for c in quantized.generate(probe, on_done=advance)]
    record["parity"] = {"prompts": len(probe), "identical_to_fp16": round(agreement(outputs, reference), 4)}
    return record


def model_card(spec: str, record: dict, merged: dict, run_name: str) -> str:
    """README.md of a GPTQ folder: the source's measured exact match, this file's agreement with it."""
    parity = record["parity"].get("identical_to_fp16")
    meta = model_meta(model_origin(spec), run_name, "gptqmodel", ["gptq", f"{record['bits']}-bit"],
                      [("validation exact match of the merged FP16 source", merged["val_exact_match"])])
    return card(meta, "\n".join([
        f"# {spec} fine-tuned for cart-intent extraction, GPTQ {record['bits']}-bit",
        "",
        f"GPTQ (gptqmodel) of the merged FP16 model: group size {record['group_size']}, "
        f"{record['calibration_texts_used']} calibration texts, {record['bits_per_weight']} bits per weight "
        f"({record['size_vs_fp16']:.0%} of FP16). Kernel on the quantizing host: `{record['kernel']}`.",
        f"Greedy answers identical to FP16 on {record['parity'].get('prompts', 0)} validation prompts: "
        + (f"{parity:.2f}." if parity is not None else record["parity"].get("skipped", "not measured") + "."),
        "The tokenizer's chat template renders one user message into the training prompt "
        "(system messages are ignored). Load with `GPTQModel.load(folder)` or transformers with gptqmodel installed.",
    ]))


def run(run_cfg, cfg: GPTQConfig, args) -> int:
    run_dir = run_cfg.run_dir
    manifests = registry.upstream(run_dir, "gptq")
    stage = artifacts.StageRun("gptq", "gptq", run_dir, as_dict(cfg), artifacts.input_fingerprint(manifests),
                               artifacts.code_hash(__file__), PACKAGES)
    if cli.already_done(stage, args):
        return 0
    train = read_split(run_dir, "train")
    val = read_split(run_dir, "val")
    texts, per_language = calibration_texts(train, cfg.calibration_per_language, cfg.calibration_seed)
    probe = [build_prompt(ex["text"]) for ex in val[: cfg.parity_prompts]]
    import torch
    out = stage.fresh_tmp()
    results = {}
    for slug, source in quantization_sources(run_dir).items():
        if "skipped" not in source and not torch.cuda.is_available() and cfg.cpu_max_parameters:
            parameters = count_parameters(Path(source["path"]))
            if parameters > cfg.cpu_max_parameters:
                source = {**source, "skipped": f"{parameters:,} parameters > gptq.cpu_max_parameters on a CPU-only "
                          f"host: run this stage on a GPU host (or raise the limit)"}
        if "skipped" in source:
            results[slug] = source
            continue
        cli.console.rule(f"GPTQ {cfg.bits}-bit {source['spec']} ({source['kind']})")
        results[slug] = {"spec": source["spec"], "calibration_per_language": per_language,
                         **quantize_one(source, cfg, texts, probe, out / slug)}
        if source["kind"] == "merged":
            merged = manifests["merge"]["results"]["models"][slug]
            (out / slug / "README.md").write_text(model_card(source["spec"], results[slug], merged, run_cfg.name),
                                                  encoding="utf-8")
    stage.results["models"] = results
    stage.publish()
    rows = {slug: {**r, "identical_to_fp16": r.get("parity", {}).get("identical_to_fp16", "-")}
            for slug, r in results.items()}
    cli.show_results("GPTQ", rows, ["bits_per_weight", "bytes", "quantize_s", "kernel", "identical_to_fp16"])
    return 0


def main(argv=None) -> int:
    # gptqmodel refuses to start on a 2-core CPU unless its loader pool may use 2 workers
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    return cli.run_stage(__doc__, "gptq", GPTQConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
