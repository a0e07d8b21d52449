"""serve: one GGUF variant over an OpenAI-compatible HTTP API, plus POST /v1/intent.

llama-cpp-python's server routes (/v1/chat/completions, /v1/completions, /v1/models, ...) and a small
/v1/intent endpoint share one llama.cpp context (and the server's lock around it). /v1/intent takes
{"text": "..."} and answers the schema-checked {"action", "product", "quantity"} decoded with constrained
decoding on (plus "raw" and "latency_s"), or 422 {"detail", "raw"} when the answer is not a valid one.
Bad requests (no text, empty text, over-long text in characters or in tokens for the context, text that is
not valid Unicode, not JSON) get a 4xx with a message. The GGUF's chat template makes /v1/chat/completions
with one user message send the training prompt; with the answer's JSON Schema (gguf/<model>/schema.json) in
`response_format` it decodes with the answer's grammar and gives /v1/intent's answer. Writes nothing.

    python -m stages.serve --config configs/smollm2.toml                   # http://127.0.0.1:8000
    python -m stages.serve --config configs/smoke.toml --set serve.variant='"F16"' --set serve.port=8080
    curl -s 127.0.0.1:8000/v1/intent -H 'content-type: application/json' -d '{"text": "dodaj 3 paste za zube"}'

Reads artifacts/<run>/gguf/<model>/model-<variant>.gguf (made by `make gguf`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, StrictStr

from stages.lib import cli
from stages.lib.artifacts import StageBusy
from stages.lib.backends import GGUFBackend
from stages.lib.catalog import run_catalog
from stages.lib.intent import IntentModel, ServeConfig, gguf_path
from stages.lib.llama_internals import server_llama
from stages.lib.task import answer_gbnf, answer_json_schema


class IntentRequest(BaseModel):
    """POST /v1/intent's body: {"text": "..."} and nothing else."""
    model_config = ConfigDict(extra="forbid")
    text: StrictStr


class AnswerSchemaAsGrammar:
    """ASGI middleware: a chat completion whose `response_format` carries the answer's JSON Schema (OpenAI's
    `json_object` + schema or `json_schema` form) is decoded with the answer's GBNF grammar instead, the exact
    form the model was trained to write. llama.cpp's grammar for a generic schema starts at "{" without the
    model's leading space and allows any spacing and integer, which pushes the model off its trained path."""

    def __init__(self, app, schema: dict, grammar: str):
        self.app, self.schema, self.grammar = app, self.core(schema), grammar

    @staticmethod
    def core(schema) -> dict | None:
        return {k: v for k, v in schema.items() if k not in ("$schema", "title", "description")} \
            if isinstance(schema, dict) else None

    def rewrite(self, body: bytes) -> bytes:
        try:
            request = json.loads(body)
        except ValueError:
            return body   # the server answers it with its own 4xx
        wanted = request.get("response_format") if isinstance(request, dict) else None
        if not isinstance(wanted, dict):
            return body
        schema = wanted.get("schema") if wanted.get("type") == "json_object" else \
            (wanted.get("json_schema") or {}).get("schema") if wanted.get("type") == "json_schema" else None
        if self.core(schema) != self.schema:
            return body
        request.pop("response_format")
        return json.dumps({**request, "grammar": self.grammar}).encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        body, replayed = self.rewrite(body), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()   # a disconnect, as the server would have seen it
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        await self.app({**scope, "headers": headers + [(b"content-length", str(len(body)).encode())]}, replay, send)


def create_app(path: Path, cfg: ServeConfig, products: list[str]):
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
    intent = IntentModel(GGUFBackend.wrapping(server_llama()), cfg.max_text_chars, products)
    app.add_middleware(AnswerSchemaAsGrammar, schema=answer_json_schema(products), grammar=answer_gbnf(products))

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
    app = create_app(path, cfg, run_catalog(run.run_dir).names)
    cli.console.print(f"serving {path} on http://{cfg.host}:{cfg.port} (/v1/intent, /v1/chat/completions, "
                      f"/v1/models)")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    return cli.EXIT_OK


def main(argv=None) -> int:
    return cli.run_stage(__doc__, "serve", ServeConfig, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
