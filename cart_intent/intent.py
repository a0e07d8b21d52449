"""The served specialist, shared by `serve` (/v1/intent), `predict` and `loadtest`: the [serve] config, which
GGUF file it names, the rules a message and an answer must pass, and text -> checked answer in this process
(constrained decoding, parse, schema check, the fallback of cart_intent/fallback.py: the reply is then the
none-form with `"fallback": "low_confidence"` or `"ambiguous"` and the `candidates`, for "did you mean ...?")."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import fallback
from .artifacts import MissingArtifact
from .backends import GGUFBackend
from .config import ConfigError, require
from .registry import require_stage
from .task import ANSWER_TOKENS, FIELDS, NO_OPERATION, Completion, build_prompt, is_valid, parse_output

FALLBACKS = ("validation", "config", "off")


ENGINES = ("llama-server", "llama-cpp-python")


@dataclass
class ServeConfig:
    variant: str = "Q4_K_M"     # a type made by the gguf stage, or "F16"
    model: str = ""             # model slug under <run>/gguf/ ("": the first one found)
    host: str = "127.0.0.1"     # "0.0.0.0" exposes it beyond this machine (as in a container)
    port: int = 8000
    # "llama-server": llama.cpp's own server, `slots` requests decoded together (continuous batching), this
    # process in front of it; "llama-cpp-python": one llama.cpp context in this process, one request at a time
    engine: str = "llama-server"
    slots: int = 8              # llama-server: requests decoded together; more wait in its queue
    prompt_cache: bool = True   # llama-server: a slot keeps its last prompt's KV and reuses the common prefix
    threads: int = 0            # llama.cpp threads; 0: every core
    max_text_chars: int = 500   # longer messages are refused (422)
    n_ctx: int = 512            # tokens of context per request (per slot; llama-server allocates slots x n_ctx)
    startup_timeout_s: int = 120  # llama-server: until it answers /health
    # web pages (origins) allowed to call the server from a browser, e.g. ["https://shop.example"]; [] none
    cors_origins: list[str] = field(default_factory=list)
    # the fallback (no cart operation, candidates instead): "validation": the threshold and margin `make evaluate`
    # chose on the validation split for this variant (off until it has); "config": the two keys below; "off"
    fallback: str = "validation"
    fallback_threshold: float = 0.0   # overall confidence below it: low_confidence
    ambiguity_margin: float = 0.0     # the product's lead over the runner-up below it: ambiguous
    # the environment variable holding the API key every route but /health then asks for
    # (`Authorization: Bearer <key>`, as OpenAI, llama-server and vLLM do); "": no key
    api_key_env: str = ""

    def validate(self) -> None:
        require(self.variant.replace("_", "").isalnum(), "variant", 'a GGUF type such as "Q4_K_M" or "F16"')
        require(self.model == "" or (self.model.replace("-", "").replace("_", "").replace(".", "").isalnum()
                                     and self.model.strip(".") == self.model), "model",
                'a model folder name under <run>/gguf/ such as "smollm2-135m-instruct" (no path), or ""')
        require(1 <= self.port <= 65535, "port", "an integer in [1, 65535]")
        require(self.engine in ENGINES, "engine", f"one of {', '.join(ENGINES)}")
        require(1 <= self.slots <= 256, "slots", "an integer in [1, 256]")
        require(self.startup_timeout_s >= 5, "startup_timeout_s", "seconds >= 5")
        require(self.threads >= 0, "threads", "an integer >= 0 (0: every core)")
        require(self.max_text_chars >= 1, "max_text_chars", "an integer >= 1")
        require(self.n_ctx >= 128, "n_ctx", "an integer >= 128")
        require(all(isinstance(o, str) and o.startswith(("http://", "https://")) and o.count("/") == 2
                    for o in self.cors_origins), "cors_origins", 'origins such as "https://shop.example" (no path)')
        require(self.fallback in FALLBACKS, "fallback", f"one of {', '.join(FALLBACKS)}")
        require(0 <= self.fallback_threshold <= 1 and 0 <= self.ambiguity_margin <= 1, "fallback_threshold",
                "fallback_threshold and ambiguity_margin in [0, 1] (0: off)")
        require(self.api_key_env == "" or self.api_key_env.replace("_", "").isalnum(), "api_key_env",
                'the name of an environment variable, e.g. "CART_API_KEY", or ""')

    def api_key(self) -> str:
        """The key clients must send, from the environment (never from a file): "" when none is asked for."""
        if not self.api_key_env:
            return ""
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise ConfigError(f"serve.api_key_env: {self.api_key_env} is not set in the environment: export it, "
                              f"or set serve.api_key_env=\"\" to serve without a key")
        return key


def gguf_path(run, cfg: ServeConfig) -> Path:
    """<run>/gguf/<slug>/model-<variant>.gguf as the gguf manifest lists it (a truncated or altered file is caught
    here, as every stage catches its inputs), or MissingArtifact naming `make gguf`."""
    root = run.run_dir / "gguf"
    outputs = require_stage(run.run_dir, "gguf")["outputs"]
    slugs = sorted({name.split("/")[0] for name in outputs if name.endswith(".gguf")})
    slug = cfg.model or (slugs[0] if slugs else "")
    name = "model-f16.gguf" if cfg.variant.upper() == "F16" else f"model-{cfg.variant}.gguf"
    path = root / slug / name
    if not slug or f"{slug}/{name}" not in outputs:
        raise MissingArtifact(f"{path if slug else root} not found (models here: {', '.join(slugs) or 'none'}); "
                              f"run `make gguf CONFIG=...` with {cfg.variant} in gguf.types")
    return path


def thresholds(run, cfg: ServeConfig, path: Path) -> fallback.Thresholds:
    """The fallback's thresholds for the served GGUF file `path`, as cfg.fallback says where they come from."""
    if cfg.fallback == "off":
        return fallback.Thresholds()
    if cfg.fallback == "config":
        return fallback.Thresholds(cfg.fallback_threshold, cfg.ambiguity_margin, "config")
    variant = f"{path.parent.name}/gguf-{path.stem.removeprefix('model-')}"   # as evaluate names it
    chosen = fallback.chosen(run.run_dir).get(variant)
    if not chosen:
        return fallback.Thresholds(source=f"off: no threshold chosen for {variant} yet (make evaluate)")
    return fallback.Thresholds(chosen["threshold"], chosen["ambiguity_margin"],
                               f"validation split ({chosen['validation']['examples']} messages) of {variant}")


class IntentRules:
    """What a message must be to be answered, and what makes an answer one: shared by every engine, so
    /v1/intent keeps one contract whichever decodes. `tokenize(text) -> ids` (a back end's stepper's: the
    prompt as the model sees it) counts what the context holds; `limits`: the fallback's thresholds."""

    def __init__(self, tokenize, n_ctx: int, max_text_chars: int, products: list[str],
                 limits: fallback.Thresholds = fallback.Thresholds()):
        self.tokenize, self.n_ctx, self.max_text_chars, self.limits = tokenize, n_ctx, max_text_chars, limits
        self.products, self.names = list(products), set(products)

    def prompt_tokens(self, text: str) -> list[int]:
        """The training prompt of a checked text, as the model's tokens (BOS first; no special tokens parsed
        from the text, so a message cannot inject a chat marker)."""
        return self.tokenize(build_prompt(text.strip()))

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
            tokens = len(self.prompt_tokens(text))
        except UnicodeEncodeError:
            return "text: not valid Unicode (it holds a lone surrogate code point); send UTF-8 text"
        room = self.n_ctx - ANSWER_TOKENS
        if tokens > room:
            return f"text: {tokens} tokens with the instruction, over the {room} the context leaves (serve.n_ctx)"
        return None

    def judge(self, completion: Completion, latency: float) -> tuple[int, dict]:
        """(200, the answer, or the fallback) when the model's text is a valid cart intent, else (422, why, with
        the text)."""
        raw, confidence, seconds = completion.text, completion.confidence, round(latency, 4)
        pred = parse_output(raw)
        if not is_valid(pred, self.names):
            return 422, {"detail": "the model's answer is not a valid cart intent", "raw": raw, "latency_s": seconds}
        answer = {k: pred.get(k) for k in FIELDS}
        why = fallback.reason(answer, confidence, self.limits)
        if why:
            return 200, {"action": NO_OPERATION, "product": None, "quantity": None, "fallback": why,
                         "candidates": fallback.candidates(answer, confidence), "confidence": confidence, "raw": raw,
                         "latency_s": seconds}
        return 200, {**answer, "confidence": confidence, "raw": raw, "latency_s": seconds}


class IntentModel(IntentRules):
    """Text -> (HTTP status, answer) in this process: constrained decoding on one llama.cpp context."""

    def __init__(self, backend: GGUFBackend, max_text_chars: int, products: list[str],
                 limits: fallback.Thresholds = fallback.Thresholds()):
        super().__init__(backend.stepper().tokenize, backend.llm.n_ctx(), max_text_chars, products, limits)
        self.backend = backend
        self.lock = threading.Lock()   # one llama context is not thread-safe
        backend.vocabulary()           # built once, before the first request

    def __call__(self, text: str) -> tuple[int, dict]:
        problem = self.check_text(text)
        if problem:
            return 422, {"detail": problem}
        began = time.perf_counter()
        with self.lock:
            [completion] = self.backend.generate([build_prompt(text.strip())], constrained=True,
                                                 products=self.products)
        return self.judge(completion, time.perf_counter() - began)
