"""serve's llama-cpp-python engine: llama-cpp-python's OpenAI-compatible app and /v1/intent on one llama.cpp
context in this process, taking turns (one request at a time)."""
from __future__ import annotations

import contextlib
from pathlib import Path

from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from cart_intent.backends import GGUFBackend
from cart_intent.fallback import Thresholds
from cart_intent.intent import IntentModel, ServeConfig
from cart_intent.llama_internals import server_llama
from cart_intent.task import answer_gbnf, answer_json_schema
from stages.serve.routes import AnswerSchemaAsGrammar, IntentRequest, alias


def create_app(path: Path, cfg: ServeConfig, products: list[str], limits: Thresholds):
    """llama-cpp-python's OpenAI-compatible app with /v1/intent added on the same model."""
    from llama_cpp.server import app as llama_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    threads = cfg.threads or None
    model = ModelSettings(model=str(path), model_alias=alias(path, cfg), n_ctx=cfg.n_ctx, verbose=False,
                          **({"n_threads": threads, "n_threads_batch": threads} if threads else {}))
    app = llama_app.create_app(server_settings=ServerSettings(host=cfg.host, port=cfg.port), model_settings=[model])
    intent = IntentModel(GGUFBackend.wrapping(server_llama()), cfg.max_text_chars, products, limits)
    app.add_middleware(AnswerSchemaAsGrammar, schema=answer_json_schema(products), grammar=answer_gbnf(products),
                       own_grammar_only=True)

    @app.get("/health", tags=["cart intent"])
    async def health():
        """200 once the model is loaded (it is, before the app starts): as llama-server's /health, for load
        balancers and the server image's HEALTHCHECK."""
        return {"status": "ok"}

    @app.post("/v1/intent", tags=["cart intent"])
    async def cart_intent(body: IntentRequest):
        """{"text": "..."} -> {"action", "product", "quantity", "confidence", "raw", "latency_s"} (or the
        none-form with "fallback" and "candidates")."""
        problem = intent.check_text(body.text)
        if problem:
            return JSONResponse({"detail": problem}, status_code=422)
        # the server's own lock: chat completions and intents take turns on the one context
        async with contextlib.asynccontextmanager(llama_app.get_llama_proxy)():
            status, answer = await run_in_threadpool(intent, body.text)
        return JSONResponse(answer, status_code=status)

    return app
