"""serve's llama-server engine, the front: /v1/intent decided on llama-server's slots with the same checks as the
in-process engine, every other route passed through to it, streamed; a client that hangs up frees its slot."""
from __future__ import annotations

import asyncio
import threading
import time

import httpx2
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from cart_intent.backends import Cancelled, LlamaServerBackend, ServerFailed
from cart_intent.intent import IntentRules, ServeConfig
from cart_intent.task import Completion, answer_gbnf, answer_json_schema, build_prompt
from cart_intent.llama_server import LlamaServer
from stages.serve.routes import AnswerSchemaAsGrammar, IntentRequest

# hop-by-hop headers (RFC 9110 7.6.1) and the ones the HTTP layers recompute: never passed through
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
               "host", "content-length"}


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


def create_proxy_app(server: LlamaServer, cfg: ServeConfig, rules: IntentRules, backend: LlamaServerBackend):
    """/v1/intent decided on llama-server (the in-process engine's constrained decoder, its model calls made
    by llama-server on one slot) with the same checks; every other route passed through, streamed."""
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
        """{"text": "..."} -> {"action", "product", "quantity", "confidence", "raw", "latency_s"} (or the
        none-form with "fallback" and "candidates")."""
        problem = rules.check_text(body.text)
        if problem:
            return JSONResponse({"detail": problem}, status_code=422)
        began, cancelled = time.perf_counter(), threading.Event()

        def decide() -> Completion | None:
            try:
                [answer] = backend.generate([build_prompt(body.text.strip())], constrained=True,
                                            products=rules.products, cancelled=cancelled)
            except Cancelled:
                return None
            return answer

        try:
            completion = await unless_disconnected(request, run_in_threadpool(decide), cancelled.set)
        except ServerFailed as err:
            return unavailable(str(err))
        if completion is None:
            return Response(status_code=499)   # nobody to answer; the slot is already back in the pool
        status, answer = rules.judge(completion, time.perf_counter() - began)
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
