"""gguf: llama.cpp files of each merged FP16 model (and of a shape twin's weights): F16 plus k-quants.

One llama.cpp version does everything: the commit vendored in the pinned llama-cpp-python. Its
`convert_hf_to_gguf.py` (installed by `make venv`, see scripts/llama_cpp_build.py) writes
model-f16.gguf; the binding's `llama_model_quantize` makes each type in `types`. Each quantized
file's greedy answers are compared with the FP16 model's on validation prompts (recorded, not a gate).

    python -m stages.gguf --config configs/tiny.toml
    python -m stages.gguf --config configs/smoke.toml --set 'gguf.types=["Q4_K_M"]'

Writes artifacts/<run>/gguf/<slug>/model-f16.gguf, model-<TYPE>.gguf (each with the chat template that renders
one user message into the training prompt), and for a fine-tuned model schema.json, answer.gbnf, an Ollama
Modelfile per type (Modelfile: Q4_K_M) and a README.md card; the converter's, quantizer's and loader's logs.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.text import Text

from stages.gguf.bundle import write_bundle
from cart_intent import artifacts, cli, registry
from cart_intent.backends import GGUFBackend, TransformersBackend, agreement
from cart_intent.catalog import run_catalog
from cart_intent.config import ConfigError, as_dict, require
from cart_intent.llama_cpp_tools import ToolsMissing, converter, tensor_types
from cart_intent.models import count_parameters, quantization_sources
from cart_intent.task import build_prompt, read_split

PACKAGES = ["llama-cpp-python", "torch", "transformers", "sentencepiece", "numpy"]
# What llama.cpp makes without an importance matrix (IQ1/IQ2 and Q2_K_S need one; TQ and FP4 types are
# for ternary or MoE models).
SUPPORTED = ("BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0",
             "IQ4_XS", "IQ4_NL", "Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "Q2_K")


@dataclass
class GGUFConfig:
    types: list[str] = field(default_factory=lambda: ["Q3_K_M", "Q4_K_M", "Q5_K_M"])  # F16 is always made
    parity_prompts: int = 100    # validation prompts compared with the FP16 model (0: skip)
    threads: int = 0             # quantization and parity threads; 0: every core

    def validate(self) -> None:
        unknown = [t for t in self.types if t not in SUPPORTED]
        require(not unknown, "types", f"quantization types llama.cpp supports without an importance matrix, "
                f"not {', '.join(unknown)} (supported: {', '.join(SUPPORTED)})")
        require(len(set(self.types)) == len(self.types), "types", "each type once")
        require(self.parity_prompts >= 0, "parity_prompts", "an integer >= 0")
        require(self.threads >= 0, "threads", "an integer >= 0")


@contextmanager
def llama_log_to(log: Path):
    """Send llama.cpp's log (quantization tables, load notes) to a file instead of the console."""
    import llama_cpp
    from llama_cpp import _logger
    with open(log, "ab") as fh:
        @llama_cpp.llama_log_callback
        def write(level, text, user_data):
            fh.write(text)
        llama_cpp.llama_log_set(write, ctypes.c_void_p(0))
        try:
            yield
        finally:
            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def convert(source: Path, out_file: Path, log: Path) -> None:
    script, _ = converter()
    with open(log, "wb") as fh:
        proc = subprocess.run([sys.executable, str(script), str(source), "--outfile", str(out_file),
                               "--outtype", "f16"], stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {source} (exit {proc.returncode}): {tail[0]} "
                           f"- full log in {log}")


def quantize(f16: Path, out_file: Path, type_name: str, threads: int, log: Path) -> None:
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}")
    params.nthread = threads
    with llama_log_to(log):
        status = llama_cpp.llama_model_quantize(str(f16).encode(), str(out_file).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize {type_name} failed (status {status}) - see {log}")


def build_one(source: dict, cfg: GGUFConfig, probe: list[str], out: Path) -> dict:
    from rich.progress import Progress
    out.mkdir(parents=True)
    threads = cfg.threads or os.cpu_count()
    parameters = count_parameters(Path(source["path"]))
    files = {"F16": out / "model-f16.gguf", **{t: out / f"model-{t}.gguf" for t in cfg.types}}
    variants = {}
    with Progress(console=cli.console) as bar:
        task = bar.add_task(f"{source['spec']}: convert", total=len(files))
        for type_name, path in files.items():
            bar.update(task, description=f"{source['spec']}: {type_name}")
            timing = {}
            with artifacts.timer(timing, "seconds"):
                if type_name == "F16":
                    convert(Path(source["path"]), path, out / "convert.log")
                else:
                    quantize(files["F16"], path, type_name, threads, out / "quantize.log")
            size = path.stat().st_size
            variants[type_name] = {"file": path.name, "bytes": size, "bits_per_weight": round(8 * size / parameters, 3),
                                   "size_vs_f16": round(size / variants["F16"]["bytes"], 4) if variants else 1.0,
                                   "build_s": timing["seconds"], "tensor_types": tensor_types(path)}
            bar.advance(task)

    if source["kind"] == "shape" or not probe:
        reason = "shape twin: random weights" if probe else "parity_prompts = 0"
        for record in variants.values():
            record["parity"] = {"skipped": reason}
    else:
        with cli.progress("FP16 parity answers", len(probe)) as advance:
            reference = [c.text for c in TransformersBackend.load(Path(source["path"])).generate(probe, on_done=advance)]
        for type_name, path in files.items():
            with llama_log_to(out / "load.log"):
                backend = GGUFBackend(path, n_threads=threads)
            with cli.progress(f"{type_name} parity answers", len(probe)) as advance:
                outputs = [c.text for c in backend.generate(probe, on_done=advance)]
            variants[type_name]["parity"] = {"prompts": len(probe),
                                             "identical_to_fp16": round(agreement(outputs, reference), 4)}
            del backend
    return {"spec": source["spec"], "source": source["kind"], "parameters": parameters, "variants": variants}


def bundle(folder: Path, source: dict, variants: dict, merged: dict, products: list[str], run_name: str) -> list[str]:
    """The schema, grammar, Modelfiles and card beside a merged model's GGUF files."""
    from transformers import AutoTokenizer
    eos_token = AutoTokenizer.from_pretrained(source["path"]).eos_token
    return write_bundle(folder, source["spec"], variants, merged, eos_token, products, run_name)


def run(run_cfg, cfg: GGUFConfig, args) -> int:
    run_dir = run_cfg.run_dir
    manifests = registry.upstream(run_dir, "gguf")
    try:
        _, commit = converter()
    except ToolsMissing as err:
        raise ConfigError(str(err)) from None
    stage = artifacts.StageRun("gguf", "gguf", run_dir, as_dict(cfg), artifacts.input_fingerprint(manifests),
                               artifacts.code_hash(__file__), PACKAGES)
    if cli.already_done(stage, args):
        return 0
    import llama_cpp
    val = read_split(run_dir, "val")
    probe = [build_prompt(ex["text"]) for ex in val[: cfg.parity_prompts]]
    out = stage.fresh_tmp()
    results = {}
    for slug, source in quantization_sources(run_dir).items():
        if "skipped" in source:
            results[slug] = source
            continue
        cli.console.rule(f"GGUF {source['spec']} ({source['kind']})")
        try:
            results[slug] = build_one(source, cfg, probe, out / slug)
        except RuntimeError as err:
            cli.console.print(Text.assemble(("gguf failed ", "red"), str(err)))
            return 1
        if source["kind"] == "merged":
            results[slug]["bundle"] = bundle(out / slug, source, results[slug]["variants"],
                                             manifests["merge"]["results"]["models"][slug],
                                             run_catalog(run_dir).names, run_cfg.name)
    stage.results.update(llama_cpp_commit=commit, llama_cpp_python=llama_cpp.__version__,
                         cpu_features=llama_cpp.llama_print_system_info().decode().strip(), models=results)
    stage.publish()
    rows = {f"{slug} {t}": {**v, "identical_to_fp16": v["parity"].get("identical_to_fp16", "-")}
            for slug, r in results.items() for t, v in r.get("variants", {}).items()}
    cli.show_results(f"GGUF (llama.cpp {commit[:10]})", rows,
                     ["bytes", "bits_per_weight", "size_vs_f16", "build_s", "identical_to_fp16"])
    return 0


def main(argv=None) -> int:
    return cli.run_stage(__doc__, "gguf", GGUFConfig, run, argv)
