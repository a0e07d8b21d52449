"""Model and dataset cards with Hugging Face's YAML front matter (what the Hub indexes: base model, license,
languages, datasets, pipeline tag, metrics), written by generate, merge, gptq and gguf and checked before
`make publish` uploads a folder. Values are written as JSON, which is YAML's flow style."""
from __future__ import annotations

import json
import re

from .catalog import LANGUAGES
from .models import PACKAGED_MODELS

# What this pipeline declares for what it makes itself (the generated data, models trained from scratch).
PROJECT_LICENSE = "apache-2.0"
# Hub ids whose licence is not Apache-2.0 (the base model's licence carries over to a fine-tune).
HUB_LICENSES = {"meta-llama/Llama-3.2-1B": "llama3.2", "google/gemma-3-1b-pt": "gemma"}
MODEL_KEYS = ("license", "language", "pipeline_tag", "datasets", "metrics", "model-index")
DATASET_KEYS = ("license", "language", "task_categories", "pretty_name")


def dataset_name(run_name: str) -> str:
    return f"cart-intent-{run_name}"


def model_origin(spec: str) -> dict:
    """base_model and license of a model spec: a packaged model's original, a hub id, or nothing (trained here)."""
    if spec in PACKAGED_MODELS:
        return {"base_model": PACKAGED_MODELS[spec]["original"], "license": PACKAGED_MODELS[spec]["license"]}
    if spec == "tiny" or spec.startswith(("shape:", "packaged:")) or "/" not in spec:
        return {"license": PROJECT_LICENSE}
    return {"base_model": spec, "license": HUB_LICENSES.get(spec, "other")}


def model_meta(origin: dict, run_name: str, library: str, tags: list[str], scores: list[tuple[str, float]]) -> dict:
    """Front matter of a model card; scores: (what was measured, exact match) pairs."""
    results = [{"task": {"type": "text-generation", "name": "cart-intent extraction"},
                "dataset": {"type": "json", "name": dataset_name(run_name)},
                "metrics": [{"type": "exact_match", "value": value, "name": name} for name, value in scores]}]
    return {**({"base_model": origin["base_model"]} if "base_model" in origin else {}), "license": origin["license"],
            "language": list(LANGUAGES), "library_name": library, "pipeline_tag": "text-generation",
            "tags": ["cart-intent", "json", "e-commerce", *tags], "datasets": [dataset_name(run_name)],
            "metrics": ["exact_match"], "model-index": [{"name": f"cart-intent-{run_name}", "results": results}]}


def dataset_meta(run_name: str, size: int) -> dict:
    buckets = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")]
    return {"license": PROJECT_LICENSE, "language": list(LANGUAGES), "pretty_name": dataset_name(run_name),
            "task_categories": ["text-generation"], "tags": ["cart-intent", "e-commerce", "synthetic"],
            "size_categories": [next((name for limit, name in buckets if size < limit), "n>100K")]}


def card(meta: dict, body: str) -> str:
    front = "".join(f"{key}: {json.dumps(value, ensure_ascii=False)}\n" for key, value in meta.items())
    return f"---\n{front}---\n\n{body.strip()}\n"


def read_card(text: str) -> tuple[dict, str]:
    """(front matter, markdown body); ValueError when the front matter is missing or not a YAML mapping."""
    import yaml
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, re.DOTALL)
    if not match:
        raise ValueError("no YAML front matter (--- ... ---) at the top")
    meta = yaml.safe_load(match.group(1))
    if not isinstance(meta, dict):
        raise ValueError("the front matter is not a YAML mapping")
    return meta, match.group(2)


def card_problems(text: str, kind: str) -> list[str]:
    """What keeps a card ("model" or "dataset") from being indexed as this project's; empty when fine."""
    try:
        meta, body = read_card(text)
    except ValueError as err:
        return [str(err)]
    problems = [f"front matter lacks {key}" for key in (MODEL_KEYS if kind == "model" else DATASET_KEYS)
                if key not in meta]
    if sorted(meta.get("language") or []) != sorted(LANGUAGES):
        problems.append(f"language should be {list(LANGUAGES)}")
    for entry in meta.get("model-index") or []:
        for result in entry.get("results", []):
            for metric in result.get("metrics", []):
                if not isinstance(metric.get("value"), (int, float)) or not 0 <= metric["value"] <= 1:
                    problems.append(f"metric {metric.get('name')!r} has no measured value in [0, 1]")
    if not body.strip().startswith("#"):
        problems.append("the markdown body should start with a title")
    return problems
