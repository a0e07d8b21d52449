"""One inference interface over three back ends: transformers, GPTQ folders and GGUF files.

`backend.generate(prompts)` returns one `Completion` per prompt (raw text, token counts, model
calls, seconds), greedy, stopped once the JSON object closes or after `max_new_tokens`;
`generate(prompts, constrained=True, products=...)` decodes only valid answers (over a run's catalog) with jump-forward
(stages/lib/constrained.py). Quantization parity, evaluation and profiling all call this, so a
variant is scored and timed by one code path.
"""
from __future__ import annotations

import functools
import os
import time
from pathlib import Path

from . import constrained as schema_decoding
from . import llama_internals
from .catalog import load_catalog
from .task import ANSWER_TOKENS, Completion


@functools.lru_cache(maxsize=4)
def answer_schema(products: tuple[str, ...]) -> schema_decoding.AnswerSchema:
    """The valid answers over a catalog's products (built once per catalog: 96 k strings for 48 products)."""
    return schema_decoding.AnswerSchema(list(products))


def constrained_generate(backend, prompts: list[str], products: list[str], on_done=None) -> list[Completion]:
    """Schema-constrained greedy answers, one prompt at a time, through the back end's stepper."""
    stepper, schema, results = backend.stepper(), answer_schema(tuple(products)), []
    for prompt in prompts:
        began = time.perf_counter()
        result = schema_decoding.decode(stepper, backend.vocabulary(), schema, prompt)
        prompt_ids = stepper.tokenize(prompt)
        new_tokens = len(stepper.tokenize(prompt + result.text)) - len(prompt_ids)
        results.append(Completion(result.text, len(prompt_ids), new_tokens, time.perf_counter() - began,
                                  result.model_calls))
        if on_done:
            on_done(1)
    return results


def default_products() -> list[str]:
    """The shipped catalog's products, for callers that name no run."""
    return load_catalog().names


def answer_text(text: str) -> str:
    """The answer as compared across back ends: up to the first closing brace, trimmed."""
    end = text.find("}")
    return (text[: end + 1] if end != -1 else text).strip()


def agreement(outputs: list[str], reference: list[str]) -> float:
    """Share of prompts whose answers are identical to the reference's."""
    same = sum(answer_text(a) == answer_text(b) for a, b in zip(outputs, reference, strict=True))
    return same / len(reference) if reference else 0.0


class TransformersBackend:
    """A causal LM in transformers (FP16 weights; CPU computes in float32)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def load(cls, path: Path) -> "TransformersBackend":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        cuda = torch.cuda.is_available()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, device_map="auto" if cuda else "cpu")
        return cls(model if cuda else model.float(), AutoTokenizer.from_pretrained(path))

    def vocabulary(self) -> schema_decoding.Vocabulary:
        if not hasattr(self, "_vocabulary"):
            tok = self.tokenizer
            anchor = tok("a", add_special_tokens=False)["input_ids"][-1]  # decode in context keeps leading spaces
            base = tok.decode([anchor])
            texts = tok.batch_decode([[anchor, t] for t in range(len(tok))], skip_special_tokens=True)
            self._vocabulary = schema_decoding.Vocabulary([s[len(base):] if s.startswith(base) else ""
                                                           for s in texts])
        return self._vocabulary

    def stepper(self) -> "_TransformersStepper":
        return _TransformersStepper(self.model, self.tokenizer)

    def generate(self, prompts: list[str], max_new_tokens: int = ANSWER_TOKENS, batch_size: int = 32,
                 constrained: bool = False, products: list[str] | None = None, on_done=None) -> list[Completion]:
        """on_done(n) after every n answers (progress)."""
        import torch
        if constrained:
            return constrained_generate(self, prompts, products or default_products(), on_done)
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
                                          sum(mask), ended, seconds, ended))
            if on_done:
                on_done(len(batch["input_ids"]))
        return results


class _TransformersStepper(schema_decoding.Stepper):
    """Next-token logits for a token sequence, reusing the KV cache of the longest common prefix."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer, self.ids, self.cache = model, tokenizer, [], None

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def logits(self, ids: list[int]):
        import torch
        keep = min(schema_decoding.common_prefix(self.ids, ids), len(ids) - 1)
        if keep == 0:
            self.cache = None
        elif keep < len(self.ids):
            self.cache.crop(keep - len(self.ids))  # transformers 5: a negative count of tokens to drop
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids[keep:]], device=self.model.device),
                             past_key_values=self.cache, use_cache=True)
        self.cache, self.ids = out.past_key_values, list(ids)
        return out.logits[0, -1].float().cpu().numpy()


class GPTQBackend(TransformersBackend):
    """A GPTQ folder loaded with gptqmodel; `kernel` names the quantized linear class it selected."""

    @classmethod
    def load(cls, path: Path) -> "GPTQBackend":
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
        import torch
        from gptqmodel import GPTQModel
        from transformers import AutoTokenizer
        cuda = torch.cuda.is_available()
        # CPU: float32 activations, as for the FP16 models; gptqmodel's bfloat16 default there makes
        # batched and incremental decoding disagree on close calls
        quantized = GPTQModel.load(str(path), device="cuda:0" if cuda else "cpu",
                                   dtype=torch.float16 if cuda else torch.float32)
        backend = cls(quantized.model, AutoTokenizer.from_pretrained(path))
        backend.kernel = ", ".join(sorted({type(m).__name__ for m in quantized.model.modules()
                                           if hasattr(m, "qweight")}))
        return backend


class GGUFBackend:
    """A GGUF file run by llama.cpp through llama-cpp-python, one prompt at a time."""

    def __init__(self, path: Path, n_ctx: int = 512, n_threads: int | None = None):
        from llama_cpp import Llama
        self.llm = Llama(str(path), n_ctx=n_ctx, n_threads=n_threads or os.cpu_count(),
                         n_threads_batch=n_threads or os.cpu_count(), verbose=False)

    @classmethod
    def wrapping(cls, llm) -> "GGUFBackend":
        """The back end over an already loaded llama_cpp.Llama (the server's own)."""
        backend = cls.__new__(cls)
        backend.llm = llm
        return backend

    def vocabulary(self) -> schema_decoding.Vocabulary:
        if not hasattr(self, "_vocabulary"):
            import ctypes
            import llama_cpp
            vocab, buffer, pieces = llama_internals.vocab(self.llm), ctypes.create_string_buffer(256), []
            for token in range(self.llm.n_vocab()):
                n = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, False)
                pieces.append(buffer.raw[:n].decode("utf-8", errors="replace") if n > 0 else "")
            self._vocabulary = schema_decoding.Vocabulary(pieces)
        return self._vocabulary

    def close(self) -> None:
        self.llm.close()

    def stepper(self) -> "_LlamaStepper":
        return _LlamaStepper(self.llm)

    def generate(self, prompts: list[str], max_new_tokens: int = ANSWER_TOKENS,
                 constrained: bool = False, products: list[str] | None = None, on_done=None) -> list[Completion]:
        """on_done(1) after every answer (progress)."""
        if constrained:
            return constrained_generate(self, prompts, products or default_products(), on_done)
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
            results.append(Completion(text, len(tokens), len(new), time.perf_counter() - began, len(new)))
            if on_done:
                on_done(1)
        return results


class _LlamaStepper(schema_decoding.Stepper):
    """llama.cpp's logits for the last token, keeping the KV cache of the longest common prefix."""

    def __init__(self, llm):
        self.llm = llm

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def logits(self, ids: list[int]):
        llm = self.llm
        llm.n_tokens = min(schema_decoding.common_prefix(llm.input_ids[: llm.n_tokens].tolist(), ids), len(ids) - 1)
        llm.eval(ids[llm.n_tokens:])
        return llama_internals.last_logits(llm).copy()
