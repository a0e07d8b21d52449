"""llama.cpp's own HTTP server (built by `make venv` from the pinned llama.cpp) as a child process on a private
127.0.0.1 port, with `slots` sequences decoded together (continuous batching) and each slot's prompt KV kept for
the next request. Models answer on it through cart_intent.backends.LlamaServerBackend: serve's default engine
(one slot per intent, serve stands in front of it) and evaluate with `evaluate.gguf_slots` > 1."""
from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

from cart_intent.child import Child, free_port
from cart_intent.llama_cpp_tools import server_binary


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
