"""What each fine-tuning choice costs per step on this machine: a plain PyTorch LoRA loop against the
project's loss path, one choice added at a time, on the same model and the same training examples.

Each variant loads the base afresh, takes one untimed step, then times `--steps` steps (forward, backward,
clip, AdamW) and reports s/step and training tokens/s (prompt + completion tokens, padding excluded).
Run it on an idle machine; the ratios between rows are the result (one run, same load), not the absolute rates.

    python scripts/bench_finetune.py --run artifacts/smollm2 --steps 8          # ~4 minutes on 2 cores
    python scripts/bench_finetune.py --run artifacts/smoke --steps 4 --out bench.json
    python scripts/bench_finetune.py --run artifacts/llama-1b-shape --model llama-3.2-1b-shape --device cuda --last 2
                                   # QLoRA on CUDA: bf16 LoRA vs the same on a 4-bit NF4 base (scripts/gpu-check.sh)
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.finetune import FinetuneConfig  # noqa: E402
from cart_intent import artifacts  # noqa: E402
from cart_intent.host import host_facts  # noqa: E402
from cart_intent.training import (Collate, common_prefix_len, completion_loss, encode, load_base,  # noqa: E402
                                 model_loss, timed_steps)
from cart_intent.models import base_models, weights_dir  # noqa: E402

# (label, config changes, loss path, shared prefix, batches grouped by length)
VARIANTS = [
    ("plain loop, LoRA dropout 0.15 (paper)", {"lora_dropout": 0.15}, "plain", False, False),
    ("plain loop, dropout 0", {}, "plain", False, False),
    ("completion-only logits", {}, "project", False, False),
    ("+ shared instruction prefix", {}, "project", True, False),
    ("+ batches grouped by length", {}, "project", True, True),
    ("+ 4-bit NF4 base (bitsandbytes)", {"load_in_4bit": True}, "project", True, True),
]


def batches(rows: list[dict], size: int, steps: int, grouped: bool) -> list[list[dict]]:
    sample = rows[: size * (steps + 1)]
    if grouped:  # the sampler sorts within mega-batches; here within the timed sample
        sample = sorted(sample, key=lambda r: len(r["input_ids"]))
    return [sample[i * size:(i + 1) * size] for i in range(steps + 1)]


def time_variant(path: Path, cfg: FinetuneConfig, rows: list[dict], pad_id: int, path_kind: str, shared: bool,
                 grouped: bool, steps: int, device: str) -> dict:
    """One row of the table: the same timed steps as finetune's yardstick, with this variant's pieces."""
    import torch
    torch.manual_seed(0)
    cuda = device == "cuda"
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timed = timed_steps(load_base(path, cfg, dtype, cuda), batches(rows, cfg.batch_size, steps, grouped),
                        Collate(pad_id, common_prefix_len(rows) if shared else 0),
                        model_loss if path_kind == "plain" else completion_loss, cfg.learning_rate, cfg.max_grad_norm)
    row = {"s_per_step": timed["s_per_step"], "tokens_per_s": timed["tokens_per_s"],
           "compute_dtype": str(dtype).replace("torch.", "")}
    if cuda:
        row["peak_vram_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return row


def main() -> int:
    from transformers import AutoTokenizer
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="artifacts/smollm2", help="a run folder after `make base`")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--out", help="also write the rows here as JSON")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: the compute dtype finetune uses there (bf16 where supported)")
    parser.add_argument("--model", help="a model folder under base/ (default: the first that is not a shape twin)")
    parser.add_argument("--last", type=int, default=len(VARIANTS), help="time only the last N rows of the table")
    args = parser.parse_args()
    run_dir = Path(args.run)
    models = base_models(run_dir)
    if args.model and args.model not in models:
        parser.error(f"--model {args.model}: not under {run_dir / 'base'} (there: {', '.join(models)})")
    if not 1 <= args.last <= len(VARIANTS):
        parser.error(f"--last must be 1 to {len(VARIANTS)}")
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    record = models[args.model] if args.model else next(r for r in models.values() if r["kind"] != "shape")
    path = weights_dir(record)
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = encode(tokenizer, artifacts.read_jsonl(run_dir / "data" / "train.jsonl"), 512)
    base_cfg = FinetuneConfig(load_in_4bit=False, gradient_checkpointing=False, lora_dropout=0.0, batch_size=8,
                              learning_rate=1e-3)
    results = []
    for label, changes, path_kind, shared, grouped in VARIANTS[-args.last:]:
        row = {"variant": label, **time_variant(path, replace(base_cfg, **changes), rows, pad_id, path_kind, shared,
                                                 grouped, args.steps, args.device)}
        results.append(row)
        print(json.dumps(row), flush=True)
    # the yardstick: the textbook loop with the same LoRA settings as the default run, else the first row timed
    yardstick = results[1] if args.last == len(VARIANTS) else results[0]
    for row in results:
        row["vs_yardstick"] = round(row["tokens_per_s"] / yardstick["tokens_per_s"], 2)
    summary = {"model": record["spec"], "device": args.device, "batch_size": 8, "steps": args.steps,
               "yardstick": yardstick["variant"], "rows": results, "host": host_facts()}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
