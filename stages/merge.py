"""merge: fold each LoRA adapter into its base reloaded in FP16 (not the 4-bit weights), save with safetensors.

Parity check: the saved merged model and base+adapter give the same greedy output on validation
prompts; the agreement rate is recorded and the stage fails under `min_agreement`. The merged
model's validation exact match is recorded too.

    python -m stages.merge --config configs/tiny.toml
    python -m stages.merge --config configs/smoke.toml     # seconds

Writes artifacts/<run>/merge/<slug>/ (model.safetensors, config, generation config, tokenizer
files including tokenizer.model, README.md model card).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text

from cart_intent import artifacts, cli, registry
from cart_intent.cards import card, model_meta, model_origin
from cart_intent.config import as_dict, require
from cart_intent.generation import exact_match_rate, greedy_generate
from cart_intent.models import base_models, weights_dir
from cart_intent.task import ANSWER_FORMS, build_prompt, chat_template, read_split

PACKAGES = ["torch", "transformers", "peft", "safetensors"]


class ParityError(Exception):
    pass


@dataclass
class MergeConfig:
    dtype: str = "float16"
    parity_prompts: int = 100         # validation prompts compared (at least 50)
    min_agreement: float = 0.98

    def validate(self) -> None:
        require(self.dtype in ("float16", "bfloat16"), "dtype", '"float16" or "bfloat16"')
        require(self.parity_prompts >= 50, "parity_prompts", "an integer >= 50")
        require(0 < self.min_agreement <= 1, "min_agreement", "a fraction in (0, 1]")


def model_card(record: dict, adapter_history: dict, results: dict, run_name: str) -> str:
    meta = model_meta(model_origin(record["spec"]), run_name, "transformers", ["lora", "merged"],
                      [("validation exact match (merged FP16)", results["val_exact_match"])])
    return card(meta, "\n".join([
        f"# {record['spec']} fine-tuned for cart-intent extraction (merged)",
        "",
        "LoRA adapter merged into the FP16 base. Input: the task library's prompt "
        "(`cart_intent/task.py: build_prompt`), which the tokenizer's chat template renders from one user message "
        "(`tokenizer.apply_chat_template([{\"role\": \"user\", \"content\": text}], add_generation_prompt=True)`; "
        "system messages are ignored); output: one JSON object "
        + ANSWER_FORMS + ", then EOS.",
        "",
        f"- base: `{record['spec']}`",
        f"- best checkpoint: {adapter_history.get('best_checkpoint')} (eval loss {adapter_history.get('best_eval_loss')})",
        f"- parity with base+adapter: {results['parity_agreement']:.3f} on {results['parity_prompts']} prompts",
        f"- validation exact match (merged): {results['val_exact_match']:.4f} on {results['val_examples']} examples",
    ]))


def adds_bos(tokenizer) -> bool:
    """Does the tokenizer put BOS before a text (as training and evaluation tokenized prompts)?"""
    return tokenizer.bos_token_id is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]


def merge_one(record: dict, adapter_dir: Path, history: dict, cfg: MergeConfig, val: list[dict], out: Path) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    save_dtype = getattr(torch, cfg.dtype)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)

    def load(path):  # FP16 weights; CPU computes in float32 (its FP16 kernels are slow and partial)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=save_dtype, device_map="auto" if cuda else "cpu")
        return model if cuda else model.float()

    prompts = [build_prompt(ex["text"]) for ex in val[: cfg.parity_prompts]]
    peft_model = PeftModel.from_pretrained(load(weights_dir(record)), adapter_dir)
    with cli.progress("base+adapter answers", len(prompts)) as advance:
        reference = greedy_generate(peft_model, tokenizer, prompts, on_done=advance)
    merged = peft_model.merge_and_unload()
    merged.to(save_dtype).save_pretrained(out, safe_serialization=True)
    merged.generation_config.save_pretrained(out)
    tokenizer.chat_template = chat_template(adds_bos(tokenizer))  # the prompt travels with the model (and its GGUFs)
    tokenizer.save_pretrained(out)
    source_tokenizer = weights_dir(record) / "tokenizer.model"
    if source_tokenizer.exists():  # llama.cpp's converter reads the SentencePiece model
        (out / "tokenizer.model").write_bytes(Path(source_tokenizer).read_bytes())  # an error names its file
    del peft_model, merged

    reloaded = load(out)
    with cli.progress("merged answers", len(prompts)) as advance:
        merged_outputs = greedy_generate(reloaded, tokenizer, prompts, on_done=advance)
    agreement = sum(a == b for a, b in zip(reference, merged_outputs)) / len(prompts)
    with cli.progress("merged validation exact match", len(val)) as advance:
        val_em, _ = exact_match_rate(reloaded, tokenizer, val, on_done=advance)
    results = {"base": record["spec"], "dtype": cfg.dtype, "parity_prompts": len(prompts),
               "parity_agreement": round(agreement, 4), "val_exact_match": round(val_em, 4),
               "val_examples": len(val), "parameters": sum(p.numel() for p in reloaded.parameters())}
    if agreement < cfg.min_agreement:
        raise ParityError(f"{record['spec']}: merged model agrees with base+adapter on {agreement:.1%} of "
                          f"{len(prompts)} prompts, under merge.min_agreement={cfg.min_agreement}")
    return results


def run(run_cfg, cfg: MergeConfig, args) -> int:
    run_dir = run_cfg.run_dir
    manifests = registry.upstream(run_dir, "merge")
    stage = artifacts.StageRun("merge", "merge", run_dir, as_dict(cfg), artifacts.input_fingerprint(manifests),
                               artifacts.code_hash(__file__), PACKAGES)
    if cli.already_done(stage, args):
        return 0
    val = read_split(run_dir, "val")
    out = stage.fresh_tmp()
    results = {}
    for slug, record in base_models(run_dir).items():
        adapter_dir = run_dir / "finetune" / slug / "adapter"
        if not adapter_dir.is_dir():
            results[slug] = {"skipped": manifests["finetune"]["results"]["models"].get(slug, {}).get(
                "skipped", "no adapter")}
            continue
        cli.console.rule(f"merging {record['spec']}")
        history = artifacts.read_json(run_dir / "finetune" / slug / "history.json")
        try:
            results[slug] = merge_one(record, adapter_dir, history, cfg, val, out / slug)
            (out / slug / "README.md").write_text(model_card(record, history, results[slug], run_cfg.name),
                                                  encoding="utf-8")
        except ParityError as err:
            cli.console.print(Text.assemble(("parity check failed ", "red"), str(err)))
            return 1
    stage.results["models"] = results
    stage.publish()
    cli.show_config("merged models", results)
    return 0


def main(argv=None) -> int:
    return cli.run_stage(__doc__, "merge", MergeConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
