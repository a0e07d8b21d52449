"""baseline: the paper's comparison rows, few-shot prompting of models that were not fine-tuned, and a classic
NLU model trained on the same data.

k examples from the training split (balanced over languages, fixed seed) precede each test message,
built by the same prompt builder and scored by the same scorer as the fine-tuned variants.
- Open-weight base models through transformers: any model this run's base stage prepared ("tiny",
  "packaged:smollm2-135m-instruct"), HF ids or local folders.
- API models through any OpenAI-compatible endpoint (OpenAI with OPENAI_API_KEY, or vLLM, Ollama, a
  llama.cpp server via `[baseline.api] base_url`), with bounded concurrency, retries and an on-disk response cache
  (artifacts/<run>/.cache/api/responses.jsonl) so a rerun or an interrupted run pays nothing twice.
- `classic:char-ngram`: char n-gram TF-IDF + logistic regression per field (scikit-learn), trained on the run's
  training split in seconds, with its training time and messages/s (cart_intent/classic.py says how).
A model that cannot be used here (no weights, no key, endpoint down) is recorded as skipped with its reason.

    python -m stages.baseline --config configs/smollm2.toml     # ~4 minutes on 2 cores
    python -m stages.baseline --config configs/smoke.toml --set 'baseline.api_models=["m"]' \
        --set baseline.api.base_url='"http://127.0.0.1:8080/v1"'

Writes artifacts/<run>/baseline/results.json and predictions/<model>.jsonl.
"""
from __future__ import annotations

import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.text import Text

from cart_intent import artifacts, cli, registry
from cart_intent.api_client import ApiSettings, ApiUnavailable, OpenAICompatible, ResponseCache
from cart_intent.backends import TransformersBackend
from cart_intent.catalog import run_catalog
from cart_intent.classic import MODELS as CLASSIC_MODELS, CharNgramModel
from cart_intent.config import as_dict, require
from cart_intent.metrics import score, summarize
from cart_intent.models import SHAPE_TWINS, model_slug, weights_dir
from cart_intent.records import BaselineRow, checked
from cart_intent.task import ANSWER_TOKENS, build_prompt, read_split

PACKAGES = ["torch", "transformers", "openai", "huggingface_hub", "scikit-learn"]


@dataclass
class BaselineConfig:
    shots: int = 3                      # few-shot examples before each message
    shot_seed: int = 42
    # open-weight: "tiny", HF ids, folders; classic: "classic:char-ngram"
    models: list[str] = field(default_factory=lambda: ["tiny", "classic:char-ngram"])
    api_models: list[str] = field(default_factory=list)           # e.g. ["gpt-4.1", "gpt-4.1-mini"]
    api: ApiSettings = field(default_factory=ApiSettings)        # [baseline.api]: endpoint, key, retries, budget
    batch_size: int = 16
    limit: int = 0                      # first N test examples only (0: all)

    def validate(self) -> None:
        require(0 <= self.shots <= 12, "shots", "an integer in [0, 12]")
        require(self.batch_size >= 1, "batch_size", "an integer >= 1")
        require(self.limit >= 0, "limit", "an integer >= 0 (0: all)")
        require(all(m in CLASSIC_MODELS for m in self.models if m.startswith("classic:")), "models",
                f"open-weight models, or one of {', '.join(CLASSIC_MODELS)}")


def pick_shots(train: list[dict], k: int, seed: int) -> list[dict]:
    """k examples, languages taken in turn, each drawn with a fixed seed."""
    rng = random.Random(seed)
    by_lang = {lang: [ex for ex in train if ex["lang"] == lang] for lang in sorted({ex["lang"] for ex in train})}
    langs = list(by_lang)
    return [rng.choice(by_lang[langs[i % len(langs)]]) for i in range(k)]


def open_weight_path(spec: str, run_dir: Path) -> Path:
    """Where the model's weights are; raises RuntimeError with the reason it cannot be used here."""
    if spec in SHAPE_TWINS:
        raise RuntimeError("shape twin: random weights, accuracy is meaningless")
    record_file = run_dir / "base" / model_slug(spec) / "base.json"
    if record_file.is_file():  # prepared by this run's base stage
        return weights_dir({**artifacts.read_json(record_file), "dir": str(record_file.parent)})
    if spec == "tiny" or spec.startswith("packaged:"):
        raise RuntimeError(f"{record_file.parent} is missing: add {spec!r} to base.models and run `make base`")
    if Path(spec).is_dir():
        return Path(spec)
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(spec, token=os.environ.get("HF_TOKEN") or None,
                                      allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as err:  # noqa: BLE001 - any hub failure means "not usable here", with its reason
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise RuntimeError(f"weights unavailable ({type(err).__name__}: {first_line}); set HF_TOKEN and accept "
                           f"the model's licence, or give a local folder") from None


def run_open_weight(spec: str, path: Path, prompts: list[str], cfg: BaselineConfig):
    backend = TransformersBackend.load(path)
    began = time.perf_counter()
    with cli.progress(f"{spec} answers", len(prompts)) as advance:
        answers = backend.generate(prompts, batch_size=cfg.batch_size, on_done=advance)
    return answers, {"examples_per_s": round(len(prompts) / (time.perf_counter() - began), 2)}


def run_classic(spec: str, train: list[dict], texts: list[str], seed: int):
    """Train on the training split, then answer every text at once (as such a model serves)."""
    cli.console.print(f"{spec}: training on {len(train)} messages")
    model = CharNgramModel(seed).fit(train)
    began = time.perf_counter()
    answers = model.answer(texts)
    return answers, {"examples_per_s": round(len(texts) / (time.perf_counter() - began), 1),
                     "train_s": round(model.train_s, 2), "train_examples": len(train)}


def model_kind(name: str) -> str:
    return "classic" if name.startswith("classic:") else "open-weight"


def run_api(model: str, prompts: list[str], cfg: BaselineConfig, cache):
    client = OpenAICompatible(model, cfg.api, cache, "baseline.api.max_requests",
                              log=lambda line: cli.console.print(Text(line, style="yellow")))
    began = time.perf_counter()
    with cli.progress(f"{model} answers", len(prompts)) as advance:
        answers = client.answer_all(prompts, ANSWER_TOKENS, on_done=advance)
    return answers, {"examples_per_s": round(len(prompts) / (time.perf_counter() - began), 2),
                     "endpoint": client.base_url, **client.stats}


def run(run_cfg, cfg: BaselineConfig, args) -> int:
    run_dir = run_cfg.run_dir
    local_base = any(m == "tiny" or m.startswith("packaged:") for m in cfg.models)   # prepared by `base`
    manifests = registry.upstream(run_dir, "baseline", skip=() if local_base else ("base",))
    stage = artifacts.StageRun("baseline", "baseline", run_dir, {**as_dict(cfg), "seed": run_cfg.seed},
                               artifacts.input_fingerprint(manifests), artifacts.code_hash(__file__), PACKAGES)
    if cli.already_done(stage, args):
        return 0
    train = read_split(run_dir, "train")
    examples = read_split(run_dir, "test")[: cfg.limit or None]
    shots = pick_shots(train, cfg.shots, cfg.shot_seed)
    prompts = [build_prompt(ex["text"], shots) for ex in examples]
    catalog_names = set(run_catalog(run_dir).names)
    cache = ResponseCache(run_dir / ".cache" / "api" / "responses.jsonl")
    out = stage.fresh_tmp()
    (out / "predictions").mkdir()
    rows = []
    candidates = [(model_kind(m), m) for m in cfg.models] + [("api", m) for m in cfg.api_models]
    for kind, name in candidates:
        k = 0 if kind == "classic" else cfg.shots
        cli.console.rule(f"{name} ({kind}, {k}-shot)")
        try:
            if kind == "api":
                answers, extra = run_api(name, prompts, cfg, cache)
            elif kind == "classic":
                answers, extra = run_classic(name, train, [ex["text"] for ex in examples], run_cfg.seed)
            else:
                answers, extra = run_open_weight(name, open_weight_path(name, run_dir), prompts, cfg)
        except (RuntimeError, ApiUnavailable) as err:
            cli.console.print(Text.assemble(("skipped ", "yellow"), f"{name}: {err}"))
            rows.append(checked(BaselineRow, {"model": name, "kind": kind, "shots": k, "skipped": str(err)}))
            continue
        scored = score(examples, answers, catalog_names)
        artifacts.write_jsonl(out / "predictions" / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.jsonl", scored)
        rows.append(checked(BaselineRow, {"model": name, "kind": kind, "shots": k, **summarize(scored), **extra}))
    artifacts.write_json(out / "results.json", {"shots": [ex["id"] for ex in shots], "examples": len(examples),
                                                "rows": rows})
    stage.results.update(examples=len(examples), shot_ids=[ex["id"] for ex in shots],
                         rows=[{k: v for k, v in r.items() if k not in ("by_noise", "top_confusions")} for r in rows])
    stage.publish()
    cli.show_results(f"few-shot baselines ({cfg.shots}-shot, {len(examples)} examples)",
                     {r["model"]: r if "skipped" in r else {"EM": r["exact_match"], "95% CI": r["exact_match_ci95"],
                                                            "valid": r["json_valid"], "ex/s": r["examples_per_s"]}
                      for r in rows}, ["EM", "95% CI", "valid", "ex/s"])
    return 0


def main(argv=None) -> int:
    return cli.run_stage(__doc__, "baseline", BaselineConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
