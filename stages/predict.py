"""predict: the served variant's answer for one message, locally (no server), as one JSON line.

Same model, prompt, constrained decoding and schema check as `python -m stages.serve` /v1/intent
(config table [serve]). With --text "-" or no --text, answers each line of standard input.

    python -m stages.predict --config configs/smollm2.toml --text "dodaj 3 paste za zube"
    printf 'add two lip balms\\nquita 3 jabones\\n' | python -m stages.predict --config configs/smoke.toml

Prints {"text", "action", "product", "quantity", "confidence", "raw", "latency_s"} per message (with the fallback's
"fallback" and "candidates" when serve.fallback_threshold or serve.ambiguity_margin turn the answer away), or
{"text", "error"[, "raw"]} when a message cannot be answered (too long for the context, not valid Unicode,
an invalid answer) -- the next lines are still answered; exit 0 either way (2: bad config, 3: no GGUF).
"""
from __future__ import annotations

import json
import sys

from cart_intent import cli
from cart_intent.backends import GGUFBackend
from cart_intent.catalog import run_catalog
from cart_intent.intent import IntentModel, ServeConfig, gguf_path, thresholds


def emit(answer: dict) -> None:
    """One JSON line; escaped (\\uXXXX) when the text holds something UTF-8 cannot carry (a lone surrogate)."""
    line = json.dumps(answer, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(answer)
    print(line, flush=True)


def predict(run, cfg: ServeConfig, args) -> int:
    path = gguf_path(run, cfg)
    model = IntentModel(GGUFBackend(path, n_ctx=cfg.n_ctx, n_threads=cfg.threads or None), cfg.max_text_chars,
                        run_catalog(run.run_dir).names, thresholds(run, cfg, path))
    lines = sys.stdin.buffer if args.text in (None, "-") else [args.text.encode("utf-8", "surrogatepass")]
    for number, raw in enumerate(lines, 1):
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as err:  # one bad line is answered with an error; the rest go on
            emit({"line": number, "error": f"not UTF-8 text (byte {err.start})"})
            continue
        if args.text in (None, "-") and not text.strip():
            continue   # blank lines between messages
        try:
            status, answer = model(text)
        except Exception as err:  # noqa: BLE001 - a failure on one message must not stop the batch
            status, answer = 500, {"detail": f"{type(err).__name__}: {err}"}
        if status != 200:
            answer = {"error": answer.pop("detail"), **answer}
        emit({"text": text, **answer})
    return cli.EXIT_OK


def main(argv=None) -> int:
    cli.share_cpu_fairly()
    return cli.run_stage(__doc__, "serve", ServeConfig, predict, argv,
                         add_args=lambda p: p.add_argument("--text", default=None,
                                                           help='one message; "-" or absent: one per stdin line'))


if __name__ == "__main__":
    sys.exit(main())
