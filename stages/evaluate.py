"""evaluate: exact match of every fine-tuned variant (merged FP16, GPTQ, each GGUF), free and schema-constrained.

Each variant answers every test example through the shared inference layer (cart_intent/backends.py);
every prediction is saved. Metrics: strict exact match with a 95% Wilson interval, JSON validity,
accuracy per field, per language, per noise kind and per quantity bucket, the top confusions, and an
exact McNemar test of each variant against the merged FP16 model (free decoding). Speed: examples per
second, batched and at batch size 1 (transformers and GPTQ; the two must give identical answers),
and model calls per answer (constrained decoding forces the schema's fixed text without a decode step).
GGUF variants answer one message at a time in this process, or, with `evaluate.gguf_slots` N > 1, on llama-server
with N slots: N messages decoded together (continuous batching). Still greedy, but batched matrix products
can round differently, so an answer may differ now and then (docs/stages.md#evaluate): the default is 1.
On the test split it then chooses the fallback's thresholds (cart_intent/fallback.py) for the served GGUF type
(`evaluate.fallback_variant`) on the validation split, never the test split, and reports what they do on both.

    python -m stages.evaluate --config configs/smollm2.toml
    python -m stages.evaluate --config configs/smoke.toml --constrained        # constrained only
    python -m stages.evaluate --config configs/smollm2.toml --data datasets/realistic.jsonl   # -> eval-realistic/

Writes artifacts/<run>/eval/results.json (one row per variant and decoding mode) and
predictions/<slug>__<variant>__<decoding>.jsonl.
"""
from __future__ import annotations

import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cart_intent import artifacts, cli, fallback, registry
from cart_intent.backends import GGUFBackend, GPTQBackend, LlamaServerBackend, TransformersBackend
from cart_intent.catalog import run_catalog
from cart_intent.child import ChildFailed
from cart_intent.config import ConfigError, as_dict, require
from cart_intent.intent import ServeConfig
from cart_intent.llama_cpp_tools import ToolsMissing
from cart_intent.llama_server import LlamaServer
from cart_intent.metrics import mcnemar, score, summarize
from cart_intent.models import quantization_sources
from cart_intent.records import EvalRow, checked
from cart_intent.task import BadExamples, build_prompt, numbered_examples, read_split

PACKAGES = ["torch", "transformers", "gptqmodel", "llama-cpp-python"]
DECODING = ("free", "constrained")


@dataclass
class EvaluateConfig:
    decoding: list[str] = field(default_factory=lambda: ["free", "constrained"])
    batch_size: int = 32          # transformers and GPTQ back ends (left-padded batches)
    batch1_sample: int = 64       # examples also run at batch size 1: speed-up and identical answers
    limit: int = 0                # evaluate only the first N examples (0: all)
    threads: int = 0              # llama.cpp threads; 0: every core
    gguf_slots: int = 1           # GGUF: 1 one message at a time in process; N > 1 llama-server, N decoded together
    # the fallback's thresholds, chosen for this GGUF type ("": none) on the first N validation messages so that at
    # most max_false_rejections of their cart operations are turned away (the model's own none-forms included)
    fallback_variant: str = "Q4_K_M"
    fallback_examples: int = 300
    max_false_rejections: float = 0.02

    def validate(self) -> None:
        require(self.decoding and set(self.decoding) <= set(DECODING), "decoding", '"free" and/or "constrained"')
        require(self.batch_size >= 1, "batch_size", "an integer >= 1")
        require(self.batch1_sample >= 0, "batch1_sample", "an integer >= 0")
        require(self.limit >= 0, "limit", "an integer >= 0 (0: all)")
        require(self.threads >= 0, "threads", "an integer >= 0")
        require(1 <= self.gguf_slots <= 64, "gguf_slots", "an integer in [1, 64]")
        require(self.fallback_variant == "" or self.fallback_variant.replace("_", "").isalnum(), "fallback_variant",
                'a GGUF type such as "Q4_K_M", or "" (none)')
        require(self.fallback_examples >= 0, "fallback_examples", "an integer >= 0 (0: no fallback chosen)")
        require(0 <= self.max_false_rejections < 1, "max_false_rejections", "a fraction in [0, 1)")


def load_examples(run_dir: Path, data_path: Path | None, split: str = "test") -> list[dict]:
    """The run's split, or a labelled file of the user's (--data: a bad row is a usage error, exit 2),
    with id, lang and noise filled in where a hand-written file leaves them out."""
    if data_path is None:
        numbered = list(enumerate(read_split(run_dir, split), 1))
    else:
        try:
            numbered = numbered_examples(data_path, set(run_catalog(run_dir).names))
        except BadExamples as err:
            raise ConfigError(str(err)) from None
    return [{"id": row.get("id", f"line-{number}"), "lang": row.get("lang", "unknown"), "noise": row.get("noise", []),
             **{k: row[k] for k in ("text", "action", "product", "quantity")}} for number, row in numbered]


def variants(run_dir: Path) -> dict[str, dict]:
    """'<slug>/<variant>' -> back end kind and path, for every fine-tuned model's formats."""
    found = {}
    for slug, source in quantization_sources(run_dir).items():
        if source.get("kind") != "merged":
            found[slug] = {"skipped": source.get("skipped", "shape twin: random weights, accuracy is meaningless")}
            continue
        found[f"{slug}/fp16"] = {"kind": "transformers", "path": run_dir / "merge" / slug}
        if (run_dir / "gptq" / slug / "quantize_config.json").is_file():
            found[f"{slug}/gptq"] = {"kind": "gptq", "path": run_dir / "gptq" / slug}
        for gguf in sorted((run_dir / "gguf" / slug).glob("model-*.gguf")):
            found[f"{slug}/gguf-{gguf.stem.removeprefix('model-')}"] = {"kind": "gguf", "path": gguf}
    return found


@contextmanager
def opened_backend(kind: str, path: Path, cfg: "EvaluateConfig"):
    """The variant's back end until the block ends: GGUF on llama-server when gguf_slots > 1 (stopped after)."""
    if kind == "gguf" and cfg.gguf_slots > 1:
        with ExitStack() as stack:
            try:   # only llama-server's start is the setting's fault, not what the block does with it
                server = stack.enter_context(LlamaServer(path, ServeConfig(slots=cfg.gguf_slots, threads=cfg.threads),
                                                         path.stem))
            except (ToolsMissing, ChildFailed) as err:
                raise ConfigError(f"evaluate.gguf_slots={cfg.gguf_slots}: {err}") from None
            yield LlamaServerBackend(path, server.port, cfg.gguf_slots)
        return
    backend = (GGUFBackend(path, n_threads=cfg.threads or None) if kind == "gguf" else
               GPTQBackend.load(path) if kind == "gptq" else TransformersBackend.load(path))
    try:
        yield backend
    finally:
        if hasattr(backend, "close"):
            backend.close()


def run_variant(backend, kind: str, prompts: list[str], mode: str, cfg: EvaluateConfig,
                products: list[str]) -> tuple[list, dict]:
    """All answers of one variant in one decoding mode (constrained: to products), with its speed record."""
    constrained = mode == "constrained"
    kwargs = {"batch_size": cfg.batch_size} if kind != "gguf" and not constrained else {}
    began = time.perf_counter()
    with cli.progress(f"{mode} decoding", len(prompts)) as advance:
        completions = backend.generate(prompts, constrained=constrained, products=products, on_done=advance, **kwargs)
    seconds = time.perf_counter() - began
    speed = {"examples_per_s": round(len(prompts) / seconds, 2), "wall_s": round(seconds, 2),
             "model_calls_per_answer": round(sum(c.model_calls for c in completions) / len(completions), 2),
             "generated_tokens_per_answer": round(sum(c.completion_tokens for c in completions) / len(completions), 2)}
    if kwargs and cfg.batch1_sample:  # batched generation must not change any answer
        sample = prompts[: cfg.batch1_sample]
        began = time.perf_counter()
        single = backend.generate(sample, batch_size=1)
        speed["batch1_examples_per_s"] = round(len(sample) / (time.perf_counter() - began), 2)
        speed["batch1_identical"] = [c.text for c in single] == [c.text for c in completions[: len(sample)]]
        speed["batched_speedup"] = round(speed["examples_per_s"] / speed["batch1_examples_per_s"], 2)
    return completions, speed


def evaluate_variant(name: str, variant: dict, backend, examples: list[dict], prompts: list[str],
                     products: list[str], cfg: EvaluateConfig, out: Path, reference: dict) -> list[dict]:
    """One row per decoding mode, its predictions written; the model's first row is its McNemar reference."""
    rows = []
    for mode in cfg.decoding:
        completions, speed = run_variant(backend, variant["kind"], prompts, mode, cfg, products)
        scored = score(examples, completions, set(products))
        artifacts.write_jsonl(out / "predictions" / f"{name.replace('/', '__')}__{mode}.jsonl", scored)
        slug = name.split("/")[0]
        reference.setdefault(slug, [r["correct"] for r in scored])  # the first row: fp16, free or constrained
        engine = {"gguf_slots": cfg.gguf_slots} if variant["kind"] == "gguf" else {}
        row = {"variant": name, "model": slug, "backend": variant["kind"], "decoding": mode,
               "kernel": getattr(backend, "kernel", None), **summarize(scored), **speed, **engine,
               "mcnemar_vs_fp16": mcnemar(reference[slug], [r["correct"] for r in scored])}
        rows.append(checked(EvalRow, row))
        cli.console.print(f"{name} {mode}: exact match {row['exact_match']:.3f} {row['exact_match_ci95']}, "
                          f"valid {row['json_valid']:.3f}, {row['examples_per_s']} ex/s")
    return rows


def choose_fallbacks(run_dir: Path, found: dict, cfg: EvaluateConfig, products: list[str], out: Path) -> dict:
    """Per model: the fallback's thresholds for its `fallback_variant` GGUF, chosen on the validation split, with
    what they do there and on the test split's constrained answers."""
    val = load_examples(run_dir, None, "val")[: cfg.fallback_examples]
    chosen = {}
    for name, variant in found.items():
        if not name.endswith(f"/gguf-{cfg.fallback_variant}") or not val or not cfg.fallback_variant:
            continue
        cli.console.rule(f"{name}: the fallback's thresholds on {len(val)} validation messages")
        with opened_backend(variant["kind"], variant["path"], cfg) as backend:
            completions, _ = run_variant(backend, "gguf", [build_prompt(ex["text"]) for ex in val], "constrained",
                                         cfg, products)
        scored = score(val, completions, set(products))
        artifacts.write_jsonl(out / "predictions" / f"val__{name.replace('/', '__')}__constrained.jsonl", scored)
        limits, on_val = fallback.choose(scored, cfg.max_false_rejections, "validation")
        test_path = out / "predictions" / f"{name.replace('/', '__')}__constrained.jsonl"
        on_test = fallback.effect(artifacts.read_jsonl(test_path), limits) if test_path.is_file() else None
        chosen[name] = {"threshold": limits.threshold, "ambiguity_margin": limits.margin,
                        "max_false_rejections": cfg.max_false_rejections, "validation": on_val, "test": on_test}
        cli.console.print(f"{name}: threshold {limits.threshold:.4g}, margin {limits.margin:.4g}; validation "
                          f"{on_val}; test {on_test}")
    return chosen


def with_fallbacks(run_dir: Path, rows: list[dict], out: Path) -> None:
    """On a labelled set of the user's: what the thresholds eval/ chose on the validation split do to each variant's
    constrained answers (turned away by the none-form or the fallback), into its row."""
    chosen = fallback.chosen(run_dir)
    for row in rows:
        limits = chosen.get(row.get("variant"))
        if not limits or row.get("decoding") != "constrained":
            continue
        scored = artifacts.read_jsonl(out / "predictions" / f"{row['variant'].replace('/', '__')}__constrained.jsonl")
        thresholds = fallback.Thresholds(limits["threshold"], limits["ambiguity_margin"], "validation")
        row["fallback"] = {"threshold": thresholds.threshold, "ambiguity_margin": thresholds.margin,
                           **fallback.effect(scored, thresholds)}


def run(run_cfg, cfg: EvaluateConfig, args) -> int:
    if args.constrained:
        cfg.decoding = ["constrained"]
    run_dir = run_cfg.run_dir
    manifests = registry.upstream(run_dir, "evaluate_set" if args.data else "evaluate")
    data_path = Path(args.data) if args.data else run_dir / "data" / "test.jsonl"
    if not data_path.is_file():
        raise ConfigError(f"--data {data_path}: no such file")
    inputs = {**artifacts.input_fingerprint(manifests), "examples": artifacts.sha256_file(data_path)}
    folder = f"eval-{data_path.stem}" if args.data else "eval"
    stage = artifacts.StageRun("evaluate", folder, run_dir, as_dict(cfg), inputs, artifacts.code_hash(__file__),
                               PACKAGES)
    if cli.already_done(stage, args):
        return 0
    examples = load_examples(run_dir, data_path if args.data else None)[: cfg.limit or None]
    prompts = [build_prompt(ex["text"]) for ex in examples]
    products = run_catalog(run_dir).names
    out = stage.fresh_tmp()
    (out / "predictions").mkdir()
    rows, reference, found = [], {}, variants(run_dir)
    for name, variant in found.items():
        if "skipped" in variant:
            rows.append(checked(EvalRow, {"variant": name, "skipped": variant["skipped"]}))
            continue
        cli.console.rule(f"{name} ({variant['kind']})")
        with opened_backend(variant["kind"], variant["path"], cfg) as backend:
            rows += evaluate_variant(name, variant, backend, examples, prompts, products, cfg, out, reference)
    by_key = {(r["variant"], r["decoding"]): r for r in rows if "skipped" not in r}
    for (name, mode), row in by_key.items():
        if mode == "constrained" and (name, "free") in by_key:
            row["constrained_minus_free"] = round(row["exact_match"] - by_key[(name, "free")]["exact_match"], 4)
    chosen = choose_fallbacks(run_dir, found, cfg, products, out) if not args.data else {}
    if args.data:
        with_fallbacks(run_dir, rows, out)
    artifacts.write_json(out / "results.json", {"data": str(data_path), "examples": len(examples), "rows": rows,
                                                "fallback": chosen})
    stage.results.update(data=str(data_path), examples=len(examples), fallback=chosen,
                         rows=[{k: v for k, v in r.items() if k not in ("by_noise", "top_confusions")} for r in rows])
    stage.publish()
    display = {f"{r['variant']} {r.get('decoding', '')}": r if "skipped" in r else {
        "EM": r["exact_match"], "95% CI": r["exact_match_ci95"], "valid": r["json_valid"], "ex/s": r["examples_per_s"],
        "calls": r["model_calls_per_answer"], "p vs fp16": r["mcnemar_vs_fp16"]["p_value"]} for r in rows}
    cli.show_results(f"exact match on {data_path.name} ({len(examples)} examples)", display,
                     ["EM", "95% CI", "valid", "ex/s", "calls", "p vs fp16"])
    return 0


def add_args(parser) -> None:
    parser.add_argument("--data", help="a JSONL of labelled examples to score instead of the test split")
    parser.add_argument("--constrained", action="store_true", help="schema-constrained decoding only")


def main(argv=None) -> int:
    return cli.run_stage(__doc__, "evaluate", EvaluateConfig, run, argv, add_args)


if __name__ == "__main__":
    sys.exit(main())
