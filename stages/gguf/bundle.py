"""What travels beside a model's GGUF files so they work outside this repository: the answer's JSON Schema and
GBNF grammar, one Ollama Modelfile per type, and a model card. The chat template itself is inside every GGUF
(the converter copies the merged tokenizer's)."""
from __future__ import annotations

import json
from pathlib import Path

from cart_intent.cards import card, model_meta, model_origin
from cart_intent.task import ANSWER_FORMS, ANSWER_TOKENS, answer_gbnf, answer_json_schema, build_prompt

# Ollama's default type: the paper's recommended size/accuracy point
DEFAULT_TYPE = "Q4_K_M"


def ollama_template() -> str:
    """The chat template in Ollama's Go template language: the last user message into the training prompt."""
    head, tail = build_prompt("\0").split("\0")
    return ('{{- $text := "" }}{{- range .Messages }}{{- if eq .Role "user" }}{{- $text = .Content }}{{- end }}'
            "{{- end }}" + head + "{{ $text }}" + tail)


def modelfile(name: str, gguf_name: str, eos_token: str) -> str:
    """An Ollama Modelfile (https://github.com/ollama/ollama/blob/main/docs/modelfile.md) for one GGUF file."""
    return "\n".join([
        f"# ollama create cart-intent -f {name}",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{ollama_template()}"""',
        "PARAMETER temperature 0",
        f"PARAMETER num_predict {ANSWER_TOKENS}",
        f"PARAMETER stop {json.dumps(eos_token)}",
    ]) + "\n"


def write_bundle(folder: Path, spec: str, variants: dict, merged: dict, eos_token: str, products: list[str],
                 run_name: str) -> list[str]:
    """schema.json, answer.gbnf, Modelfile(s) and README.md into folder; returns the names written."""
    (folder / "schema.json").write_text(json.dumps(answer_json_schema(products), indent=2) + "\n", encoding="utf-8")
    (folder / "answer.gbnf").write_text(answer_gbnf(products), encoding="utf-8")
    names = ["schema.json", "answer.gbnf"]
    for type_name, record in variants.items():
        name = "Modelfile" if type_name == DEFAULT_TYPE else f"Modelfile.{type_name}"
        (folder / name).write_text(modelfile(name, record["file"], eos_token), encoding="utf-8")
        names.append(name)
    (folder / "README.md").write_text(model_card(spec, variants, merged, run_name), encoding="utf-8")
    return names + ["README.md"]


def model_card(spec: str, variants: dict, merged: dict, run_name: str) -> str:
    meta = model_meta(model_origin(spec), run_name, "gguf", ["gguf", "llama.cpp", "ollama"],
                      [("validation exact match of the merged FP16 source", merged["val_exact_match"])])
    rows = [f"| `{v['file']}` | {type_name} | {v['bytes'] / 1e6:.1f} | {v['bits_per_weight']} | "
            f"{v.get('parity', {}).get('identical_to_fp16', '–')} |" for type_name, v in variants.items()]
    default = variants.get(DEFAULT_TYPE, {}).get("file") or next(iter(variants.values()))["file"]
    return card(meta, "\n".join([
        f"# {spec} fine-tuned for cart-intent extraction, GGUF",
        "",
        "One message in English, Croatian or Spanish in; one JSON object out: "
        + ANSWER_FORMS + ".",
        "Every file carries the chat template that renders one user message into the training prompt "
        "(system messages are ignored), so chat front ends send the prompt the model was trained on. Decode "
        "greedily (temperature 0).",
        "",
        "| file | type | MB | bits/weight | greedy answers identical to FP16 |",
        "|---|---|---:|---:|---:|",
        *rows,
        "",
        "## Use it",
        "",
        "```",
        f"llama-server -m {default} --jinja --temp 0        # then POST /v1/chat/completions",
        "ollama create cart-intent -f Modelfile && ollama run cart-intent 'dodaj 3 paste za zube'",
        "```",
        "",
        "`schema.json` is the answer's JSON Schema (OpenAI-style `response_format` "
        '`{"type": "json_object", "schema": ...}` on llama-cpp-python\'s server); `answer.gbnf` the same as a '
        "llama.cpp grammar in the exact form the model writes (`llama-cli --grammar-file answer.gbnf`).",
    ]))
