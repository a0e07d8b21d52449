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
decoding on (plus "raw" and "latency_s"), or 422 {"detail", "raw"} when the answer is not a valid one.
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

import asyncio
import hmac
import json
import sys
import time
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictStr
from rich.text import Text

from stages.lib import cli
from stages.lib.artifacts import StageBusy
from stages.lib.backends import GGUFBackend, answer_schema
from stages.lib.catalog import run_catalog
from stages.lib.child import ChildFailed
from stages.lib.config import ConfigError
from stages.lib.intent import IntentModel, IntentRules, ServeConfig, gguf_path
from stages.lib.llama_cpp_tools import ToolsMissing
from stages.lib.llama_internals import server_llama
from stages.lib.task import answer_gbnf, answer_json_schema
from stages.serve_llama_server import IntentDecoder, LlamaServer, ServerFailed

# hop-by-hop headers (RFC 9110 7.6.1) and the ones the HTTP layers recompute: never passed through
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
               "host", "content-length"}


class IntentRequest(BaseModel):
    """POST /v1/intent's body: {"text": "..."} and nothing else."""
    model_config = ConfigDict(extra="forbid")
    text: StrictStr


class NotStrictJson(Exception):
    """NaN, Infinity or -Infinity in a request body."""


def refuse_constant(name: str):
    raise NotStrictJson(name)


class AnswerSchemaAsGrammar:
    """ASGI middleware: a chat completion whose `response_format` carries the answer's JSON Schema (OpenAI's
    `json_object` + schema or `json_schema` form) is decoded with the answer's GBNF grammar instead, the exact
    form the model was trained to write. llama.cpp's grammar for a generic schema starts at "{" without the
    model's leading space and allows any spacing and integer, which pushes the model off its trained path.

    Every body it sees must be strict JSON (no NaN or Infinity, which Python's parser takes and no JSON encoder
    can echo back in an error) nesting no deeper than the parser goes, and a response_format must have
    OpenAI's shape: otherwise 400, on either engine.

    With own_grammar_only (the in-process engine), any other grammar or JSON Schema in a completion request is
    refused with 400: llama.cpp parses grammars in the serving process, and a hostile one (left recursion) kills
    it, where llama-server rejects the same grammar in its own process."""

    ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/intent")   # /v1/intent: strict JSON only

    def __init__(self, app, schema: dict, grammar: str, own_grammar_only: bool = False):
        self.app, self.schema, self.grammar = app, self.core(schema), grammar
        self.own_grammar_only = own_grammar_only

    @staticmethod
    def core(schema) -> dict | None:
        return {k: v for k, v in schema.items() if k not in ("$schema", "title", "description")} \
            if isinstance(schema, dict) else None

    @staticmethod
    def requested_schema(request: dict):
        wanted = request.get("response_format")
        if not isinstance(wanted, dict):
            return None
        if wanted.get("type") == "json_object":
            return wanted.get("schema")
        nested = wanted.get("json_schema") if wanted.get("type") == "json_schema" else None
        return nested.get("schema") if isinstance(nested, dict) else nested

    @staticmethod
    def format_problem(request: dict) -> str | None:
        """What is wrong with a response_format that is not OpenAI's {"type": ...} shape, or None."""
        wanted = request.get("response_format")
        if wanted is None:
            return None
        if not isinstance(wanted, dict) or wanted.get("type") not in ("text", "json_object", "json_schema"):
            return 'response_format must be an object {"type": "text" | "json_object" | "json_schema", ...}'
        nested = wanted.get("json_schema")
        if wanted["type"] == "json_schema" and not (isinstance(nested, dict) and isinstance(nested.get("schema"), dict)):
            return 'response_format.json_schema must be an object {"name": ..., "schema": {a JSON Schema object}}'
        if not isinstance(wanted.get("schema", {}), dict):
            return "response_format.schema must be a JSON Schema object"
        return None

    def refusal(self, request: dict) -> str | None:
        """Why the in-process engine will not decode this request, or None."""
        if "grammar" in request and request["grammar"] != self.grammar:
            return ("this server runs llama.cpp in its own process and decodes only the answer's grammar: send "
                    "response_format with the answer's JSON Schema (schema.json), or serve with serve.engine='llama-server'")
        schema = self.requested_schema(request)
        if schema is not None and self.core(schema) != self.schema:
            return ("this server runs llama.cpp in its own process and takes only the answer's JSON Schema "
                    "(schema.json) as response_format; serve with serve.engine='llama-server' for others")
        return None

    @staticmethod
    def invalid(path: str, request: dict) -> str | None:
        """llama-cpp-python's app answers a body its request model rejects with a 500: checked here, a 400."""
        from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
        from pydantic import ValidationError
        model = CreateChatCompletionRequest if path == "/v1/chat/completions" else CreateCompletionRequest
        try:
            model.model_validate(request)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            return f"{where}: {first['msg']} ({err.error_count()} problem(s) in the request)"
        bias = request.get("logit_bias") or {}
        if request.get("logit_bias_type", "input_ids") == "input_ids" and not all(
                str(key).strip().lstrip("-").isdigit() for key in bias):   # its app calls int() on each: a 500
            return 'logit_bias: keys must be token ids, e.g. {"1234": -100} (or set logit_bias_type "tokens")'
        return None

    def rewrite(self, path: str, body: bytes) -> tuple[bytes, str | None]:
        """The body to pass on, or the reason it is refused."""
        try:
            request = json.loads(body, parse_constant=refuse_constant)
        except RecursionError:
            return body, "the request body nests deeper than Python's parser goes: send a flat JSON object"
        except NotStrictJson as err:
            return body, f"the request body is not valid JSON: {err} is not a JSON value"
        except ValueError:
            return body, None   # the server answers it with its own 4xx
        if not isinstance(request, dict) or path == "/v1/intent":
            return body, None
        if problem := self.format_problem(request) or (self.own_grammar_only and self.refusal(request)):
            return body, problem
        schema = self.requested_schema(request)
        if path == "/v1/chat/completions" and schema is not None and self.core(schema) == self.schema:
            request = {k: v for k, v in request.items() if k != "response_format"} | {"grammar": self.grammar}
            body = json.dumps(request).encode()
        return body, self.invalid(path, request) if self.own_grammar_only else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.ROUTES:
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        (body, problem), replayed = self.rewrite(scope["path"], body), False
        if problem:
            return await JSONResponse({"detail": problem}, status_code=400)(scope, receive, send)

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()   # a disconnect, as the server would have seen it
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        await self.app({**scope, "headers": headers + [(b"content-length", str(len(body)).encode())]}, replay, send)


class AccessPolicy:
    """ASGI middleware around either engine. No CORS header from behind it reaches a browser (llama-server and
    llama-cpp-python's app each allow any origin on their own): `guarded` puts the CORS policy of
    serve.cors_origins in front. With serve.api_key_env, every route but /health asks for
    `Authorization: Bearer <key>` (compared in constant time)."""

    def __init__(self, app, api_key: str):
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.api_key):
                refusal = JSONResponse({"detail": "missing or wrong API key: send Authorization: Bearer <key>"},
                                       status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await refusal(scope, receive, send)

        async def without_cors(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if not k.lower().startswith(b"access-control-")]
                message = {**message, "headers": headers}
            await send(message)
        await self.app(scope, receive, without_cors)


def guarded(app, cfg: ServeConfig):
    """The app as served: the CORS policy (only serve.cors_origins; a preflight from any other origin is a 400),
    then the API key, then the engine."""
    from starlette.middleware.cors import CORSMiddleware
    return CORSMiddleware(AccessPolicy(app, cfg.api_key()), allow_origins=cfg.cors_origins,
                          allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])


def alias(path: Path, cfg: ServeConfig) -> str:
    """The model id /v1/models lists, either engine: <model slug>-<variant>."""
    return f"{path.parent.name}-{cfg.variant}"


def create_app(path: Path, cfg: ServeConfig, products: list[str]):
    """llama-cpp-python's OpenAI-compatible app with /v1/intent added on the same model."""
    import contextlib

    from fastapi.concurrency import run_in_threadpool
    from llama_cpp.server import app as llama_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    threads = cfg.threads or None
    model = ModelSettings(model=str(path), model_alias=alias(path, cfg), n_ctx=cfg.n_ctx, verbose=False,
                          **({"n_threads": threads, "n_threads_batch": threads} if threads else {}))
    app = llama_app.create_app(server_settings=ServerSettings(host=cfg.host, port=cfg.port), model_settings=[model])
    intent = IntentModel(GGUFBackend.wrapping(server_llama()), cfg.max_text_chars, products)
    app.add_middleware(AnswerSchemaAsGrammar, schema=answer_json_schema(products), grammar=answer_gbnf(products),
                       own_grammar_only=True)

    @app.get("/health", tags=["cart intent"])
    async def health():
        """200 once the model is loaded (it is, before the app starts): as llama-server's /health, for load
        balancers and the server image's HEALTHCHECK."""
        return {"status": "ok"}

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


async def unless_disconnected(request, pending, on_gone=None):
    """The awaitable's result, or None when the client hangs up first: then it is cancelled (and on_gone
    called), which closes the connection to llama-server, which stops decoding and frees the slot."""
    work, gone = asyncio.ensure_future(pending), asyncio.ensure_future(request.receive())
    while True:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            gone.cancel()
            return work.result()
        if gone.result().get("type") == "http.disconnect":
            if on_gone:
                on_gone()
            work.cancel()
            return None
        gone = asyncio.ensure_future(request.receive())   # more of a body nobody reads: keep listening


def create_proxy_app(server: LlamaServer, cfg: ServeConfig, rules: IntentRules, decoder: IntentDecoder):
    """/v1/intent decided on llama-server (the in-process engine's constrained decoder, its model calls made
    by llama-server on one slot) with the same checks; every other route passed through, streamed."""
    import threading

    import httpx2
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import Response, StreamingResponse
    from starlette.background import BackgroundTask

    upstream = httpx2.AsyncClient(base_url=server.url, timeout=None, limits=httpx2.Limits(
        max_connections=None, max_keepalive_connections=4 * cfg.slots))
    app = FastAPI(title="cart-intent", on_shutdown=[upstream.aclose])
    app.add_middleware(AnswerSchemaAsGrammar, schema=answer_json_schema(rules.products),
                       grammar=answer_gbnf(rules.products))

    def unavailable(why: str) -> JSONResponse:
        code = server.exited()
        return JSONResponse({"detail": f"llama-server exited with code {code}" if code is not None else why},
                            status_code=503 if code is not None else 502)

    @app.post("/v1/intent", tags=["cart intent"])
    async def cart_intent(body: IntentRequest, request: Request):
        """{"text": "..."} -> {"action", "product", "quantity", "raw", "latency_s"}."""
        problem = rules.check_text(body.text)
        if problem:
            return JSONResponse({"detail": problem}, status_code=422)
        began, cancelled = time.perf_counter(), threading.Event()
        try:
            raw = await unless_disconnected(request, run_in_threadpool(decoder, body.text, cancelled), cancelled.set)
        except ServerFailed as err:
            return unavailable(str(err))
        if raw is None:
            return Response(status_code=499)   # nobody to answer; the slot is already back in the pool
        status, answer = rules.judge(raw, time.perf_counter() - began)
        return JSONResponse(answer, status_code=status)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD"], include_in_schema=False)
    async def passthrough(path: str, request: Request):
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS]
        sent = upstream.build_request(request.method, "/" + path, params=request.query_params,
                                      headers=headers, content=await request.body())
        try:
            reply = await unless_disconnected(request, upstream.send(sent, stream=True))
        except httpx2.TransportError as err:
            return unavailable(f"llama-server did not answer ({type(err).__name__})")
        if reply is None:
            return Response(status_code=499)
        kept = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_HEADERS}
        return StreamingResponse(reply.aiter_raw(), status_code=reply.status_code, headers=kept,
                                 background=BackgroundTask(reply.aclose))

    return app


def claim_port(host: str, port: int) -> None:
    """StageBusy (exit 4) with one line when something already listens there, before the model loads; ConfigError
    (exit 2) when the host is no address of this machine."""
    import socket
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
    routes = "/v1/intent, /v1/chat/completions, /v1/completions, /v1/models"
    if cfg.engine == "llama-cpp-python":
        app = create_app(path, cfg, products)
        cli.console.print(f"serving {path} on http://{cfg.host}:{cfg.port} ({routes}; one request at a time)")
        return run_until_stopped(guarded(app, cfg), cfg)
    from llama_cpp import Llama
    vocab = GGUFBackend.wrapping(Llama(str(path), vocab_only=True, verbose=False))   # tokens only, no weights
    tokenize = vocab.stepper().tokenize
    vocabulary = vocab.vocabulary()
    try:
        with LlamaServer(path, cfg, alias(path, cfg)) as server:
            rules = IntentRules(tokenize, server.slot_context(), cfg.max_text_chars, products)
            decoder = IntentDecoder(server, tokenize, vocabulary, answer_schema(tuple(products)))
            cli.console.print(f"serving {path} on http://{cfg.host}:{cfg.port} ({routes}, /health, /slots, "
                              f"/metrics; llama-server, {cfg.slots} slots)")
            return run_until_stopped(guarded(create_proxy_app(server, cfg, rules, decoder), cfg), cfg)
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


if __name__ == "__main__":
    sys.exit(main())
