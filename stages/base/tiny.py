"""The embedded tiny base model: tokenizer, pre-training corpus, model, pre-training loop.

The corpus is unpaired: users' messages alone and JSON answers alone (shuffled apart, never a
message next to its answer), plus the general knowledge a real base model brings -- product
names across the three languages and their canonical English names, number words, copying.
So the base knows the languages and the answer format, not the task.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cart_intent.catalog import DOZEN, LANGUAGES, NUMBER_WORDS, Catalog
from cart_intent.cli import console
from cart_intent.config import require
from cart_intent.generation import exact_match_rate
from cart_intent.task import INSTRUCTION, format_answer

@dataclass
class TinyConfig:
    """[base.tiny]: the embedded model. Sizes are multiples of 256 so GGUF k-quants and GPTQ groups of 128 fit
    every matrix."""
    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 4
    max_seq_len: int = 256
    pretrain_steps: int = 1200
    pretrain_batch: int = 16
    pretrain_seq_len: int = 128
    pretrain_lr: float = 3e-3
    warmup_steps: int = 60
    dictionary_repeats: int = 4       # how often each product/number-word line recurs in the corpus
    copy_lines: int = 3000            # "Repeat: x => x" lines teaching the copy skill

    def validate(self) -> None:
        for key in ("hidden_size", "intermediate_size"):
            require(getattr(self, key) % 256 == 0, key, "a multiple of 256 (k-quant blocks)")
        require(self.hidden_size % self.num_heads == 0, "num_heads", "a divisor of hidden_size")
        require(self.vocab_size >= 600, "vocab_size", "an integer >= 600")
        for key in ("num_layers", "pretrain_batch", "pretrain_seq_len", "max_seq_len"):
            require(getattr(self, key) >= 1, key, "an integer >= 1")
        require(self.pretrain_steps >= 0 and self.warmup_steps >= 0, "pretrain_steps", "an integer >= 0")
        require(0 < self.pretrain_lr < 1, "pretrain_lr", "a learning rate in (0, 1)")
        require(self.dictionary_repeats >= 0 and self.copy_lines >= 0, "dictionary_repeats", "counts >= 0")


TOKENIZER_CONFIG = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                    "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
                    "model_max_length": 4096, "padding_side": "left"}


def knowledge_lines(catalog: Catalog, repeats: int) -> list[str]:
    """Product names in every language and form, number words: 'pastu za zube (hr) = Toothpaste'."""
    lines = []
    for product in catalog.products:
        for lang in LANGUAGES:
            for forms in product.names[lang]:
                for key, form in forms.items():
                    if key not in ("gender", "plurale_tantum"):
                        lines.append(f"{form} ({lang}) = {product.name}")
    for lang in LANGUAGES:
        lines += [f"{word} ({lang}) = {n}" for n, word in enumerate(NUMBER_WORDS[lang], start=1)]
        lines.append(f"{DOZEN[lang]} ({lang}) = 12")
    return sorted(set(lines)) * repeats


def copy_lines(texts: list[str], count: int, rng: random.Random) -> list[str]:
    """'Repeat: 12 lip balms => 12 lip balms' -- whole messages, spans of them and bare numbers.

    Copying a whole sentence makes the model look back a full message length, the retrieval
    that reading a product or a quantity out of a request needs later.
    """
    lines = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.2:
            span = str(rng.randint(1, 99))
        elif roll < 0.6:
            span = rng.choice(texts)
        else:
            words = rng.choice(texts).split()
            start = rng.randrange(len(words))
            span = " ".join(words[start:start + rng.randint(1, 4)])
        lines.append(f"Repeat: {span} => {span}")
    return lines


def build_corpus(train: list[dict], cfg, rng: random.Random, catalog: Catalog) -> list[str]:
    texts = [ex["text"] for ex in train]
    answers = [format_answer(ex["action"], ex["product"], ex["quantity"]) for ex in train]
    rng.shuffle(answers)  # answers alone, in another order than their messages
    # The instruction is ordinary English a base model would have read; it keeps prompts short in tokens.
    lines = (texts + answers + [INSTRUCTION] * 50 + knowledge_lines(catalog, cfg.dictionary_repeats)
             + copy_lines(texts, cfg.copy_lines, rng))
    rng.shuffle(lines)
    return lines


def train_tokenizer(lines: list[str], vocab_size: int, out: Path) -> None:
    """SentencePiece BPE with byte fallback; saved as tokenizer.model so llama.cpp's converter accepts it.

    Identity normalization keeps SentencePiece, transformers and llama.cpp tokenizing alike;
    split_digits makes quantities digit by digit; not splitting by script lets JSON keys merge.
    """
    import sentencepiece as spm
    from transformers import AutoTokenizer
    prefix = out / "spm"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, split_by_unicode_script=False, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=2, minloglevel=2)
    shutil.move(f"{prefix}.model", out / "tokenizer.model")
    Path(f"{prefix}.vocab").unlink()
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    AutoTokenizer.from_pretrained(out).save_pretrained(out)  # adds tokenizer.json for fast loading


def pretrain(model, tokenizer, lines: list[str], cfg, rng: random.Random, progress) -> dict:
    """Causal LM over the packed corpus; returns loss history and throughput."""
    import torch
    ids = []
    for encoded in tokenizer(lines, add_special_tokens=False).input_ids:
        ids += [tokenizer.bos_token_id, *encoded, tokenizer.eos_token_id]
    stream = torch.tensor(ids)
    length = cfg.pretrain_seq_len
    n_chunks = len(stream) // length
    chunks = stream[: n_chunks * length].view(n_chunks, length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.01)

    def lr_at(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, cfg.pretrain_steps)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(rng.randint(0, 2**31))
    history, start, task = [], time.time(), progress.add_task("pre-training", total=cfg.pretrain_steps)
    model.train()
    for step in range(cfg.pretrain_steps):
        batch = chunks[torch.randint(0, n_chunks, (cfg.pretrain_batch,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == cfg.pretrain_steps - 1:
            history.append({"step": step, "loss": round(loss.item(), 4)})
        progress.update(task, advance=1, description=f"pre-training loss {loss.item():.3f}")
    wall = time.time() - start
    return {"corpus_tokens": len(ids), "steps": cfg.pretrain_steps, "wall_s": round(wall, 1),
            "tokens_per_s": round(cfg.pretrain_steps * cfg.pretrain_batch * length / max(wall, 1e-9)),
            "history": history}


def fewshot_shots(train: list[dict], rng: random.Random, per_lang: int = 1) -> list[dict]:
    """k examples balanced over languages, fixed by the seed."""
    shots = []
    for lang in LANGUAGES:
        pool = [ex for ex in train if ex["lang"] == lang]
        shots += rng.sample(pool, per_lang)
    return shots


def build_tiny(cfg, train: list[dict], val: list[dict], seed: int, out: Path, catalog: Catalog) -> dict:
    import torch
    from rich.progress import Progress
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    rng = random.Random(seed)
    corpus = build_corpus(train, cfg.tiny, rng, catalog)
    train_tokenizer(corpus, cfg.tiny.vocab_size, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.tiny.hidden_size, intermediate_size=cfg.tiny.intermediate_size,
        num_hidden_layers=cfg.tiny.num_layers, num_attention_heads=cfg.tiny.num_heads,
        num_key_value_heads=cfg.tiny.num_heads, max_position_embeddings=cfg.tiny.max_seq_len, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = LlamaForCausalLM(config)
    with Progress(console=console) as progress:
        record = pretrain(model, tokenizer, corpus, cfg.tiny, rng, progress)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    record.update(kind="tiny", spec="tiny", path=str(out), vocab_size=len(tokenizer),
                  parameters=sum(p.numel() for p in model.parameters()))
    if cfg.fewshot_probe:
        shots = fewshot_shots(train, rng)
        record["fewshot_3shot_exact_match"], _ = exact_match_rate(model, tokenizer, val[: cfg.fewshot_probe], shots)
        record["fewshot_probe_examples"] = min(cfg.fewshot_probe, len(val))
    return record
