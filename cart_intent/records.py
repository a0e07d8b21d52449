"""The rows a stage writes into its results.json and the report and compare read: one declaration each.

The writing stage passes every row through `checked` before writing, the reader reads through `read_rows`, and the
test fixtures build their rows through `checked` too, so a renamed or dropped field fails a test instead of
breaking a real report. A row is a plain dict (JSON as written); the TypedDicts say which keys it must and may hold
(no `from __future__ import annotations` here: TypedDict reads NotRequired from evaluated annotations).
"""
from pathlib import Path
from typing import NotRequired, TypedDict

from .artifacts import MissingArtifact, read_json


class Scores(TypedDict):
    """Every metric of one variant over its predictions (metrics.summarize)."""
    n: int
    exact_match: float
    exact_match_ci95: list[float]
    json_valid: float
    field_accuracy: dict[str, float]
    by_language: dict[str, dict]
    by_noise: dict[str, dict]
    by_quantity: dict[str, dict]
    top_confusions: list
    scope: dict                         # the none-form: out-of-scope turned away, in-scope wrongly turned away
    calibration: dict | None            # constrained decoding's confidence: ECE, reliability bins, risk-coverage


class EvalRow(Scores):
    """One variant and decoding of `evaluate` (eval/results.json, eval-<set>/results.json)."""
    variant: str                        # <model slug>/<fp16 | gptq | gguf-<type>>
    model: str
    backend: str
    decoding: str                       # free | constrained
    kernel: str | None
    examples_per_s: float
    wall_s: float
    generated_tokens_per_answer: float
    model_calls_per_answer: float | None
    mcnemar_vs_fp16: dict
    batch1_examples_per_s: NotRequired[float]
    batch1_identical: NotRequired[bool]
    batched_speedup: NotRequired[float]
    gguf_slots: NotRequired[int]        # GGUF: llama-server slots decoding together (1: in process, one at a time)
    constrained_minus_free: NotRequired[float]
    fallback: NotRequired[dict]         # a labelled set: eval/'s thresholds applied (fallback.effect), constrained


class BaselineRow(Scores):
    """One model of `baseline`, prompted k-shot, or a classic model trained on the split (baseline/results.json)."""
    model: str
    kind: str                           # open-weight | api | classic
    shots: int                          # classic: 0
    examples_per_s: float
    train_s: NotRequired[float]         # classic: seconds to train, on how many messages
    train_examples: NotRequired[int]
    endpoint: NotRequired[str]          # API models: where they were asked, and how often
    requests: NotRequired[int]
    retries: NotRequired[int]
    cache_hits: NotRequired[int]


class CpuRow(TypedDict):
    """One GGUF variant and decoding mode of `profile-cpu` on one host (profiles/<host>/cpu/results.json)."""
    model: str
    variant: str                        # F16, Q8_0, Q4_K_M, ...
    mode: str                           # naive | prefix_cached | prefix_cached_constrained
    source: str
    file_bytes: int
    fixed_tokens: int                   # shape twins: answers of this many tokens, EOS off (0: real answers)
    threads: int
    load_s: float
    rss_before_load_bytes: int
    rss_after_load_bytes: int
    peak_rss_bytes: int
    sampled_peak_rss_bytes: int
    vm_hwm_bytes: int
    ru_maxrss_bytes: int
    shared_prefix_tokens: int
    requests: int
    prompt_tokens_mean: float
    processed_tokens_mean: float
    generated_tokens_mean: float
    prompt_tok_s: float
    decode_tok_s: float
    decode_tok_s_median: float
    e2e_tok_s: float
    ttft_mean_s: float
    latency_mean_s: float
    latency_p50_s: float
    latency_p95_s: float
    latency_vs_naive: float
    weights_read_per_token_bytes: int
    bandwidth_share: float
    identical_to_naive: NotRequired[float]
    model_calls_mean: NotRequired[float]
    plain_llama_cpp: NotRequired[dict]  # naive mode: llama.cpp's own timing of the same file
    decode_vs_plain: NotRequired[float]


class GpuRow(TypedDict):
    """One variant of `profile-gpu` on one host (profiles/<host>/gpu/results.json)."""
    model: str
    source: str
    fixed_tokens: int
    variant: str                        # fp16 | gptq | nf4
    load_s: float
    kernel: str | None
    parameter_bytes: int
    torch_peak_allocated_bytes: int
    nvml_process_bytes: int | None
    requests: int
    generated_tokens_mean: float
    decode_tok_s: float
    e2e_tok_s: float
    ttft_mean_s: float
    latency_mean_s: float
    latency_p95_s: float
    energy_j: float
    energy_j_per_token: float
    energy_method: str
    batched: list[dict]


class ServeRow(TypedDict):
    """One engine at one number of concurrent clients in `loadtest` (profiles/<host>/serve/results.json)."""
    engine: str
    clients: int
    requests: int
    seconds: float
    requests_per_s: float
    latency_mean_s: float
    latency_p50_s: float
    latency_p95_s: float
    latency_p99_s: float
    errors: int
    exact_match: float | None
    same_as_1_client: float | None
    same_as_evaluate: float | None
    evaluate_exact_match: float | None


class SkippedRow(TypedDict):
    """A model or variant a stage could not measure here, and why."""
    skipped: str
    model: NotRequired[str]
    variant: NotRequired[str]
    kind: NotRequired[str]
    shots: NotRequired[int]


def checked(record: type, row: dict, where: str = "a row") -> dict:
    """row itself when it holds every key `record` requires and none it does not declare; a row with `skipped`
    is checked as a SkippedRow. ValueError (a defect in the writer, or a fixture out of date) otherwise."""
    record = SkippedRow if "skipped" in row else record
    required, known = record.__required_keys__, record.__required_keys__ | record.__optional_keys__
    missing, unknown = sorted(required - row.keys()), sorted(row.keys() - known)
    if missing or unknown:
        raise ValueError(f"{where}: does not match {record.__name__} (missing {missing}, undeclared {unknown})")
    return row


def read_rows(path: Path, record: type) -> list[dict]:
    """The rows of a results.json, each checked against `record` (MissingArtifact naming the file if one is not:
    a run written by another version of this code)."""
    rows = read_json(path)["rows"]
    try:
        return [checked(record, row, f"{path} row {i}") for i, row in enumerate(rows, 1)]
    except ValueError as err:
        raise MissingArtifact(f"{err}: rerun the stage that wrote it with FORCE=1") from None
