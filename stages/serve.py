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
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, StrictStr

from stages.lib import cli
from stages.lib.artifacts import MissingArtifact, StageBusy
from stages.lib.backends import GGUFBackend
from stages.lib.config import require
from stages.lib.task import ANSWER_TOKENS, build_prompt, is_valid, parse_output


@dataclass
class ServeConfig:
    variant: str = "Q4_K_M"     # a type made by the gguf stage, or "F16"
    model: str = ""             # model slug under <run>/gguf/ ("": the first one found)
    host: str = "127.0.0.1"     # "0.0.0.0" exposes it beyond this machine (as in a container)
    port: int = 8000
    threads: int = 0            # llama.cpp threads; 0: every core
    max_text_chars: int = 500   # longer messages are refused (422)
    n_ctx: int = 512

    def validate(self) -> None:
        require(self.variant.replace("_", "").isalnum(), "variant", 'a GGUF type such as "Q4_K_M" or "F16"')
        require(self.model == "" or (self.model.replace("-", "").replace("_", "").replace(".", "").isalnum()
                                     and self.model.strip(".") == self.model), "model",
                'a model folder name under <run>/gguf/ such as "smollm2-135m-instruct" (no path), or ""')
        require(1 <= self.port <= 65535, "port", "an integer in [1, 65535]")
        require(self.threads >= 0, "threads", "an integer >= 0 (0: every core)")
        require(self.max_text_chars >= 1, "max_text_chars", "an integer >= 1")
        require(self.n_ctx >= 128, "n_ctx", "an integer >= 128")


def gguf_path(run, cfg: ServeConfig) -> Path:
    """<run>/gguf/<slug>/model-<variant>.gguf, or MissingArtifact naming `make gguf`."""
    root = run.run_dir / "gguf"
    slugs = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    slug = cfg.model or (slugs[0] if slugs else "")
    name = "model-f16.gguf" if cfg.variant.upper() == "F16" else f"model-{cfg.variant}.gguf"
    path = root / slug / name
    if not slug or not path.is_file():
        raise MissingArtifact(f"{path if slug else root} not found (models here: {', '.join(slugs) or 'none'}); "
                              f"run `make gguf CONFIG=...` with {cfg.variant} in gguf.types")
    return path


class IntentRequest(BaseModel):
    """POST /v1/intent's body: {"text": "..."} and nothing else."""
    model_config = ConfigDict(extra="forbid")
    text: StrictStr


class _SharedGGUF(GGUFBackend):
    """The GGUF back end over an already loaded llama_cpp.Llama (the server's own)."""

    def __init__(self, llm, label: str):
        self.llm, self.label = llm, label


class IntentModel:
    """Text -> (HTTP status, answer): constrained decoding, then parse and schema check."""

    def __init__(self, backend: GGUFBackend, max_text_chars: int):
        from stages.lib.catalog import load_catalog
        self.backend, self.max_text_chars = backend, max_text_chars
        self.names = set(load_catalog().names)
        self.lock = threading.Lock()   # one llama context is not thread-safe
        backend.vocabulary()           # built once, before the first request

    def check_text(self, text) -> str | None:
        """Why this text cannot be answered, or None. The length limit that matters is in tokens: the prompt
        and the longest answer must fit the context actually allocated (serve.n_ctx)."""
        if not isinstance(text, str):
            return "text: expected a string"
        if not text.strip():
            return "text: empty"
        if len(text.strip()) > self.max_text_chars:
            return f"text: longer than {self.max_text_chars} characters ({len(text.strip())})"
        try:
            prompt = build_prompt(text.strip()).encode("utf-8")
        except UnicodeEncodeError:
            return "text: not valid Unicode (it holds a lone surrogate code point); send UTF-8 text"
        room = self.backend.llm.n_ctx() - ANSWER_TOKENS
        tokens = len(self.backend.llm.tokenize(prompt, add_bos=True, special=False))
        if tokens > room:
            return f"text: {tokens} tokens with the instruction, over the {room} the context leaves (serve.n_ctx)"
        return None

    def __call__(self, text: str) -> tuple[int, dict]:
        problem = self.check_text(text)
        if problem:
            return 422, {"detail": problem}
        began = time.perf_counter()
        with self.lock:
            [completion] = self.backend.generate([build_prompt(text.strip())], constrained=True)
        latency = round(time.perf_counter() - began, 4)
        pred = parse_output(completion.text)
        if not is_valid(pred, self.names):
            return 422, {"detail": "the model's answer is not a valid cart intent", "raw": completion.text,
                         "latency_s": latency}
        return 200, {**{k: pred[k] for k in ("action", "product", "quantity")}, "raw": completion.text,
                     "latency_s": latency}


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
    intent = IntentModel(_SharedGGUF(llama_app._llama_proxy(), alias), cfg.max_text_chars)

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
