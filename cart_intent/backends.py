"""One inference interface over four back ends: transformers, GPTQ folders, GGUF files in this process, and GGUF
files served by a running llama-server (its slots decode several sequences at once).

`backend.generate(prompts)` returns one `Completion` per prompt (raw text, token counts, model
calls, seconds), greedy, stopped once the JSON object closes or after `max_new_tokens`;
`generate(prompts, constrained=True, products=...)` decodes only valid answers (over a run's catalog) with jump-forward
(cart_intent/constrained.py). Quantization parity, evaluation and profiling all call this, so a
variant is scored and timed by one code path.
"""
from __future__ import annotations

import functools
import http.client
import json
import math
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
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
    stepper, results = backend.stepper(), []
    for prompt in prompts:
        results.append(constrained_answer(stepper, backend.vocabulary(), prompt, products))
        if on_done:
            on_done(1)
    return results


def constrained_answer(stepper, vocabulary, prompt: str, products: list[str]) -> Completion:
    """One schema-constrained greedy answer, its model decisions made by the stepper."""
    began = time.perf_counter()
    schema = answer_schema(tuple(products))
    result = schema_decoding.decode(stepper, vocabulary, schema, prompt)
    prompt_ids = stepper.tokenize(prompt)
    new_tokens = len(stepper.tokenize(prompt + result.text)) - len(prompt_ids)
    return Completion(result.text, len(prompt_ids), new_tokens, time.perf_counter() - began, result.model_calls,
                      confidence=schema_decoding.confidence(result, vocabulary, schema))


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


class ServerFailed(Exception):
    """llama-server answered a model call badly, or not at all."""


class Cancelled(Exception):
    """The caller gave up (a client hung up): no more decisions for its answer; its slot goes back to the pool."""


class LlamaServerBackend:
    """A GGUF file served by a running llama-server on 127.0.0.1:port: every model decision is one `/completion`
    call on a slot, which keeps the KV cache of the sequence so far (only new tokens are computed, batched with
    the other slots' work). `slots` answers run at once, from as many threads; the rest wait for a free slot.
    Tokens and the vocabulary come from the GGUF's vocabulary alone (no weights loaded in this process)."""

    def __init__(self, path: Path, port: int, slots: int, prompt_cache: bool = True):
        from llama_cpp import Llama
        self.vocab = GGUFBackend.wrapping(Llama(str(path), vocab_only=True, verbose=False))
        self.tokenize, self.prompt_cache, self.slots = self.vocab.stepper().tokenize, prompt_cache, slots
        self.free: queue.Queue = queue.Queue()
        for slot in range(slots):
            self.free.put((slot, http.client.HTTPConnection("127.0.0.1", port, timeout=300)))

    def vocabulary(self) -> schema_decoding.Vocabulary:
        return self.vocab.vocabulary()

    @contextmanager
    def stepper(self, cancelled: threading.Event | None = None):
        """A stepper holding one slot (and its connection) until the block ends."""
        slot, connection = self.free.get()
        try:
            yield _SlotStepper(self, slot, connection, cancelled or threading.Event())
        finally:
            self.free.put((slot, connection))

    def generate(self, prompts: list[str], max_new_tokens: int = ANSWER_TOKENS, constrained: bool = False,
                 products: list[str] | None = None, on_done=None,
                 cancelled: threading.Event | None = None) -> list[Completion]:
        """Answers in the prompts' order, decoded on every slot at once (one thread per slot, each taking the next
        prompt); `cancelled` set stops before the next model call with Cancelled."""
        products, vocabulary = products or default_products(), self.vocabulary()   # built before the threads

        def answer(prompt: str) -> Completion:
            with self.stepper(cancelled) as stepper:
                result = (constrained_answer(stepper, vocabulary, prompt, products) if constrained
                          else stepper.free_answer(prompt, max_new_tokens))
            if on_done:
                on_done(1)
            return result

        if len(prompts) <= 1:
            return [answer(prompt) for prompt in prompts]
        with ThreadPoolExecutor(self.slots) as pool:
            return list(pool.map(answer, prompts))


class _SlotStepper(schema_decoding.Stepper):
    """The model decisions of one answer, made by llama-server on one slot: the sequence so far as tokens, one
    greedy token among the allowed ones (each gets a +100 logit bias: their order is the model's, and no other
    token can win; the reply is checked)."""
    BIAS = 100.0

    def __init__(self, backend: LlamaServerBackend, slot: int, connection, cancelled: threading.Event):
        self.backend, self.slot, self.connection, self.cancelled = backend, slot, connection, cancelled
        self.tokenize = backend.tokenize

    def choose(self, ids: list[int], allowed: list[int]) -> schema_decoding.Choice:
        """The server's greedy pick among the allowed tokens, with the model's probabilities before the bias (its
        n_probs: the chosen token's and the TOP_K likeliest over the whole vocabulary)."""
        reply = self.completion({"prompt": ids, "n_predict": 1, "return_tokens": True, "n_probs": schema_decoding.TOP_K,
                                 "logit_bias": [[token, self.BIAS] for token in allowed]})
        token = reply["tokens"][0]
        if token not in allowed:
            raise ServerFailed(f"llama-server chose token {token}, outside the {len(allowed)} allowed")
        [step] = reply["completion_probabilities"]
        permitted = set(allowed) - {token}
        others = [(math.exp(top["logprob"]), top["id"]) for top in step["top_logprobs"] if top["id"] in permitted]
        runner_up = max(others, default=(0.0, None))
        return schema_decoding.Choice(token, math.exp(step["logprob"]), runner_up[1], runner_up[0])

    def free_answer(self, prompt: str, max_new_tokens: int) -> Completion:
        """Greedy text until the JSON object closes, as GGUFBackend.generate decodes it."""
        began, ids = time.perf_counter(), self.tokenize(prompt)
        reply = self.completion({"prompt": ids, "n_predict": max_new_tokens, "stop": ["}"]})
        text = reply["content"] + ("}" if reply.get("stop_type") == "word" else "")
        return Completion(text, len(ids), int(reply["tokens_predicted"]), time.perf_counter() - began,
                          int(reply["tokens_predicted"]))

    def completion(self, request: dict) -> dict:
        if self.cancelled.is_set():
            raise Cancelled
        body = json.dumps({**request, "temperature": 0.0, "id_slot": self.slot,
                           "cache_prompt": self.backend.prompt_cache})
        for attempt in (1, 2):   # a kept-alive connection llama-server closed while idle: once more, anew
            try:
                self.connection.request("POST", "/completion", body, {"Content-Type": "application/json"})
                reply = self.connection.getresponse()
                data = reply.read()
                break
            except (OSError, http.client.HTTPException) as err:
                self.connection.close()   # the next request opens a new connection
                if attempt == 2 or not isinstance(err, (ConnectionError, http.client.RemoteDisconnected)):
                    raise ServerFailed(f"llama-server did not answer ({type(err).__name__}: {err})") from None
        if reply.status != 200:
            raise ServerFailed(f"llama-server answered {reply.status}: {data[:300].decode(errors='replace')}")
        return json.loads(data)
