"""predict: the served variant's answer for one message, locally (no server), as one JSON line.

Same model, prompt, constrained decoding and schema check as `python -m stages.serve` /v1/intent
(config table [serve]). With --text "-" or no --text, answers each line of standard input.

    python -m stages.predict --config configs/tiny.toml --text "dodaj 3 paste za zube"
    printf 'add two lip balms\\nquita 3 jabones\\n' | python -m stages.predict --config configs/smoke.toml

Prints {"text", "action", "product", "quantity", "raw", "latency_s"} per message, or
{"text", "error", "raw"} when the answer is not valid; exit 0 either way (2: bad config, 3: no GGUF).
"""
from __future__ import annotations

import json
import sys

from stages.lib import cli
from stages.serve import IntentModel, ServeConfig, gguf_path


def predict(run, cfg: ServeConfig, args) -> int:
    from stages.lib.backends import GGUFBackend
    model = IntentModel(GGUFBackend(gguf_path(run, cfg), n_ctx=cfg.n_ctx, n_threads=cfg.threads or None),
                        cfg.max_text_chars)
    texts = sys.stdin if args.text in (None, "-") else [args.text]
    for line in texts:
        text = line.rstrip("\n")
        if args.text in (None, "-") and not text.strip():
            continue   # blank lines between messages
        status, answer = model(text)
        if status != 200:
            answer = {"error": answer.pop("detail"), **answer}
        print(json.dumps({"text": text, **answer}, ensure_ascii=False), flush=True)
    return cli.EXIT_OK


def main(argv=None) -> int:
    return cli.run_stage(__doc__, "serve", ServeConfig, predict, argv,
                         add_args=lambda p: p.add_argument("--text", default=None,
                                                           help='one message; "-" or absent: one per stdin line'))


if __name__ == "__main__":
    sys.exit(main())
