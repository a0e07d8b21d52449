"""serve: one GGUF variant over an OpenAI-compatible HTTP API, plus POST /v1/intent.

Two engines (serve.engine). `llama-server` (default): llama.cpp's own server, compiled by `make venv` from
the pinned llama.cpp, runs as a child process on a private port with `serve.slots` slots decoded together
(continuous batching); this process stands in front of it. /v1/intent runs the same constrained decoder as
the in-process engine (and evaluate), each of its model decisions one llama-server call on the slot the
intent holds (the slot's KV cache keeps everything but the new tokens); every other route (/v1/chat/completions,
/v1/completions, /v1/models, /health, /slots, /metrics) is passed through, streamed. A client that hangs up
frees its slot. `llama-cpp-python`: llama-cpp-python's server routes and /v1/intent share one llama.cpp
context in this process and take turns (one request at a time). /v1/intent takes
{"text": "..."} and answers the schema-checked {"action", "product", "quantity"} decoded with constrained
decoding on (action "none" with product and quantity null: no cart operation), with the decoder's "confidence"
(per field and overall, and the runner-up products), "raw" and "latency_s"; below serve.fallback_threshold or
serve.ambiguity_margin the none-form with "fallback" and "candidates" instead (cart_intent/intent.py); or 422
{"detail", "raw"} when the answer is not a valid one.
Bad requests (no text, empty text, over-long text in characters or in tokens for the context, text that is
not valid Unicode, not JSON) get a 4xx with a message. The GGUF's chat template makes /v1/chat/completions
with one user message send the training prompt; with the answer's JSON Schema (gguf/<model>/schema.json) in
`response_format` it decodes with the answer's grammar and gives /v1/intent's answer. Security: it listens on
serve.host (127.0.0.1 by default), sends no CORS header but for the origins in serve.cors_origins, and with
serve.api_key_env asks every route but /health for `Authorization: Bearer <key>`. Writes nothing.

    python -m stages.serve --config configs/smollm2.toml                   # http://127.0.0.1:8000
    python -m stages.serve --config configs/smoke.toml --set serve.variant='"F16"' --set serve.port=8080
    python -m stages.serve --config configs/smollm2.toml --set serve.engine='"llama-cpp-python"'
    curl -s 127.0.0.1:8000/v1/intent -H 'content-type: application/json' -d '{"text": "dodaj 3 paste za zube"}'

Reads artifacts/<run>/gguf/<model>/model-<variant>.gguf (made by `make gguf`).
"""
from __future__ import annotations

import socket

from rich.text import Text

from cart_intent import cli
from cart_intent.artifacts import StageBusy
from cart_intent.backends import LlamaServerBackend
from cart_intent.catalog import run_catalog
from cart_intent.child import ChildFailed
from cart_intent.config import ConfigError
from cart_intent.intent import IntentRules, ServeConfig, gguf_path, thresholds
from cart_intent.llama_cpp_tools import ToolsMissing
from stages.serve.in_process import create_app
from cart_intent.llama_server import LlamaServer
from stages.serve.proxy import create_proxy_app
from stages.serve.routes import alias, guarded


def claim_port(host: str, port: int) -> None:
    """StageBusy (exit 4) with one line when something already listens there, before the model loads; ConfigError
    (exit 2) when the host is no address of this machine."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: only a listener blocks
        try:
            probe.bind((host, port))
        except socket.gaierror as err:   # a name that resolves to nothing is the config's, not a busy port
            raise ConfigError(f"serve.host={host!r} is not an address of this host ({err.strerror}): use 127.0.0.1, "
                              f"0.0.0.0 or one of its addresses") from None
        except OSError as err:
            raise StageBusy(f"{host}:{port} is not free ({err.strerror}): stop what holds it, or pick another "
                            f"port with --set serve.port=N") from None


def serve(run, cfg: ServeConfig, args) -> int:
    cfg.api_key()   # a key asked for but not in the environment: one line, before the model loads
    claim_port(cfg.host, cfg.port)
    path = gguf_path(run, cfg)
    products = run_catalog(run.run_dir).names
    limits = thresholds(run, cfg, path)
    cli.console.print(f"fallback: threshold {limits.threshold:.4g}, ambiguity margin {limits.margin:.4g} "
                      f"({limits.source})")
    routes = "/v1/intent, /v1/chat/completions, /v1/completions, /v1/models"
    if cfg.engine == "llama-cpp-python":
        app = create_app(path, cfg, products, limits)
        cli.console.print(f"serving {path} on http://{cfg.host}:{cfg.port} ({routes}; one request at a time)")
        return run_until_stopped(guarded(app, cfg), cfg)
    try:
        with LlamaServer(path, cfg, alias(path, cfg)) as server:
            backend = LlamaServerBackend(path, server.port, cfg.slots, cfg.prompt_cache)
            backend.vocabulary()   # built once, before the first request
            rules = IntentRules(backend.tokenize, server.slot_context(), cfg.max_text_chars, products, limits)
            cli.console.print(f"serving {path} on http://{cfg.host}:{cfg.port} ({routes}, /health, /slots, "
                              f"/metrics; llama-server, {cfg.slots} slots)")
            return run_until_stopped(guarded(create_proxy_app(server, cfg, rules, backend), cfg), cfg)
    except (ChildFailed, ToolsMissing) as err:
        cli.console.print(Text.assemble(("serve failed ", "red"), str(err)))
        return cli.EXIT_FAILED


def run_until_stopped(app, cfg: ServeConfig) -> int:
    """Serve until Ctrl-C or SIGTERM, which uvicorn turns into a graceful shutdown and a normal return: the
    exit code is then 130, as for every interrupted stage (a supervisor can tell a stop from a clean exit)."""
    import uvicorn
    uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning")).run()
    cli.console.print("serve stopped (Ctrl-C or SIGTERM)")
    return cli.EXIT_INTERRUPTED


def main(argv=None) -> int:
    cli.share_cpu_fairly()
    return cli.run_stage(__doc__, "serve", ServeConfig, serve, argv)
