"""The served specialist, shared by `serve` (/v1/intent) and `predict`: the [serve] config, which GGUF file
it names, and text -> checked answer (constrained decoding, parse, schema check)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .artifacts import MissingArtifact
from .backends import GGUFBackend
from .config import require
from .task import ANSWER_TOKENS, build_prompt, is_valid, parse_output


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


class IntentModel:
    """Text -> (HTTP status, answer): constrained decoding, then parse and schema check."""

    def __init__(self, backend: GGUFBackend, max_text_chars: int, products: list[str]):
        self.backend, self.max_text_chars = backend, max_text_chars
        self.products, self.names = list(products), set(products)
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
            [completion] = self.backend.generate([build_prompt(text.strip())], constrained=True,
                                                 products=self.products)
        latency = round(time.perf_counter() - began, 4)
        pred = parse_output(completion.text)
        if not is_valid(pred, self.names):
            return 422, {"detail": "the model's answer is not a valid cart intent", "raw": completion.text,
                         "latency_s": latency}
        return 200, {**{k: pred[k] for k in ("action", "product", "quantity")}, "raw": completion.text,
                     "latency_s": latency}
