"""serve: one GGUF variant over an OpenAI-compatible HTTP API, plus POST /v1/intent.

llama-cpp-python's server routes (/v1/chat/completions, /v1/completions, /v1/models, ...) and a small
/v1/intent endpoint share one llama.cpp context (and the server's lock around it). /v1/intent takes
{"text": "..."} and answers the schema-checked {"action", "product", "quantity"} decoded with constrained
decoding on (plus "raw" and "latency_s"), or 422 {"detail", "raw"} when the answer is not a valid one.
Bad requests (no text, empty text, over-long text in characters or in tokens for the context, text that is
not valid Unicode, not JSON) get a 4xx with a message. Writes nothing.

    python -m stages.serve --config configs/smollm2.toml                   # http://127.0.0.1:8000
    python -m stages.serve --config configs/smoke.toml --set serve.variant='"F16"' --set serve.port=8080
    curl -s 127.0.0.1:8000/v1/intent -H 'content-type: application/json' -d '{"text": "dodaj 3 paste za zube"}'

Reads artifacts/<run>/gguf/<model>/model-<variant>.gguf (made by `make gguf`).
"""
from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, StrictStr

from stages.lib import cli
from stages.lib.artifacts import StageBusy
from stages.lib.backends import GGUFBackend
from stages.lib.intent import IntentModel, ServeConfig, gguf_path
from stages.lib.llama_internals import server_llama


class IntentRequest(BaseModel):
    """POST /v1/intent's body: {"text": "..."} and nothing else."""
    model_config = ConfigDict(extra="forbid")
    text: StrictStr


def create_app(path: Path, cfg: ServeConfig):
    """llama-cpp-python's OpenAI-compatible app with /v1/intent added on the same model."""
    import contextlib

    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse
    from llama_cpp.server import app as llama_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    threads = cfg.threads or None
    alias = f"{path.parent.name}-{cfg.variant}"
    model = ModelSettings(model=str(path), model_alias=alias, n_ctx=cfg.n_ctx, verbose=False,
                          **({"n_threads": threads, "n_threads_batch": threads} if threads else {}))
    app = llama_app.create_app(server_settings=ServerSettings(host=cfg.host, port=cfg.port), model_settings=[model])
    intent = IntentModel(GGUFBackend.wrapping(server_llama()), cfg.max_text_chars)

    @app.post("/v1/intent", tags=["cart intent"])
    async def cart_intent(body: IntentRequest):
        """{"text": "..."} -> {"action", "product", "quantity", "raw", "latency_s"}."""
        problem = intent.check_text(body.text)
        if problem:
            return JSONResponse({"detail": problem}, status_code=422)
        # the server's own lock: chat completions and intents take turns on the one context
        async with contextlib.asynccontextmanager(llama_app.get_llama_proxy)():
            status, answer = await run_in_threadpool(intent, body.text)
        return JSONResponse(answer, status_code=status)

    return app


def claim_port(host: str, port: int) -> None:
    """StageBusy (exit 4) with one line when something already listens there, before the model loads."""
    import socket
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: only a listener blocks
        try:
            probe.bind((host, port))
        except OSError as err:
            raise StageBusy(f"{host}:{port} is not free ({err.strerror}): stop what holds it, or pick another "
                            f"port with --set serve.port=N") from None


def serve(run, cfg: ServeConfig, args) -> int:
    import uvicorn
    claim_port(cfg.host, cfg.port)
    path = gguf_path(run, cfg)
    app = create_app(path, cfg)
    cli.console.print(f"serving {path} on http://{cfg.host}:{cfg.port} (/v1/intent, /v1/chat/completions, "
                      f"/v1/models)")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    return cli.EXIT_OK


def main(argv=None) -> int:
    return cli.run_stage(__doc__, "serve", ServeConfig, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
