"""The API client's retry policy against real sockets on 127.0.0.1: a dead endpoint is given up within the
connect grace period; a 429 with Retry-After is retried after the time the server asked for."""
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stages.lib import api_client
from stages.lib.api_client import ApiSettings, ApiUnavailable, OpenAICompatible, ResponseCache

ANSWER = {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
          "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "{}"}}],
          "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(port, tmp_path, logs, **kwargs):
    settings = ApiSettings(base_url=f"http://127.0.0.1:{port}/v1", key_env="NO_SUCH_KEY_VARIABLE", timeout_s=5, **kwargs)
    return OpenAICompatible("m", settings, ResponseCache(tmp_path / "cache.jsonl"), "test.max_requests", log=logs.append)


def test_dead_endpoint_fails_within_the_connect_grace(tmp_path, monkeypatch):
    monkeypatch.setattr(api_client, "CONNECT_GRACE_S", 1.0)
    logs = []
    api = client(closed_port(), tmp_path, logs, max_retries=30, backoff_s=0.2)
    began = time.perf_counter()
    with pytest.raises(ApiUnavailable, match="APIConnectionError"):
        api.answer("add 3 soaps", 8)
    assert time.perf_counter() - began < 5 and api.stats["retries"] < 5  # not 30 retries with backoff


def test_rate_limit_waits_for_retry_after(tmp_path):
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            calls.append(time.perf_counter())
            first = len(calls) == 1
            body = json.dumps({"error": {"message": "slow down"}} if first else ANSWER).encode()
            self.send_response(429 if first else 200)
            if first:
                self.send_header("Retry-After", "0.6")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        logs = []
        answer = client(server.server_address[1], tmp_path, logs, max_retries=3, backoff_s=0.01).answer("hi", 4)
    finally:
        server.shutdown()
    assert answer.text == "{}" and len(calls) == 2 and calls[1] - calls[0] >= 0.55
    assert "RateLimitError, retry 1/3 in 0.6 s" in logs[0]


def test_payload_extras_are_part_of_the_request_and_its_cache_key(tmp_path):
    api = client(closed_port(), tmp_path, [])
    plain, seeded = api.payload("hi", 4), api.payload("hi", 4, {"temperature": 1.0, "seed": 7})
    assert plain == {"model": "m", "temperature": 0, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    assert seeded == {**plain, "temperature": 1.0, "seed": 7}
    assert len({api._key(plain), api._key(seeded), api._key(api.payload("hi", 4, {"temperature": 1.0, "seed": 8}))}) == 3
