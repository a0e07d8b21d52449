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
    python -m stages.finetune --config configs/smoke.toml --nproc-per-node 2   # two processes, one model (DDP)

Several processes (`--nproc-per-node`, and `--nnodes`/`--node-rank`/`--master-addr` for several hosts sharing the
artifacts folder) train one model with DistributedDataParallel (gloo on CPU, nccl on CUDA), started by PyTorch's
elastic launcher as torchrun starts them (cart_intent/distributed.py). The global batch stays `batch_size` (each
process takes batch_size / processes), so the run is comparable with one process; only the first process writes
the adapter, history and progress lines; the manifest records the world size.

Writes artifacts/<run>/finetune/<slug>/adapter/ and history.json (per-step loss, learning rate and
grad norm; per-evaluation loss and exact match; tokens/s of the trainer and of the plain loop), and with
report_to = ["tensorboard"] the same scalars as TensorBoard events in tensorboard/ (`tensorboard --logdir`).
"""
from __future__ import annotations

import resource
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from cart_intent import artifacts, cli, distributed, registry
from cart_intent.config import ConfigError, as_dict, require
from cart_intent.generation import exact_match_rate
from cart_intent.models import base_models, weights_dir
from cart_intent.task import read_split
from cart_intent.training import (ALL_PROJECTIONS, Collate, EpochSeededLengthSampler, common_prefix_len,
                                 completion_forward, encode, load_base, model_loss, timed_steps)

PACKAGES = ["torch", "transformers", "peft", "bitsandbytes", "accelerate"]


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
        # a prompt and its answer must fit: 0 failed after loading the model, -1 trained on truncated rows
        require(32 <= self.max_length <= 1 << 20, "max_length", "tokens per example, 32 or more")
        require(set(self.report_to) <= {"tensorboard"}, "report_to", '[] or ["tensorboard"]')


RESUME_STATE = "cart_resume.json"  # written into each checkpoint after the Trainer's own files


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint (the Trainer's files and then ours written)."""
    done = [p for p in folder.glob("checkpoint-*") if (p / RESUME_STATE).exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def make_trainer_class(meter: dict, record: dict):
    import torch
    from transformers import Trainer, TrainerCallback

    class RestoreAtTrainBegin(TrainerCallback):
        """The Trainer's loop resets its loss accumulators after loading a checkpoint; this runs after that."""

        def __init__(self, trainer, checkpoint: Path):
            self.trainer, self.checkpoint = trainer, checkpoint

        def on_train_begin(self, args, state, control, **kwargs):
            self.trainer.restore_resume_state(self.checkpoint)

    class CompletionTrainer(Trainer):
        """Trainer whose loss is completion_loss, counting each step's tokens (no padding), drawing length-grouped
        batches from seed and epoch, saving what a resume needs beyond its own state (history, loss so far)."""

        def _get_train_sampler(self, train_dataset=None):
            if self.args.train_sampling_strategy != "group_by_length":
                return super()._get_train_sampler(train_dataset)  # accelerate's sampler is seeded by epoch
            rows = train_dataset if train_dataset is not None else self.train_dataset
            return EpochSeededLengthSampler([len(row["input_ids"]) for row in rows],
                                            self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                            self.args.data_seed if self.args.data_seed is not None else self.args.seed)

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()   # every process's files first (each saves its RNG state)
            if not self.args.should_save:   # the first process writes the rest
                return
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
            saved = artifacts.read_json(checkpoint / RESUME_STATE)
            record.update(evaluations=saved["evaluations"], step_log=saved["step_log"],
                          train_elapsed_s=saved["train_elapsed_s"])
            self._total_loss_scalar = saved["total_loss"]
            self._tr_loss = torch.tensor(saved["pending_loss"], device=self.args.device)
            self._globalstep_last_logged = saved["last_logged_step"]
            self._initial_global_step = 0  # the mean training loss is over every step, not this process's

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = model(**inputs)["loss"]   # completion_forward's, through DDP when there are several processes
            if model.training:
                prefix = inputs["prefix_ids"].shape[1] if "prefix_ids" in inputs else 0
                meter["pending"] += int(inputs["attention_mask"].sum()) + prefix * inputs["input_ids"].shape[0]
            return (loss, {"loss": loss}) if return_outputs else loss

    return CompletionTrainer


def tensorboard_callbacks(cfg: FinetuneConfig, out: Path) -> list:
    """report_to = ["tensorboard"]: the Trainer's logged scalars (loss, learning rate, grad norm, eval loss and
    exact match) as TensorBoard events in the model's own folder, written by the pinned tensorboardX."""
    if "tensorboard" not in cfg.report_to:
        return []
    from tensorboardX import SummaryWriter
    from transformers.integrations import TensorBoardCallback
    return [TensorBoardCallback(SummaryWriter(logdir=str(out / "tensorboard")))]


def make_callbacks(tokenizer, probe: list[dict], record: dict, meter: dict, stack: ExitStack):
    """Exact match at each evaluation, the per-step log and step timing, all into `record`, and the steps as
    `cli.progress` shows every long loop (entered on `stack`, which outlives training); `meter` holds the tokens
    and seconds of the timed steps (all but this process's first)."""
    from transformers import TrainerCallback
    record.update(evaluations=[], step_log=[], train_elapsed_s=0.0)

    class Recorder(TrainerCallback):
        started = began = 0.0
        first_step = 1
        advance = None

        def on_train_begin(self, args, state, control, **kwargs):
            # after a resume: the training time before the interrupt counts, timing starts at this process
            self.started = time.time() - record["train_elapsed_s"]
            self.first_step = state.global_step + 1
            if not state.is_world_process_zero:   # one set of progress lines, the first process's
                self.advance = lambda *steps: None
                return
            self.advance = stack.enter_context(cli.progress("  training steps", state.max_steps))
            if state.global_step:
                self.advance(state.global_step)

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            record["train_elapsed_s"] = round(time.time() - self.started, 1)
            if state.global_step > self.first_step:  # the first step includes one-off allocation and set-up
                meter["seconds"] += time.perf_counter() - self.began
                meter["tokens"] += meter["pending"]
            meter["pending"] = 0
            self.advance()

        def on_log(self, args, state, control, logs=None, **kwargs):
            row = {k: round(v, 6) for k, v in (logs or {}).items() if k in ("loss", "learning_rate", "grad_norm")}
            if row:
                record["step_log"].append({"step": state.global_step, **row,
                                           "elapsed_s": round(time.time() - self.started, 1)})

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if not state.is_world_process_zero:   # the first process decodes and records; the others go on
                return
            rate, _ = exact_match_rate(kwargs["model"], tokenizer, probe)
            row = {"epoch": round(state.epoch or 0, 3), "step": state.global_step,
                   "eval_loss": round(metrics.get("eval_loss", float("nan")), 5), "val_exact_match": round(rate, 4),
                   "elapsed_s": round(time.time() - self.started, 1)}
            record["evaluations"].append(row)
            metrics["eval_exact_match"] = rate
            cli.console.print(f"  step {row['step']} (epoch {row['epoch']}): eval loss {row['eval_loss']}, "
                              f"val exact match {rate:.3f} ({len(probe)} examples)")

    return [Recorder()]


def training_arguments(cfg: FinetuneConfig, checkpoints: Path, seed: int, cuda: bool, bf16: bool, world_size: int):
    """The recipe as the Trainer's arguments; with several processes each takes batch_size / world_size."""
    from transformers import TrainingArguments
    every = {"eval_strategy": "steps", "eval_steps": cfg.eval_steps, "save_strategy": "steps",
             "save_steps": cfg.eval_steps} if cfg.eval_steps else {"eval_strategy": "epoch", "save_strategy": "epoch"}
    ddp = {"ddp_backend": "nccl" if cuda else "gloo", "ddp_find_unused_parameters": False} if world_size > 1 else {}
    return TrainingArguments(
        output_dir=str(checkpoints), num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=cfg.batch_size // world_size, per_device_eval_batch_size=max(cfg.batch_size, 32),
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5 reads a value < 1 as a share of the steps
        max_grad_norm=cfg.max_grad_norm, weight_decay=cfg.weight_decay, bf16=bf16, fp16=False, **every,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False, save_total_limit=2,
        seed=seed, data_seed=seed, logging_steps=cfg.logging_steps, report_to=[], use_cpu=not cuda,
        dataloader_num_workers=0, gradient_checkpointing=cfg.gradient_checkpointing, disable_tqdm=True,
        **({"train_sampling_strategy": "group_by_length"} if cfg.group_by_length else {}),
        remove_unused_columns=False, label_names=["labels"], prediction_loss_only=True, **ddp)


@dataclass
class Prepared:
    """What training one base model starts from."""
    path: Path
    tokenizer: object
    train_rows: list[dict]
    eval_rows: list[dict]
    prefix_len: int
    cuda: bool
    bf16: bool
    compute_dtype: object
    probe: list[dict]      # validation examples decoded for exact match at each evaluation


def setup(record: dict, cfg: FinetuneConfig, train: list[dict], val: list[dict]) -> Prepared:
    """Tokenizer, encoded rows (loss on the completion), the shared instruction's length, the compute dtype."""
    import torch
    from transformers import AutoTokenizer
    cuda = torch.cuda.is_available()
    bf16 = cfg.bf16 and cuda and torch.cuda.is_bf16_supported()
    path = weights_dir(record)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_rows = encode(tokenizer, train, cfg.max_length)
    eval_rows = encode(tokenizer, val[: cfg.eval_examples or None], cfg.max_length)
    prefix_len = common_prefix_len(train_rows + eval_rows) if cfg.shared_prefix else 0
    compute_dtype = (torch.bfloat16 if bf16 else torch.float16) if cuda else torch.float32
    probe = val if cfg.eval_exact_match == 0 else val[: cfg.eval_exact_match]
    return Prepared(path, tokenizer, train_rows, eval_rows, prefix_len, cuda, bf16, compute_dtype, probe)


def yardstick(prep: Prepared, cfg: FinetuneConfig, seed: int) -> dict:
    """A textbook PyTorch LoRA loop (full padded sequences, the model's own loss, AdamW) on the first batches."""
    import torch
    cli.console.print(f"  timing a plain PyTorch LoRA loop for {cfg.plain_loop_steps} steps (the yardstick)")
    torch.manual_seed(seed)
    rows, size = prep.train_rows, cfg.batch_size
    batches = [rows[i * size:(i + 1) * size] for i in range(cfg.plain_loop_steps + 1)]
    timed = timed_steps(load_base(prep.path, cfg, prep.compute_dtype, prep.cuda), batches,
                        Collate(prep.tokenizer.pad_token_id), model_loss, cfg.learning_rate, cfg.max_grad_norm)
    return {"steps": timed["steps"], "tokens_per_s": timed["tokens_per_s"]}


def train(prep: Prepared, cfg: FinetuneConfig, seed: int, out: Path, result: dict, world_size: int) -> dict:
    """transformers' Trainer with the completion-only loss, resumed from the last complete checkpoint; returns
    what the run measured and leaves the best model in the trainer it returns under "trainer"."""
    import torch
    torch.manual_seed(seed)
    model = completion_forward(load_base(prep.path, cfg, prep.compute_dtype, prep.cuda))
    checkpoints = out / "checkpoints"
    meter, stack = {"pending": 0, "tokens": 0, "seconds": 0.0}, ExitStack()
    callbacks = make_callbacks(prep.tokenizer, prep.probe, result, meter, stack) + tensorboard_callbacks(cfg, out)
    trainer = make_trainer_class(meter, result)(
        model=model, args=training_arguments(cfg, checkpoints, seed, prep.cuda, prep.bf16, world_size),
        train_dataset=prep.train_rows, eval_dataset=prep.eval_rows, processing_class=prep.tokenizer,
        data_collator=Collate(prep.tokenizer.pad_token_id, prep.prefix_len), callbacks=callbacks)
    resume = last_checkpoint(checkpoints)
    if resume and trainer.is_world_process_zero():
        cli.console.print(f"  resuming from {resume.name}")
    if prep.cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    with stack:
        outcome = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    tokens = distributed.total(meter["tokens"])   # every process's share of the global batches
    return {"trainer": trainer, "outcome": outcome, "resume": resume, "wall": time.time() - started,
            "tokens_per_s": tokens / max(meter["seconds"], 1e-9)}


def save(prep: Prepared, trainer, out: Path) -> None:
    """The best adapter and the tokenizer (the first process); the checkpoints go."""
    if trainer.is_world_process_zero():
        trainer.model.save_pretrained(out / "adapter")
        prep.tokenizer.save_pretrained(out / "adapter")
        shutil.rmtree(out / "checkpoints")


def finetune_one(record: dict, cfg: FinetuneConfig, train_split: list[dict], val: list[dict], seed: int,
                 out: Path, world_size: int) -> dict:
    """The recipe for one base model: set up, time the yardstick (one process only), train, save; its history."""
    import torch
    prep = setup(record, cfg, train_split, val)
    result: dict = {"base": record["spec"], "world_size": world_size, "per_process_batch": cfg.batch_size // world_size}
    if cfg.plain_loop_steps and world_size == 1:
        result["plain_loop"] = yardstick(prep, cfg, seed)
    run = train(prep, cfg, seed, out, result, world_size)
    trainer, resume = run["trainer"], run["resume"]
    save(prep, trainer, out)
    result.update({
        "resumed_from": resume.name if resume else None, "shared_prefix_tokens": prep.prefix_len,
        "best_checkpoint": Path(trainer.state.best_model_checkpoint or "").name or None,
        "best_eval_loss": trainer.state.best_metric, "train_loss": round(run["outcome"].training_loss, 5),
        "steps": trainer.state.global_step, "wall_s": round(run["wall"], 1),
        "train_tokens_per_s": round(run["tokens_per_s"], 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_vram_mib": round(torch.cuda.max_memory_allocated() / 2**20) if prep.cuda else None,
        "compute_dtype": str(prep.compute_dtype).replace("torch.", ""), "device": "cuda" if prep.cuda else "cpu",
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)})
    if "plain_loop" in result:
        result["vs_plain_loop"] = round(result["train_tokens_per_s"] / result["plain_loop"]["tokens_per_s"], 3)
    return result


SHAPE_SKIPPED = {"skipped": "shape twin: random weights, fine-tuning is meaningless"}


def train_all(run_dir: Path, cfg: FinetuneConfig, seed: int, out: Path, world_size: int, first: bool) -> None:
    """Every base model's adapter and history.json into out (the first process writes; a model whose history is
    there finished in an interrupted earlier attempt)."""
    train_split, val = read_split(run_dir, "train"), read_split(run_dir, "val")
    for slug, record in base_models(run_dir).items():
        folder = out / slug
        if record["kind"] == "shape" or (folder / "history.json").exists():
            continue
        if first:
            cli.console.rule(f"fine-tuning {record['spec']}" + (f" ({world_size} processes)" if world_size > 1 else ""))
        folder.mkdir(exist_ok=True)
        history = finetune_one(record, cfg, train_split, val, seed, folder, world_size)
        if first:
            artifacts.write_json(folder / "history.json", history)
        distributed.barrier()   # written before any process goes on (or its launcher publishes)


def run(run_cfg, cfg: FinetuneConfig, args) -> int:
    run_dir, plan, me = run_cfg.run_dir, distributed.Launch.from_args(args), distributed.worker()
    world_size = me["world_size"] if me else plan.world_size
    if world_size < 1 or cfg.batch_size % world_size:
        raise ConfigError(f"finetune.batch_size = {cfg.batch_size} is the global batch: it must split evenly over "
                          f"{world_size} training processes (--nproc-per-node x --nnodes)")
    manifests = registry.upstream(run_dir, "finetune")
    recipe = {**as_dict(cfg), "seed": run_cfg.seed, **({"world_size": world_size} if world_size > 1 else {})}
    stage = artifacts.StageRun("finetune", "finetune", run_dir, recipe, artifacts.input_fingerprint(manifests),
                               artifacts.code_hash(__file__), PACKAGES)
    if me:   # a process the launcher started: its launcher holds the lock and the folder, and publishes
        distributed.join(cuda=cuda_available())
        try:
            train_all(run_dir, cfg, run_cfg.seed, stage.tmp_dir, world_size, first=me["rank"] == 0)
        except RuntimeError as err:
            if not distributed.lost_peers(err):
                raise
            cli.console.print(f"training process {me['rank']}: another training process went away; stopping")
            return cli.EXIT_FAILED
        return 0
    if cli.already_done(stage, args):
        return 0
    if plan.node_rank == 0:   # checkpoints of an identical interrupted attempt are resumed
        stage.fresh_tmp(resumable=not args.force)
    if world_size > 1:
        job = artifacts.sha256_json({"config": recipe, "inputs": stage.inputs})[:16]
        code = distributed.launch(plan, "stages.finetune", args.argv, run_id=f"finetune-{job}")
        if code or plan.node_rank:
            return code
    else:
        train_all(run_dir, cfg, run_cfg.seed, stage.tmp_dir, 1, first=True)
    publish(stage, run_dir)
    return 0


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def publish(stage: artifacts.StageRun, run_dir: Path) -> None:
    """Every model's history (written by the training processes) into the manifest, and the folder into place."""
    results = {slug: SHAPE_SKIPPED if record["kind"] == "shape" else
               artifacts.read_json(stage.tmp_dir / slug / "history.json")
               for slug, record in base_models(run_dir).items()}
    stage.results["models"] = {slug: {k: v for k, v in r.items() if k != "step_log"} for slug, r in results.items()}
    stage.publish()
    cli.show_config("fine-tuning", {slug: {k: v for k, v in r.items() if k not in ("step_log", "evaluations")}
                                    for slug, r in results.items()})


def main(argv=None) -> int:
    def add_args(parser):
        distributed.add_launch_args(parser)
        parser.set_defaults(argv=list(sys.argv[1:] if argv is None else argv))   # what the launcher passes on
    return cli.run_stage(__doc__, "finetune", FinetuneConfig, run, argv, add_args)


if __name__ == "__main__":
    sys.exit(main())
