"""What both engines' HTTP apps share: /v1/intent's request body, the answer's grammar in place of its JSON
Schema (and the strict-JSON and request checks), the access policy (API key, CORS), and the model id they list."""
from __future__ import annotations

import hmac
import json
from pathlib import Path

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictStr
from starlette.middleware.cors import CORSMiddleware

from cart_intent.intent import ServeConfig


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
    return CORSMiddleware(AccessPolicy(app, cfg.api_key()), allow_origins=cfg.cors_origins,
                          allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])


def alias(path: Path, cfg: ServeConfig) -> str:
    """The model id /v1/models lists, either engine: <model slug>-<variant>."""
    return f"{path.parent.name}-{cfg.variant}"
