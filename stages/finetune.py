"""finetune: (Q)LoRA fine-tuning with the paper's recipe (section 3.4.1), one adapter per base model.

Steps per base model: tokenize prompt and completion (loss on the completion and EOS only); load the
base (4-bit NF4 through bitsandbytes when `load_in_4bit`, else the compute dtype); optionally time a
plain PyTorch LoRA loop on the same batches (`plain_loop_steps`, the yardstick for the trainer's
tokens/s); train with transformers' Trainer, evaluating (loss + greedy exact match on validation)
every `eval_steps` or epoch and keeping the best checkpoint by validation loss; save the adapter.

`shared_prefix`: every prompt starts with the same instruction, so its keys and values are computed
once per batch and broadcast to the batch (gradients flow back through the broadcast) -- the same loss
and gradients as the full sequences, about 40% fewer tokens through the model. Logits are computed
only where a label exists (the completion), not over the whole 49k-word vocabulary at every position.

Interrupted (Ctrl-C, SIGTERM) and rerun with the same config, code and inputs, it resumes from the last
checkpoint -- weights, optimizer, scheduler, RNG, the batch order (drawn from the seed and epoch alone), the
loss being averaged and the history so far -- so the adapter and history are those of an uninterrupted run
(bit-identical on CPU); anything else starts fresh and says so. Nothing half-trained is published. Shape
twins are skipped.

    python -m stages.finetune --config configs/smollm2.toml   # ~35 minutes on 2 cores
    python -m stages.finetune --config configs/smoke.toml     # under 2 minutes on CPU

Writes artifacts/<run>/finetune/<slug>/adapter/ and history.json (per-step loss, learning rate and
grad norm; per-evaluation loss and exact match; tokens/s of the trainer and of the plain loop), and with
report_to = ["tensorboard"] the same scalars as TensorBoard events in tensorboard/ (`tensorboard --logdir`).
"""
from __future__ import annotations

import functools
import inspect
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from stages.lib import artifacts, cli, registry
from stages.lib.config import as_dict, require
from stages.lib.models import base_models, weights_dir
from stages.lib.task import read_split

PACKAGES = ["torch", "transformers", "peft", "bitsandbytes", "accelerate"]
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE = -100  # label of a position without loss


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
    max_steps: int = 0                # > 0: train this many optimizer steps instead of `epochs`
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 2e-4
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    max_length: int = 512
    bf16: bool = True                 # used only where the hardware supports it
    gradient_checkpointing: bool = True   # saves memory on GPUs, costs ~30% compute
    shared_prefix: bool = False       # the instruction's keys/values once per batch (needs no gradient checkpointing)
    group_by_length: bool = False     # batches of similar length: less padding
    eval_steps: int = 0               # evaluate (and checkpoint) every N steps; 0: every epoch
    eval_examples: int = 0            # validation examples for the evaluation loss (0: all)
    eval_exact_match: int = 0         # validation examples decoded per evaluation (0: all)
    plain_loop_steps: int = 0         # time a plain PyTorch LoRA loop for N steps first (0: skip)
    logging_steps: int = 25
    progress_every_s: float = 30.0    # a progress line this often when the output is not a terminal
    report_to: list[str] = field(default_factory=list)   # ["tensorboard"]: events in finetune/<slug>/tensorboard/

    def validate(self) -> None:
        require(self.quant_type in ("nf4", "fp4"), "quant_type", '"nf4" or "fp4"')
        require(self.lora_r >= 1 and self.lora_alpha > 0, "lora_r", "lora_r >= 1 and lora_alpha > 0")
        require(0 <= self.lora_dropout < 1, "lora_dropout", "a fraction in [0, 1)")
        require(set(self.target_modules) <= set(ALL_PROJECTIONS) and bool(self.target_modules), "target_modules",
                f"a non-empty subset of {ALL_PROJECTIONS}")
        require(set(self.modules_to_save) <= {"embed_tokens", "lm_head"}, "modules_to_save",
                'a subset of ["embed_tokens", "lm_head"]')
        require(0 < self.epochs < 1e4 and self.batch_size >= 1 and self.grad_accum >= 1, "epochs",
                "epochs in (0, 10000), batch_size >= 1, grad_accum >= 1")
        require(0 < self.learning_rate < 1, "learning_rate", "a learning rate in (0, 1)")
        require(0 <= self.warmup_ratio < 1, "warmup_ratio", "a fraction in [0, 1)")
        require(self.lr_scheduler in ("linear", "cosine", "constant_with_warmup"), "lr_scheduler",
                '"linear", "cosine" or "constant_with_warmup"')
        require(min(self.max_steps, self.eval_steps, self.eval_examples, self.eval_exact_match,
                    self.plain_loop_steps) >= 0 and self.logging_steps >= 1, "eval_exact_match", "counts >= 0")
        require(not (self.shared_prefix and self.gradient_checkpointing), "shared_prefix",
                "false when gradient_checkpointing is true (checkpointed layers keep no key/value cache)")
        require(0 < self.progress_every_s < 1e6, "progress_every_s", "seconds > 0")
        # a prompt and its answer must fit: 0 failed after loading the model, -1 trained on truncated rows
        require(32 <= self.max_length <= 1 << 20, "max_length", "tokens per example, 32 or more")
        require(set(self.report_to) <= {"tensorboard"}, "report_to", '[] or ["tensorboard"]')


RESUME_STATE = "cart_resume.json"  # written into each checkpoint after the Trainer's own files


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint (the Trainer's files and then ours written)."""
    done = [p for p in folder.glob("checkpoint-*") if (p / RESUME_STATE).exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def encode(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    """input_ids = prompt (as inference tokenizes it) + completion + EOS; prompt_len marks where loss starts."""
    from stages.lib.task import build_completion, build_prompt
    encoded = []
    for ex in rows:
        prompt = tokenizer(build_prompt(ex["text"]))["input_ids"]
        answer = tokenizer(build_completion(ex["action"], ex["product"], ex["quantity"]),
                           add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        encoded.append({"input_ids": (prompt + answer)[:max_length], "prompt_len": len(prompt)})
    return encoded


def common_prefix_len(encoded: list[dict]) -> int:
    """Tokens every prompt starts with (the instruction), leaving at least one prompt token per example."""
    first = encoded[0]["input_ids"]
    length = min(ex["prompt_len"] for ex in encoded) - 1
    for ex in encoded[1:]:
        ids = ex["input_ids"]
        while length and ids[:length] != first[:length]:
            length -= 1
    return max(length, 0)


class Collate:
    """Right-padded batches with labels on the completion; with a shared prefix, the prefix is split off."""

    def __init__(self, pad_id: int, prefix_len: int = 0):
        self.pad_id, self.prefix_len = pad_id, prefix_len

    def __call__(self, features: list[dict]) -> dict:
        import torch
        cut = self.prefix_len
        bodies = [f["input_ids"][cut:] for f in features]
        width = max(len(b) for b in bodies)
        ids = torch.full((len(bodies), width), self.pad_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE)
        mask = torch.zeros_like(ids)
        for row, (f, body) in enumerate(zip(features, bodies)):
            ids[row, :len(body)] = torch.tensor(body)
            mask[row, :len(body)] = 1
            labels[row, f["prompt_len"] - cut:len(body)] = torch.tensor(body[f["prompt_len"] - cut:])
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if cut:
            batch["prefix_ids"] = torch.tensor([features[0]["input_ids"][:cut]])
        return batch


@functools.lru_cache(maxsize=None)
def cache_argument(decoder_class) -> str:
    """transformers 5.2x renamed past_key_values to cache (argument and output); older 5.x keep the old name.
    Looked up once per class, not on every training step."""
    return "cache" if "cache" in inspect.signature(decoder_class.forward).parameters else "past_key_values"


def completion_loss(model, batch: dict):
    """Mean cross-entropy over labelled positions; logits only where a label is."""
    import torch
    import torch.nn.functional as F
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, ids, mask = causal_lm.model, batch["input_ids"], batch["attention_mask"]
    extra = {}
    if "prefix_ids" in batch:  # the shared instruction once, its keys/values repeated for every row
        name = cache_argument(type(decoder))
        prefix_len = batch["prefix_ids"].shape[1]
        cache = getattr(decoder(input_ids=batch["prefix_ids"], use_cache=True), name)
        cache.batch_repeat_interleave(ids.shape[0])
        extra = {name: cache, "use_cache": True,
                 "position_ids": torch.arange(prefix_len, prefix_len + ids.shape[1], device=ids.device).expand_as(ids)}
        mask = torch.cat([mask.new_ones(ids.shape[0], prefix_len), mask], dim=1)
    hidden = decoder(input_ids=ids, attention_mask=mask, **extra).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    logits = causal_lm.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep])


class EpochSeededLengthSampler:
    """transformers' length-grouped order drawn from (seed, epoch) alone. Its own LengthGroupedSampler draws
    from the global RNG when an epoch's iterator starts, which a resume in the middle of an epoch after the
    first has not restored yet: the resumed run would see other batches than the uninterrupted one."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:  # called by the Trainer (through accelerate) before each epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


def make_trainer_class(meter: dict, record: dict):
    from transformers import Trainer, TrainerCallback

    class RestoreAtTrainBegin(TrainerCallback):
        """The Trainer's loop resets its loss accumulators after loading a checkpoint; this runs after that."""

        def __init__(self, trainer, checkpoint: Path):
            self.trainer, self.checkpoint = trainer, checkpoint

        def on_train_begin(self, args, state, control, **kwargs):
            self.trainer.restore_resume_state(self.checkpoint)

    class CompletionTrainer(Trainer):
        """Trainer whose loss is completion_loss; it counts the training tokens of each step (no padding),
        draws length-grouped batches from the seed and epoch, and saves into each checkpoint what a resume
        needs beyond the Trainer's own state: the history so far and the loss being averaged."""

        def _get_train_sampler(self, train_dataset=None):
            if self.args.train_sampling_strategy != "group_by_length":
                return super()._get_train_sampler(train_dataset)  # accelerate's sampler is seeded by epoch
            rows = train_dataset if train_dataset is not None else self.train_dataset
            return EpochSeededLengthSampler([len(row["input_ids"]) for row in rows],
                                            self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                            self.args.data_seed if self.args.data_seed is not None else self.args.seed)

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
            artifacts.write_json(folder / RESUME_STATE, {
                "evaluations": record["evaluations"], "step_log": record["step_log"],
                "train_elapsed_s": record["train_elapsed_s"],
                "total_loss": self._total_loss_scalar, "pending_loss": self._tr_loss.item(),
                "last_logged_step": self._globalstep_last_logged})

        def train(self, resume_from_checkpoint=None, **kwargs):
            if resume_from_checkpoint:  # first, so the other callbacks see the restored history
                self.callback_handler.callbacks.insert(0, RestoreAtTrainBegin(self, Path(resume_from_checkpoint)))
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

        def restore_resume_state(self, checkpoint: Path) -> None:
            """After the Trainer's own restore (its loop resets these when it starts): as at the checkpoint."""
            import torch
            saved = artifacts.read_json(checkpoint / RESUME_STATE)
            record.update(evaluations=saved["evaluations"], step_log=saved["step_log"],
                          train_elapsed_s=saved["train_elapsed_s"])
            self._total_loss_scalar = saved["total_loss"]
            self._tr_loss = torch.tensor(saved["pending_loss"], device=self.args.device)
            self._globalstep_last_logged = saved["last_logged_step"]
            self._initial_global_step = 0  # the mean training loss is over every step, not this process's

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = completion_loss(model, inputs)
            if model.training:
                prefix = inputs["prefix_ids"].shape[1] if "prefix_ids" in inputs else 0
                meter["pending"] += int(inputs["attention_mask"].sum()) + prefix * inputs["input_ids"].shape[0]
            return (loss, {"loss": loss}) if return_outputs else loss

    return CompletionTrainer


def load_base(path: Path, cfg: FinetuneConfig, compute_dtype, cuda: bool):
    """The base model with fresh LoRA adapters (4-bit base when load_in_4bit)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                                      bnb_4bit_compute_dtype=compute_dtype) if cfg.load_in_4bit else None
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=compute_dtype,
                                                 device_map="auto" if cuda else "cpu")
    if cfg.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed frozen layers need an input that requires grad
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=cfg.target_modules, modules_to_save=cfg.modules_to_save or None,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def plain_loop_tokens_per_s(model, rows: list[dict], cfg: FinetuneConfig, pad_id: int) -> dict:
    """The yardstick: a textbook PyTorch LoRA loop (full padded sequences, the model's own loss, AdamW) over
    the first `plain_loop_steps` batches; tokens/s over the steps after the first (warm-up)."""
    import torch
    collate = Collate(pad_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    model.train()
    tokens, seconds = 0, 0.0
    for step in range(cfg.plain_loop_steps + 1):
        batch = collate(rows[step * cfg.batch_size:(step + 1) * cfg.batch_size])
        began = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        if step:
            tokens, seconds = tokens + int(batch["attention_mask"].sum()), seconds + time.perf_counter() - began
    return {"steps": cfg.plain_loop_steps, "tokens_per_s": round(tokens / seconds, 1)}


def tensorboard_callbacks(cfg: FinetuneConfig, out: Path) -> list:
    """report_to = ["tensorboard"]: the Trainer's logged scalars (loss, learning rate, grad norm, eval loss and
    exact match) as TensorBoard events in the model's own folder, written by the pinned tensorboardX."""
    if "tensorboard" not in cfg.report_to:
        return []
    from tensorboardX import SummaryWriter
    from transformers.integrations import TensorBoardCallback
    return [TensorBoardCallback(SummaryWriter(logdir=str(out / "tensorboard")))]


def make_callbacks(tokenizer, probe: list[dict], cfg: FinetuneConfig, record: dict, meter: dict):
    """Exact match at each evaluation, the per-step log, step timing and progress lines, all into `record`;
    `meter` holds the tokens and seconds of the timed steps (all but this process's first)."""
    from transformers import TrainerCallback
    from stages.lib.generation import exact_match_rate
    record.update(evaluations=[], step_log=[], train_elapsed_s=0.0)

    class Recorder(TrainerCallback):
        started = last_line = began = 0.0
        first_step = 1

        def on_train_begin(self, args, state, control, **kwargs):
            # after a resume: the training time before the interrupt counts, timing starts at this process
            self.started = time.time() - record["train_elapsed_s"]
            self.last_line = time.time()
            self.first_step = state.global_step + 1

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            record["train_elapsed_s"] = round(time.time() - self.started, 1)
            if state.global_step > self.first_step:  # the first step includes one-off allocation and set-up
                meter["seconds"] += time.perf_counter() - self.began
                meter["tokens"] += meter["pending"]
            meter["pending"] = 0
            if time.time() - self.last_line >= cfg.progress_every_s or state.global_step == state.max_steps:
                self.last_line = time.time()
                elapsed = self.last_line - self.started
                done = state.global_step / max(state.max_steps, 1)
                loss = next((r["loss"] for r in reversed(record["step_log"]) if "loss" in r), "–")
                cli.console.print(f"  step {state.global_step}/{state.max_steps} · loss {loss} · "
                                  f"{elapsed / max(state.global_step, 1):.2f} s/step · "
                                  f"{elapsed / 60:.1f} min, ETA {elapsed / max(done, 1e-9) * (1 - done) / 60:.1f} min")

        def on_log(self, args, state, control, logs=None, **kwargs):
            row = {k: round(v, 6) for k, v in (logs or {}).items() if k in ("loss", "learning_rate", "grad_norm")}
            if row:
                record["step_log"].append({"step": state.global_step, **row,
                                           "elapsed_s": round(time.time() - self.started, 1)})

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            rate, _ = exact_match_rate(kwargs["model"], tokenizer, probe)
            row = {"epoch": round(state.epoch or 0, 3), "step": state.global_step,
                   "eval_loss": round(metrics.get("eval_loss", float("nan")), 5), "val_exact_match": round(rate, 4),
                   "elapsed_s": round(time.time() - self.started, 1)}
            record["evaluations"].append(row)
            metrics["eval_exact_match"] = rate
            cli.console.print(f"  step {row['step']} (epoch {row['epoch']}): eval loss {row['eval_loss']}, "
                              f"val exact match {rate:.3f} ({len(probe)} examples)")

    return [Recorder()]


def training_arguments(cfg: FinetuneConfig, checkpoints: Path, seed: int, cuda: bool, bf16: bool):
    from transformers import TrainingArguments
    every = {"eval_strategy": "steps", "eval_steps": cfg.eval_steps, "save_strategy": "steps",
             "save_steps": cfg.eval_steps} if cfg.eval_steps else {"eval_strategy": "epoch", "save_strategy": "epoch"}
    return TrainingArguments(
        output_dir=str(checkpoints), num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=max(cfg.batch_size, 32),
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5 reads a value < 1 as a share of the steps
        max_grad_norm=cfg.max_grad_norm, weight_decay=cfg.weight_decay, bf16=bf16, fp16=False, **every,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False, save_total_limit=2,
        seed=seed, data_seed=seed, logging_steps=cfg.logging_steps, report_to=[], use_cpu=not cuda,
        dataloader_num_workers=0, gradient_checkpointing=cfg.gradient_checkpointing, disable_tqdm=True,
        **({"train_sampling_strategy": "group_by_length"} if cfg.group_by_length else {}),
        remove_unused_columns=False, label_names=["labels"], prediction_loss_only=True)


def finetune_one(record: dict, cfg: FinetuneConfig, train: list[dict], val: list[dict], seed: int,
                 out: Path) -> dict:
    import torch
    from transformers import AutoTokenizer

    cuda = torch.cuda.is_available()
    bf16 = cfg.bf16 and cuda and torch.cuda.is_bf16_supported()
    compute_dtype = (torch.bfloat16 if bf16 else torch.float16) if cuda else torch.float32
    path = weights_dir(record)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_rows = encode(tokenizer, train, cfg.max_length)
    eval_rows = encode(tokenizer, val[: cfg.eval_examples or None], cfg.max_length)
    prefix_len = common_prefix_len(train_rows + eval_rows) if cfg.shared_prefix else 0
    result: dict = {"base": record["spec"]}
    if cfg.plain_loop_steps:
        cli.console.print(f"  timing a plain PyTorch LoRA loop for {cfg.plain_loop_steps} steps (the yardstick)")
        torch.manual_seed(seed)
        result["plain_loop"] = plain_loop_tokens_per_s(load_base(path, cfg, compute_dtype, cuda), train_rows, cfg,
                                                       tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = load_base(path, cfg, compute_dtype, cuda)
    probe = val if cfg.eval_exact_match == 0 else val[: cfg.eval_exact_match]
    checkpoints = out / "checkpoints"
    meter = {"pending": 0, "tokens": 0, "seconds": 0.0}
    callbacks = make_callbacks(tokenizer, probe, cfg, result, meter) + tensorboard_callbacks(cfg, out)
    trainer = make_trainer_class(meter, result)(
        model=model, args=training_arguments(cfg, checkpoints, seed, cuda, bf16), train_dataset=train_rows,
        eval_dataset=eval_rows, data_collator=Collate(tokenizer.pad_token_id, prefix_len),
        processing_class=tokenizer, callbacks=callbacks)
    resume = last_checkpoint(checkpoints)
    if resume:
        cli.console.print(f"  resuming from {resume.name}")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    outcome = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    wall = time.time() - started
    trainer.model.save_pretrained(out / "adapter")
    tokenizer.save_pretrained(out / "adapter")
    shutil.rmtree(checkpoints)
    tokens_per_s = meter["tokens"] / max(meter["seconds"], 1e-9)
    result.update({
        "resumed_from": resume.name if resume else None, "shared_prefix_tokens": prefix_len,
        "best_checkpoint": Path(trainer.state.best_model_checkpoint or "").name or None,
        "best_eval_loss": trainer.state.best_metric, "train_loss": round(outcome.training_loss, 5),
        "steps": trainer.state.global_step, "wall_s": round(wall, 1), "train_tokens_per_s": round(tokens_per_s, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_vram_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
        "compute_dtype": str(compute_dtype).replace("torch.", ""), "device": "cuda" if cuda else "cpu",
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)})
    if "plain_loop" in result:
        result["vs_plain_loop"] = round(result["train_tokens_per_s"] / result["plain_loop"]["tokens_per_s"], 3)
    return result


def run(run_cfg, cfg: FinetuneConfig, args) -> int:
    run_dir = run_cfg.run_dir
    manifests = registry.upstream(run_dir, "finetune")
    stage = artifacts.StageRun("finetune", "finetune", run_dir, {**as_dict(cfg), "seed": run_cfg.seed},
                               artifacts.input_fingerprint(manifests), artifacts.code_hash(__file__), PACKAGES)
    if cli.already_done(stage, args):
        return 0
    train = read_split(run_dir, "train")
    val = read_split(run_dir, "val")
    out = stage.fresh_tmp(resumable=not args.force)  # checkpoints of an identical interrupted attempt are resumed
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
    stage.results["models"] = {slug: {k: v for k, v in r.items() if k != "step_log"} for slug, r in results.items()}
    stage.publish()
    cli.show_config("fine-tuning", {slug: {k: v for k, v in r.items() if k not in ("step_log", "evaluations")}
                                    for slug, r in results.items()})
    return 0


def main(argv=None) -> int:
    return cli.run_stage(__doc__, "finetune", FinetuneConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
