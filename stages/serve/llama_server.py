"""serve's llama-server engine: llama.cpp's own HTTP server (built by `make venv` from the pinned llama.cpp) as
a child process on a private 127.0.0.1 port, with `serve.slots` sequences decoded together (continuous
batching) and each slot's prompt KV kept for the next request; and /v1/intent's decisions made on it, one
slot per intent. `serve` stands in front of it."""
from __future__ import annotations

import http.client
import json
import os
import queue
import threading
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from stages.lib.child import Child, free_port
from stages.lib.constrained import Stepper, Vocabulary, decode
from stages.lib.llama_cpp_tools import server_binary
from stages.lib.task import build_prompt


class ServerFailed(Exception):
    """llama-server answered a decision call badly, or not at all."""


class LlamaServer(Child):
    """`with LlamaServer(gguf, cfg, alias) as server:` -- server.url answers once the model is loaded (/health);
    the process is stopped on the way out; its log is a file with no name, shown only when it fails."""

    def __init__(self, gguf: Path, cfg, alias: str):
        self.cfg, self.port = cfg, free_port(avoid=cfg.port)
        self.url = f"http://127.0.0.1:{self.port}"
        threads = cfg.threads or len(os.sched_getaffinity(0))
        command = [str(server_binary()), "--model", str(gguf), "--alias", alias,
                   "--host", "127.0.0.1", "--port", str(self.port), "--parallel", str(cfg.slots),
                   "--ctx-size", str(cfg.slots * cfg.n_ctx), "--no-kv-unified", "--threads", str(threads),
                   "--threads-batch", str(threads), "--metrics", "--no-webui", "--jinja", "--log-verbosity", "2"]
        super().__init__(command, None, "llama-server", self.healthy, cfg.startup_timeout_s,
                         "serve.startup_timeout_s")

    def healthy(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:   # 503 while loading
            return reply.status == 200

    def slot_context(self) -> int:
        """Tokens of context each slot really has: llama-server caps serve.n_ctx at the model's training context,
        and the front must check texts against that, not the asked-for size (a longer one failed as a 502)."""
        with urllib.request.urlopen(f"{self.url}/slots", timeout=10) as reply:
            return min(int(slot["n_ctx"]) for slot in json.loads(reply.read()))


class Cancelled(Exception):
    """The client hung up: no more decisions for its intent, and its slot goes back to the pool."""


class SlotStepper(Stepper):
    """The constrained decoder's model decisions made by llama-server on one slot: the sequence so far as
    tokens (the slot's KV cache keeps the common prefix, so only new tokens are computed, batched with the
    other slots' work), one greedy token among the allowed ones (each gets a +100 logit bias: their order is
    the model's, and no other token can win; the reply is checked)."""
    BIAS = 100.0

    def __init__(self, connection: http.client.HTTPConnection, slot: int, tokenize, cancelled: threading.Event,
                 prompt_cache: bool = True):
        self.connection, self.slot, self.tokenize, self.cancelled = connection, slot, tokenize, cancelled
        self.prompt_cache = prompt_cache

    def best(self, ids: list[int], allowed: list[int]) -> int:
        if self.cancelled.is_set():
            raise Cancelled
        body = {"prompt": ids, "n_predict": 1, "temperature": 0.0, "id_slot": self.slot, "cache_prompt": self.prompt_cache,
                "return_tokens": True, "logit_bias": [[token, self.BIAS] for token in allowed]}
        for attempt in (1, 2):   # a kept-alive connection llama-server closed while idle: once more, anew
            try:
                self.connection.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
                reply = self.connection.getresponse()
                data = reply.read()
                break
            except (OSError, http.client.HTTPException) as err:
                self.connection.close()   # the next request opens a new connection
                if attempt == 2 or not isinstance(err, (ConnectionError, http.client.RemoteDisconnected)):
                    raise ServerFailed(f"llama-server did not answer ({type(err).__name__}: {err})") from None
        if reply.status != 200:
            raise ServerFailed(f"llama-server answered {reply.status}: {data[:300].decode(errors='replace')}")
        token = json.loads(data)["tokens"][0]
        if token not in allowed:
            raise ServerFailed(f"llama-server chose token {token}, outside the {len(allowed)} allowed")
        return token


class IntentDecoder:
    """Text -> the constrained answer text, decided on llama-server: an intent takes a free slot for all its
    decisions (each one then reuses the slot's KV of the last), so `serve.slots` intents run together and
    the rest wait here."""

    def __init__(self, server: LlamaServer, tokenize, vocabulary: Vocabulary, schema):
        self.tokenize, self.vocabulary, self.schema = tokenize, vocabulary, schema
        self.prompt_cache = server.cfg.prompt_cache
        self.free: queue.Queue = queue.Queue()
        for slot in range(server.cfg.slots):
            self.free.put((slot, http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)))

    @contextmanager
    def slot(self):
        taken = self.free.get()
        try:
            yield taken
        finally:
            self.free.put(taken)

    def __call__(self, text: str, cancelled: threading.Event) -> str:
        with self.slot() as (slot, connection):
            stepper = SlotStepper(connection, slot, self.tokenize, cancelled, self.prompt_cache)
            return decode(stepper, self.vocabulary, self.schema, build_prompt(text.strip())).text
