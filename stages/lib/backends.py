"""One inference interface over three back ends: transformers, GPTQ folders and GGUF files.

`backend.generate(prompts)` returns one `Completion` per prompt (raw text, token counts,
seconds), greedy, stopped once the JSON object closes or after `max_new_tokens`. Quantization
parity, evaluation and profiling all call this, so a variant is scored and timed by one code path.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from .generation import ANSWER_TOKENS


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float


def answer_text(text: str) -> str:
    """The answer as compared across back ends: up to the first closing brace, trimmed."""
    end = text.find("}")
    return (text[: end + 1] if end != -1 else text).strip()


def agreement(outputs: list[str], reference: list[str]) -> float:
    """Share of prompts whose answers are identical to the reference's."""
    same = sum(answer_text(a) == answer_text(b) for a, b in zip(outputs, reference, strict=True))
    return same / len(reference) if reference else 0.0


class TransformersBackend:
    """A causal LM in transformers (FP16/BF16 weights; CPU computes in float32)."""
    kind = "transformers"

    def __init__(self, model, tokenizer, label: str):
        self.model, self.tokenizer, self.label = model, tokenizer, label
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def load(cls, path: Path, dtype: str = "float16") -> "TransformersBackend":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        cuda = torch.cuda.is_available()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                     device_map="auto" if cuda else "cpu")
        return cls(model if cuda else model.float(), AutoTokenizer.from_pretrained(path), f"{dtype} {path}")

    def generate(self, prompts: list[str], max_new_tokens: int = ANSWER_TOKENS,
                 batch_size: int = 32) -> list[Completion]:
        import torch
        tok, results = self.tokenizer, []
        self.model.eval()
        for start in range(0, len(prompts), batch_size):
            batch = tok(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(self.model.device)
            began = time.perf_counter()
            with torch.inference_mode():
                generated = self.model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                                stop_strings=["}"], tokenizer=tok)
            seconds = (time.perf_counter() - began) / len(batch["input_ids"])  # a batch's time, shared
            new = generated[:, batch["input_ids"].shape[1]:]
            for row, mask in zip(new.tolist(), batch["attention_mask"].tolist()):
                ended = row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row)
                results.append(Completion(tok.decode(row[:ended], skip_special_tokens=True),
                                          sum(mask), ended, seconds))
        return results


class GPTQBackend(TransformersBackend):
    """A GPTQ folder loaded with gptqmodel; `kernel` names the quantized linear class it selected."""
    kind = "gptq"

    @classmethod
    def load(cls, path: Path, dtype: str = "float16") -> "GPTQBackend":
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
        import torch
        from gptqmodel import GPTQModel
        from transformers import AutoTokenizer
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
        quantized = GPTQModel.load(str(path), device=device)
        backend = cls(quantized.model, AutoTokenizer.from_pretrained(path), f"gptq {path}")
        backend.kernel = ", ".join(sorted({type(m).__name__ for m in quantized.model.modules()
                                           if hasattr(m, "qweight")}))
        return backend


class GGUFBackend:
    """A GGUF file run by llama.cpp through llama-cpp-python, one prompt at a time."""
    kind = "gguf"

    def __init__(self, path: Path, n_ctx: int = 512, n_threads: int | None = None):
        from llama_cpp import Llama
        self.label = str(path)
        self.llm = Llama(str(path), n_ctx=n_ctx, n_threads=n_threads or os.cpu_count(),
                         n_threads_batch=n_threads or os.cpu_count(), verbose=False)

    def generate(self, prompts: list[str], max_new_tokens: int = ANSWER_TOKENS) -> list[Completion]:
        llm, results = self.llm, []
        eos = llm.token_eos()
        for prompt in prompts:
            tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
            began, new = time.perf_counter(), []
            for token in llm.generate(tokens, top_k=1, temp=0.0, reset=True):
                if token == eos:
                    break
                new.append(token)
                if b"}" in llm.detokenize([token]) or len(new) >= max_new_tokens:
                    break
            text = llm.detokenize(new, prev_tokens=tokens).decode("utf-8", errors="replace")
            results.append(Completion(text, len(tokens), len(new), time.perf_counter() - began))
        return results
