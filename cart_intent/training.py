"""Fine-tuning pieces: the encoded rows, batches with labels on the completion, the completion-only loss with a
shared instruction prefix, the seeded length-grouped order, the LoRA model, and the timed-steps yardstick.
torch, transformers and peft are imported where used: a stage's --help and config errors stay instant.

`stages/finetune.py` builds its recipe from these; `scripts/bench_finetune.py` times them one by one.
"""
from __future__ import annotations

import functools
import inspect
import time
from pathlib import Path

from .task import build_completion, build_prompt

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE = -100  # label of a position without loss


def encode(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    """input_ids = prompt (as inference tokenizes it) + completion + EOS; prompt_len marks where loss starts."""
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


def completion_forward(model):
    """model, its forward replaced by completion_loss ({"loss": ...}): DistributedDataParallel synchronizes the
    gradients of what runs inside the forward of the module it wraps, so the loss must be that forward. Generation
    is unaffected (it runs the wrapped causal LM's own forward)."""
    def forward(input_ids, attention_mask, labels, prefix_ids=None):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return {"loss": completion_loss(model, batch if prefix_ids is None else {**batch, "prefix_ids": prefix_ids})}
    model.forward = forward
    return model


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


def load_base(path: Path, cfg, compute_dtype, cuda: bool):
    """The base model with fresh LoRA adapters (4-bit base when load_in_4bit); cfg: finetune's config."""
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


def model_loss(model, batch: dict):
    """The textbook loss: the model's own cross-entropy over every position of the full padded sequences."""
    return model(**batch).loss


def timed_steps(model, batches: list[list[dict]], collate, loss_fn, learning_rate: float,
                max_grad_norm: float) -> dict:
    """Forward, backward, clipping and an AdamW step over each batch; tokens (no padding) per second and seconds
    per step over every step after the first (it allocates and warms up)."""
    import torch
    cuda = model.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    model.train()
    tokens, seconds = 0, 0.0
    for step, rows in enumerate(batches):
        batch = {key: value.to(model.device) for key, value in collate(rows).items()}
        sync()
        began = time.perf_counter()
        loss = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        sync()
        if step:
            tokens += sum(len(row["input_ids"]) for row in rows)
            seconds += time.perf_counter() - began
    steps = len(batches) - 1
    return {"steps": steps, "tokens_per_s": round(tokens / seconds, 1), "s_per_step": round(seconds / steps, 4)}
