"""profile-cpu: what each GGUF variant costs on this CPU (llama.cpp), one fresh process per variant.

Per variant: load time (first load in its process), a warm-up, then `requests` requests built from
test prompts, each timed phase by phase: prompt processing, time to first token, decode, end to end.
Three modes side by side: `naive` (the whole prompt every time, as the paper ran it), `prefix_cached`
(the instruction's KV state kept, only the message processed; outputs must be identical to naive) and
`prefix_cached_constrained` (plus the schema-constrained decoder with jump-forward). Fine-tuned models
answer for real; a shape twin (random weights) generates a fixed number of tokens, the test split's
median answer length, with EOS disabled, so its runs compare. Also per variant, in the same process: a
plain llama-cpp-python completion (100-token prompt, 32 new tokens) timed by llama.cpp's own counters,
the yardstick for the harness's overhead. Once per host: a memory-bandwidth benchmark; each variant's
decode rate times the weight bytes it reads per token is shown as a share of it (batch-1 decoding is
bandwidth-bound, so this is the distance to the physical limit).

    python -m stages.profile_cpu --config configs/tiny.toml
    python -m stages.profile_cpu --config configs/smoke.toml --set profile_cpu.requests=10

Writes artifacts/<run>/profiles/<host-id>/cpu/: results.json (one row per model, variant and mode),
fingerprint.json (the host), requests/<slug>__<variant>.jsonl (every timed request).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.text import Text

from cart_intent import artifacts, cli, hardware, registry
from cart_intent.backends import GGUFBackend, answer_schema
from cart_intent.catalog import run_catalog
from cart_intent.config import as_dict, require
from cart_intent.constrained import Stepper, common_prefix, decode
from cart_intent.llama_cpp_tools import weights_read_per_token
from cart_intent.llama_internals import context, last_logits
from cart_intent.records import CpuRow, checked
from cart_intent.task import ANSWER_TOKENS, build_prompt, median_answer_tokens, read_split

PACKAGES = ["llama-cpp-python", "numpy", "psutil"]
MODES = ("naive", "prefix_cached", "prefix_cached_constrained")


@dataclass
class ProfileCPUConfig:
    types: list[str] = field(default_factory=lambda: ["F16", "Q5_K_M", "Q4_K_M", "Q3_K_M"])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    requests: int = 100               # timed requests per variant and mode (test prompts, cycled if fewer)
    warmup: int = 3                   # untimed requests before each mode
    threads: int = 0                  # llama.cpp threads; 0: every usable core
    n_ctx: int = 512
    bandwidth_mib: int = 1024         # streaming-read buffer, far beyond any cache
    reference_prompt_tokens: int = 100
    reference_new_tokens: int = 32
    timeout_s: int = 3600             # per variant process

    def validate(self) -> None:
        require(self.types and len(set(self.types)) == len(self.types), "types",
                'distinct GGUF types built by the gguf stage, e.g. ["F16", "Q4_K_M"]')
        require(self.modes and set(self.modes) <= set(MODES), "modes", f"some of {', '.join(MODES)}")
        require(self.requests >= 1 and self.warmup >= 0, "requests", "requests >= 1 and warmup >= 0")
        require(self.threads >= 0 and self.n_ctx >= 128, "threads", "threads >= 0 and n_ctx >= 128")
        require(self.bandwidth_mib >= 64, "bandwidth_mib", "an integer >= 64 (MiB)")
        require(self.reference_prompt_tokens >= 1 and self.reference_new_tokens >= 2, "reference_new_tokens",
                "reference_prompt_tokens >= 1 and reference_new_tokens >= 2")
        require(self.timeout_s >= 10, "timeout_s", "seconds >= 10")


# ---- the worker: one variant, in its own process ----------------------------------------------------------

def _free_request(llm, tokens: list[int], keep: int, fixed: int, max_tokens: int) -> dict:
    """Greedy answer with per-phase times; `keep` tokens of KV state are reused, `fixed` > 0 forces a length."""
    import numpy as np
    eos = llm.token_eos()

    def next_token() -> int:
        logits = last_logits(llm)
        if fixed:
            logits = logits.copy()
            logits[eos] = -np.inf
        return int(np.argmax(logits))

    began = time.perf_counter()
    llm.n_tokens = keep
    llm.eval(tokens[keep:])
    prompt_done = time.perf_counter()
    new = [next_token()]
    first = time.perf_counter()
    while len(new) < (fixed or max_tokens) and (fixed or (new[-1] != eos and b"}" not in llm.detokenize(new[-1:]))):
        llm.eval(new[-1:])
        new.append(next_token())
    ended = time.perf_counter()
    if not fixed and new[-1] == eos:
        new.pop()
    return {"prompt_tokens": len(tokens), "processed_tokens": len(tokens) - keep, "generated_tokens": len(new),
            "prompt_s": prompt_done - began, "ttft_s": first - began, "decode_s": ended - first,
            "latency_s": ended - began, "output": llm.detokenize(new).decode("utf-8", errors="replace")}


class _TimedStepper(Stepper):
    """The constrained decoder's stepper, timing each model call (the first one processes the prompt)."""

    def __init__(self, stepper):
        self.stepper, self.calls = stepper, []

    def tokenize(self, text: str) -> list[int]:
        return self.stepper.tokenize(text)

    def logits(self, ids: list[int]):
        began = time.perf_counter()
        out = self.stepper.logits(ids)
        self.calls.append(time.perf_counter() - began)
        return out


def _constrained_request(backend, stepper, prompt: str, products: list[str]) -> dict:
    llm, tokens = backend.llm, stepper.tokenize(prompt)
    keep = min(common_prefix(llm.input_ids[: llm.n_tokens].tolist(), tokens), len(tokens) - 1)
    stepper.calls = []
    began = time.perf_counter()
    result = decode(stepper, backend.vocabulary(), answer_schema(tuple(products)), prompt)
    latency = time.perf_counter() - began
    generated = len(stepper.tokenize(prompt + result.text)) - len(tokens)
    return {"prompt_tokens": len(tokens), "processed_tokens": len(tokens) - keep, "generated_tokens": generated,
            "prompt_s": stepper.calls[0], "ttft_s": stepper.calls[0], "decode_s": latency - stepper.calls[0],
            "latency_s": latency, "model_calls": result.model_calls, "output": result.text}


def _summary(requests: list[dict]) -> dict:
    latencies = [r["latency_s"] for r in requests]
    decode_steps = sum(max(r["generated_tokens"] - 1, 0) for r in requests)
    return {"requests": len(requests),
            "prompt_tokens_mean": round(statistics.mean(r["prompt_tokens"] for r in requests), 1),
            "processed_tokens_mean": round(statistics.mean(r["processed_tokens"] for r in requests), 1),
            "generated_tokens_mean": round(statistics.mean(r["generated_tokens"] for r in requests), 2),
            "prompt_tok_s": round(sum(r["processed_tokens"] for r in requests) / sum(r["prompt_s"] for r in requests), 2),
            "decode_tok_s": round(decode_steps / max(sum(r["decode_s"] for r in requests), 1e-9), 2),
            "decode_tok_s_median": round(statistics.median((r["generated_tokens"] - 1) / r["decode_s"]
                                                           for r in requests if r["generated_tokens"] > 1 and r["decode_s"] > 0) if decode_steps else 0, 2),
            "e2e_tok_s": round(sum(r["generated_tokens"] for r in requests) / sum(latencies), 2),
            "ttft_mean_s": round(statistics.mean(r["ttft_s"] for r in requests), 4),
            "latency_mean_s": round(statistics.mean(latencies), 4),
            "latency_p50_s": round(hardware.percentile(latencies, 50), 4),
            "latency_p95_s": round(hardware.percentile(latencies, 95), 4)}


def _plain_reference(llm, prompt_tokens: list[int], new_tokens: int, repeats: int = 5) -> dict:
    """llama-cpp-python's own streaming completion, timed from outside the way the harness times itself
    (decode = tokens after the first over the time after the first; the median run), and llama.cpp's perf
    counters (compute only, no Python) for the same call."""
    import llama_cpp
    runs = []
    for _ in range(repeats):
        llm.reset()
        llama_cpp.llama_perf_context_reset(context(llm))
        stamps = [time.perf_counter() for _ in llm.create_completion(
            prompt_tokens, max_tokens=new_tokens, temperature=0.0, logit_bias={llm.token_eos(): -1e9}, stream=True)]
        runs.append(((len(stamps) - 1) / (stamps[-1] - stamps[0]), llama_cpp.llama_perf_context(context(llm))))
    rate, counters = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
    # llama-bench's view of the same repeats: pp<prompt tokens> and tg<new tokens>, t/s mean and std
    pp = [c.n_p_eval / c.t_p_eval_ms * 1000 for _, c in runs]
    tg = [c.n_eval / c.t_eval_ms * 1000 for _, c in runs]
    return {"prompt_tokens": len(prompt_tokens), "new_tokens": new_tokens, "decode_tok_s": round(rate, 2),
            "counters_prompt_tok_s": round(counters.n_p_eval / counters.t_p_eval_ms * 1000, 2),
            "counters_decode_tok_s": round(counters.n_eval / counters.t_eval_ms * 1000, 2), "repeats": repeats,
            "pp_tok_s_mean": round(statistics.mean(pp), 2), "pp_tok_s_std": round(statistics.pstdev(pp), 2),
            "tg_tok_s_mean": round(statistics.mean(tg), 2), "tg_tok_s_std": round(statistics.pstdev(tg), 2)}


def worker(spec_file: Path) -> int:
    """Profile one GGUF file as `spec` describes; write the result JSON next to it."""
    spec = json.loads(spec_file.read_text())
    with hardware.PeakRSS() as memory:
        rss_before = memory.now()
        began = time.perf_counter()
        backend = GGUFBackend(Path(spec["path"]), n_ctx=spec["n_ctx"], n_threads=spec["threads"])
        load_s = time.perf_counter() - began
        rss_loaded = memory.now()
        llm, prompts = backend.llm, spec["prompts"]
        token_lists = [llm.tokenize(p.encode("utf-8"), add_bos=True, special=False) for p in prompts]
        shared = min(min(common_prefix(token_lists[0], t) for t in token_lists), min(map(len, token_lists)) - 1)
        reference = [t for tokens in token_lists for t in tokens][: spec["reference_prompt_tokens"]]
        plain = _plain_reference(llm, reference, spec["reference_new_tokens"])
        rows, outputs, timed = {}, {}, []
        for mode in spec["modes"]:
            if mode == "prefix_cached_constrained":
                backend.vocabulary()  # built once, before timing
                stepper = _TimedStepper(backend.stepper())
                one = lambda i: _constrained_request(backend, stepper, prompts[i], spec["products"])  # noqa: E731
            else:
                keep = shared if mode == "prefix_cached" else 0
                llm.reset()
                if keep:
                    llm.eval(token_lists[0][:keep])  # the instruction, processed once for every request
                one = lambda i, keep=keep: _free_request(llm, token_lists[i], keep, spec["fixed_tokens"],  # noqa: E731
                                                         spec["max_tokens"])
            for i in range(spec["warmup"]):
                one(i % len(prompts))
            requests = []
            with cli.progress(f"{Path(spec['path']).name} {mode}", len(prompts)) as advance:
                for i in range(len(prompts)):
                    requests.append({"mode": mode, "index": i, **one(i)})
                    advance()
            timed += requests
            outputs[mode] = [r["output"] for r in requests]
            rows[mode] = _summary(requests)
            if mode == "prefix_cached_constrained":
                rows[mode]["model_calls_mean"] = round(statistics.mean(r["model_calls"] for r in requests), 2)
            if mode != "naive" and "naive" in outputs:
                same = sum(a == b for a, b in zip(outputs[mode], outputs["naive"]))
                rows[mode]["identical_to_naive"] = round(same / len(prompts), 4)
        backend.close()
    result = {"load_s": round(load_s, 4), "threads": spec["threads"], "shared_prefix_tokens": shared,
              "rss_before_load_bytes": rss_before, "rss_after_load_bytes": rss_loaded, **memory.result(),
              "modes": rows, "plain_llama_cpp": plain}
    artifacts.write_json(Path(spec["result"]), result)
    artifacts.write_jsonl(Path(spec["requests_file"]), timed)
    return 0


# ---- the stage ---------------------------------------------------------------------------------------------

def median_answer_tokens_gguf(gguf_file: Path, examples: list[dict]) -> int:
    """The test split's median answer length in this model's tokens (the shape twin's fixed length)."""
    from llama_cpp import Llama
    llm = Llama(str(gguf_file), vocab_only=True, verbose=False)
    return median_answer_tokens(examples, lambda text: len(llm.tokenize(text.encode(), add_bos=False)))


def variant_rows(slug: str, type_name: str, model: dict, path: Path, fixed: int, result: dict,
                 bandwidth: dict) -> list[dict]:
    """One row per decoding mode of one variant's worker result, with its share of the memory bandwidth."""
    weights = weights_read_per_token(path)
    naive = result["modes"].get("naive") or next(iter(result["modes"].values()))
    rows = []
    for mode, summary in result["modes"].items():
        row = {"model": slug, "variant": type_name, "mode": mode, "source": model["source"],
               "file_bytes": path.stat().st_size, "fixed_tokens": fixed,
               **{k: v for k, v in result.items() if k not in ("modes", "plain_llama_cpp")}, **summary,
               "weights_read_per_token_bytes": weights["bytes_per_token"],
               "latency_vs_naive": round(summary["latency_mean_s"] / naive["latency_mean_s"], 4)}
        row["bandwidth_share"] = round(summary["decode_tok_s"] * weights["bytes_per_token"]
                                       / (bandwidth["read_gb_s"] * 1e9), 4)
        if mode == "naive":
            row["plain_llama_cpp"] = result["plain_llama_cpp"]
            # medians on both sides: one slow request on a shared machine must not decide the verdict
            row["decode_vs_plain"] = round(summary["decode_tok_s_median"] / result["plain_llama_cpp"]["decode_tok_s"], 4)
        rows.append(checked(CpuRow, row))
    return rows


def show(rows: list[dict], host: str, threads: int, bandwidth: dict) -> None:
    """The summary table on the console (results.json has every number)."""
    display = {f"{r['model']} {r.get('variant', '')} {r.get('mode', '')}": r if "skipped" in r else {
        "load s": r["load_s"], "prompt tok/s": r["prompt_tok_s"], "decode tok/s": r["decode_tok_s"],
        "e2e tok/s": r["e2e_tok_s"], "mean s": r["latency_mean_s"], "p95 s": r["latency_p95_s"],
        "vs naive": r["latency_vs_naive"], "peak RSS MB": round(r["peak_rss_bytes"] / 1e6),
        "of bandwidth": f"{r['bandwidth_share']:.0%}", "vs plain": r.get("decode_vs_plain", "")} for r in rows}
    cli.show_results(f"CPU profile on {host} ({threads} threads, {bandwidth['read_gb_s']} GB/s read)", display,
                     ["load s", "prompt tok/s", "decode tok/s", "e2e tok/s", "mean s", "p95 s", "vs naive",
                      "peak RSS MB", "of bandwidth", "vs plain"])


def run(run_cfg, cfg: ProfileCPUConfig, args) -> int:
    run_dir = run_cfg.run_dir
    manifests = registry.upstream(run_dir, "profile_cpu")
    facts = hardware.fingerprint()
    host = hardware.host_id(facts)
    stage = artifacts.StageRun("profile-cpu", f"profiles/{host}/cpu", run_dir, as_dict(cfg),
                               artifacts.input_fingerprint(manifests), artifacts.code_hash(__file__), PACKAGES)
    if cli.already_done(stage, args):
        return 0
    import llama_cpp
    test = read_split(run_dir, "test")
    prompts = [build_prompt(test[i % len(test)]["text"]) for i in range(cfg.requests)]
    products = run_catalog(run_dir).names
    threads = cfg.threads or len(os.sched_getaffinity(0))
    out = stage.fresh_tmp()
    (out / "requests").mkdir()
    cli.console.print(f"host {host}: measuring memory bandwidth ({cfg.bandwidth_mib} MiB, {threads} threads)")
    bandwidth = hardware.memory_bandwidth(cfg.bandwidth_mib, threads)
    rows = []
    for slug, model in manifests["gguf"]["results"]["models"].items():
        if "variants" not in model:
            rows.append(checked(CpuRow, {"model": slug, "skipped": model.get("skipped", "no GGUF files")}))
            continue
        for type_name in cfg.types:
            if type_name not in model["variants"]:
                rows.append(checked(CpuRow, {"model": slug, "variant": type_name,
                                             "skipped": f"not built: add {type_name} to [gguf] types"}))
                continue
            path = run_dir / "gguf" / slug / model["variants"][type_name]["file"]
            fixed = median_answer_tokens_gguf(path, test) if model["source"] == "shape" else 0
            cli.console.rule(f"{slug} {type_name}" + (f" (shape twin: {fixed} tokens, EOS off)" if fixed else ""))
            name = f"{slug}__{type_name}"
            spec = {"path": str(path), "prompts": prompts, "modes": cfg.modes, "warmup": cfg.warmup, "threads": threads,
                    "n_ctx": cfg.n_ctx, "fixed_tokens": fixed, "max_tokens": ANSWER_TOKENS, "result": str(out / f"{name}.json"),
                    "requests_file": str(out / "requests" / f"{name}.jsonl"),
                    "reference_prompt_tokens": cfg.reference_prompt_tokens,
                    "reference_new_tokens": cfg.reference_new_tokens, "products": products}
            try:
                result = hardware.run_worker("stages.profile_cpu", spec, cfg.timeout_s)
            except RuntimeError as err:
                cli.console.print(Text.assemble(("profile-cpu failed ", "red"), str(err)))
                return 1
            rows += variant_rows(slug, type_name, model, path, fixed, result, bandwidth)
    fingerprint = {**facts, "host_id": host, "llama_cpp_python": llama_cpp.__version__,
                   "llama_cpp_commit": manifests["gguf"]["results"].get("llama_cpp_commit"),
                   "llama_cpp_cpu_features": llama_cpp.llama_print_system_info().decode().strip()}
    artifacts.write_json(out / "fingerprint.json", fingerprint)
    artifacts.write_json(out / "results.json", {"host": host, "bandwidth": bandwidth, "rows": rows})
    stage.results.update(host=host, fingerprint=fingerprint, bandwidth=bandwidth, rows=rows)
    stage.publish()
    show(rows, host, threads, bandwidth)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"] and len(argv) == 2:
        return worker(Path(argv[1]))
    return cli.run_stage(__doc__, "profile_cpu", ProfileCPUConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
