"""finetune: QLoRA fine-tuning with the paper's recipe (section 3.4.1), one adapter per base model.

The base is loaded in 4-bit NF4 (bitsandbytes; FP16 compute on CUDA, float32 on CPU), LoRA on
every projection, trl's SFTTrainer with loss on the completion (the JSON) only, evaluation and a
checkpoint every epoch, the best checkpoint by validation loss kept. A callback decodes the
validation split greedily at each evaluation and logs exact match next to the loss.
Interrupted (Ctrl-C, SIGTERM) and rerun, it resumes from the last checkpoint; nothing half-trained
is published. Shape twins (random weights) are skipped.

    python -m stages.finetune --config configs/tiny.toml
    python -m stages.finetune --config configs/smoke.toml     # under 2 minutes on CPU

Writes artifacts/<run>/finetune/<slug>/adapter/ and history.json.
"""
from __future__ import annotations

import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from stages.lib import artifacts, cli
from stages.lib.config import as_dict, require
from stages.lib.models import base_models, weights_dir

PACKAGES = ["torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets"]
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class FinetuneConfig:
    load_in_4bit: bool = True
    quant_type: str = "nf4"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.15
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    modules_to_save: list[str] = field(default_factory=list)
    epochs: float = 3.0
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 2e-4
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    max_length: int = 512
    bf16: bool = True                 # used only where the hardware supports it
    gradient_checkpointing: bool = True   # trl's default; saves memory on GPUs, costs ~30% compute
    eval_exact_match: int = 0         # validation examples decoded per evaluation (0: all)
    logging_steps: int = 25

    def validate(self) -> None:
        require(self.quant_type in ("nf4", "fp4"), "quant_type", '"nf4" or "fp4"')
        require(self.lora_r >= 1 and self.lora_alpha > 0, "lora_r", "lora_r >= 1 and lora_alpha > 0")
        require(0 <= self.lora_dropout < 1, "lora_dropout", "a fraction in [0, 1)")
        require(set(self.target_modules) <= set(ALL_PROJECTIONS) and bool(self.target_modules), "target_modules",
                f"a non-empty subset of {ALL_PROJECTIONS}")
        require(set(self.modules_to_save) <= {"embed_tokens", "lm_head"}, "modules_to_save",
                'a subset of ["embed_tokens", "lm_head"]')
        require(self.epochs > 0 and self.batch_size >= 1 and self.grad_accum >= 1, "epochs",
                "epochs > 0, batch_size >= 1, grad_accum >= 1")
        require(0 < self.learning_rate < 1, "learning_rate", "a learning rate in (0, 1)")
        require(0 <= self.warmup_ratio < 1, "warmup_ratio", "a fraction in [0, 1)")
        require(self.lr_scheduler in ("linear", "cosine", "constant_with_warmup"), "lr_scheduler",
                '"linear", "cosine" or "constant_with_warmup"')
        require(self.eval_exact_match >= 0 and self.logging_steps >= 1, "eval_exact_match", "counts >= 0")


def sigterm_as_interrupt() -> None:
    """A killed container sends SIGTERM: stop like Ctrl-C so the rerun resumes cleanly."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint (trainer_state.json is written last)."""
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def finetune_one(record: dict, cfg: FinetuneConfig, train: list[dict], val: list[dict], seed: int,
                 out: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer
    from stages.lib.generation import exact_match_rate
    from stages.lib.task import build_completion, build_prompt

    cuda = torch.cuda.is_available()
    bf16 = cfg.bf16 and cuda and torch.cuda.is_bf16_supported()
    compute_dtype = (torch.bfloat16 if bf16 else torch.float16) if cuda else torch.float32
    path = weights_dir(record)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                                      bnb_4bit_compute_dtype=compute_dtype) if cfg.load_in_4bit else None
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=compute_dtype,
                                                 device_map="auto" if cuda else "cpu")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=cfg.target_modules, modules_to_save=cfg.modules_to_save or None,
                      task_type="CAUSAL_LM")

    def as_rows(rows):
        return Dataset.from_list([{"prompt": build_prompt(ex["text"]),
                                   "completion": build_completion(ex["action"], ex["product"], ex["quantity"])}
                                  for ex in rows])
    probe = val if cfg.eval_exact_match == 0 else val[: cfg.eval_exact_match]
    history: list[dict] = []

    class ExactMatchCallback(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            rate, _ = exact_match_rate(kwargs["model"], tokenizer, probe)
            history.append({"epoch": round(state.epoch or 0, 3), "step": state.global_step,
                            "eval_loss": round(metrics.get("eval_loss", float("nan")), 5),
                            "val_exact_match": round(rate, 4), "elapsed_s": round(time.time() - started, 1)})
            metrics["eval_exact_match"] = rate
            cli.console.print(f"  epoch {history[-1]['epoch']}: eval loss {history[-1]['eval_loss']}, "
                              f"val exact match {rate:.3f} ({len(probe)} examples)")

    checkpoints = out / "checkpoints"
    args = SFTConfig(
        output_dir=str(checkpoints), num_train_epochs=cfg.epochs, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=max(cfg.batch_size, 32), gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio,
        max_grad_norm=cfg.max_grad_norm, weight_decay=cfg.weight_decay, bf16=bf16, fp16=False,
        eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
        metric_for_best_model="eval_loss", greater_is_better=False, save_total_limit=2,
        completion_only_loss=True, max_length=cfg.max_length, seed=seed, data_seed=seed,
        logging_steps=cfg.logging_steps, report_to=[], use_cpu=not cuda, dataloader_num_workers=0,
        gradient_checkpointing=cfg.gradient_checkpointing, disable_tqdm=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=as_rows(train), eval_dataset=as_rows(val),
                         processing_class=tokenizer, peft_config=lora, callbacks=[ExactMatchCallback()])
    resume = last_checkpoint(checkpoints)
    if resume:
        cli.console.print(f"  resuming from {resume.name}")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    wall = time.time() - started
    trainer.model.save_pretrained(out / "adapter")
    tokenizer.save_pretrained(out / "adapter")
    shutil.rmtree(checkpoints)
    trained_tokens = sum(len(r["input_ids"]) for r in trainer.train_dataset) * cfg.epochs
    return {
        "base": record["spec"], "resumed_from": resume.name if resume else None,
        "best_checkpoint": Path(trainer.state.best_model_checkpoint or "").name or None,
        "best_eval_loss": trainer.state.best_metric, "train_loss": round(result.training_loss, 5),
        "steps": trainer.state.global_step, "wall_s": round(wall, 1),
        "train_tokens_per_s": round(trained_tokens / max(wall, 1e-9)),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_vram_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
        "compute_dtype": str(compute_dtype).replace("torch.", ""), "device": "cuda" if cuda else "cpu",
        "history": history,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }


def run(run_cfg, cfg: FinetuneConfig, args) -> int:
    run_dir = run_cfg.run_dir
    manifests = {"data": artifacts.require_stage(run_dir, "data", "generate"),
                 "base": artifacts.require_stage(run_dir, "base", "base")}
    stage = artifacts.StageRun("finetune", "finetune", run_dir, {**as_dict(cfg), "seed": run_cfg.seed},
                               artifacts.input_fingerprint(manifests), artifacts.code_hash(__file__), PACKAGES)
    if cli.already_done(stage, args):
        return 0
    sigterm_as_interrupt()
    train = artifacts.read_jsonl(run_dir / "data" / "train.jsonl")
    val = artifacts.read_jsonl(run_dir / "data" / "val.jsonl")
    out = stage.fresh_tmp(keep=True)  # a previous attempt's checkpoints are resumed
    results = {}
    for slug, record in base_models(run_dir).items():
        folder = out / slug
        if record["kind"] == "shape":
            results[slug] = {"skipped": "shape twin: random weights, fine-tuning is meaningless"}
            continue
        if (folder / "history.json").exists():  # finished in an interrupted earlier attempt
            results[slug] = artifacts.read_json(folder / "history.json")
            continue
        cli.console.rule(f"fine-tuning {record['spec']}")
        folder.mkdir(exist_ok=True)
        results[slug] = finetune_one(record, cfg, train, val, run_cfg.seed, folder)
        artifacts.write_json(folder / "history.json", results[slug])
    stage.results["models"] = results
    stage.publish()
    cli.show_config("fine-tuning", {slug: {k: v for k, v in r.items() if k != "history"}
                                    for slug, r in results.items()})
    return 0


def main(argv=None) -> int:
    return cli.run_stage(__doc__, "finetune", FinetuneConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
