"""Greedy batched generation with transformers models (left padding), and the few-shot scorer.

Used by the fine-tuning callback, the merge parity check and the base model's few-shot probe. Evaluation,
quantization parity and profiling go through cart_intent/backends.py instead, whose transformers back end
also times each batch and shares the constrained decoder with the GGUF back end.
"""
from __future__ import annotations

from .task import ANSWER_TOKENS, build_prompt, exact_match, parse_output


def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int = ANSWER_TOKENS,
                    batch_size: int = 32, on_done=None) -> list[str]:
    """Greedy continuations of prompts, decoded without special tokens. Stops at EOS or a closed object.
    on_done(n) after each batch of n (progress). torch is imported here: importing this module stays instant."""
    import torch
    with torch.inference_mode():
        return _greedy(model, tokenizer, prompts, max_new_tokens, batch_size, on_done)


def _greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, on_done) -> list[str]:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        generated = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                   stop_strings=["}"], tokenizer=tokenizer)
        new_tokens = generated[:, batch["input_ids"].shape[1]:]
        outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        if on_done:
            on_done(len(new_tokens))
    model.train(was_training)
    return outputs


def exact_match_rate(model, tokenizer, examples: list[dict], shots: list[dict] = (),
                     batch_size: int = 32, on_done=None) -> tuple[float, list[str]]:
    """Share of examples whose greedy answer exactly matches; also the raw outputs."""
    if not examples:
        return 0.0, []
    prompts = [build_prompt(ex["text"], shots) for ex in examples]
    outputs = greedy_generate(model, tokenizer, prompts, batch_size=batch_size, on_done=on_done)
    hits = sum(exact_match(parse_output(out), ex) for out, ex in zip(outputs, examples))
    return hits / len(examples), outputs
