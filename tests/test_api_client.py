"""The API client's retry policy against real sockets on 127.0.0.1: a dead endpoint is given up within the
connect grace period; a 429 with Retry-After is retried after the time the server asked for."""
import json
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cart_intent import api_client
from cart_intent.api_client import ApiSettings, ApiUnavailable, OpenAICompatible, ResponseCache

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


@contextmanager
def endpoint(reply):
    """An HTTP server on a free 127.0.0.1 port answering every POST with reply() -> (status, headers, body);
    yields its port, shut down after the block."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            status, headers, body = reply()
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **headers, "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def test_rate_limit_waits_for_retry_after(tmp_path):
    calls = []

    def reply():
        calls.append(time.perf_counter())
        if len(calls) == 1:
            return 429, {"Retry-After": "0.6"}, json.dumps({"error": {"message": "slow down"}}).encode()
        return 200, {}, json.dumps(ANSWER).encode()

    logs = []
    with endpoint(reply) as port:
        answer = client(port, tmp_path, logs, max_retries=3, backoff_s=0.01).answer("hi", 4)
    assert answer.text == "{}" and len(calls) == 2 and calls[1] - calls[0] >= 0.55
    assert "RateLimitError, retry 1/3 in 0.6 s" in logs[0]


def test_payload_extras_are_part_of_the_request_and_its_cache_key(tmp_path):
    api = client(closed_port(), tmp_path, [])
    plain, seeded = api.payload("hi", 4), api.payload("hi", 4, {"temperature": 1.0, "seed": 7})
    assert plain == {"model": "m", "temperature": 0, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    assert seeded == {**plain, "temperature": 1.0, "seed": 7}
    assert len({api._key(plain), api._key(seeded), api._key(api.payload("hi", 4, {"temperature": 1.0, "seed": 8}))}) == 3


@pytest.mark.parametrize("content_type, body", [
    ("application/json", json.dumps({**ANSWER, "choices": []})),
    ("text/html", "<html><body>Service Unavailable</body></html>"),
])
def test_a_200_reply_without_a_completion_is_one_line_not_a_traceback(tmp_path, content_type, body):
    with endpoint(lambda: (200, {"Content-Type": content_type}, body.encode())) as port:
        with pytest.raises(ApiUnavailable, match="without a completion for model m"):
            client(port, tmp_path, [], max_retries=0).answer("hi", 4)


def test_a_corrupt_cache_line_is_asked_again_not_a_crash(tmp_path):
    good = {"key": "k1", "model": "m", "text": "{}", "seconds": 0.1, "prompt_tokens": 3, "completion_tokens": 1}
    lines = [json.dumps(good), "[1, 2]", json.dumps({"key": "k2", "text": None}), '{"key": "k3", "te']
    (tmp_path / "cache.jsonl").write_text("\n".join(lines) + "\n")
    cache = ResponseCache(tmp_path / "cache.jsonl")
    assert cache.get("k1") == good and cache.get("k2") is None and cache.get("k3") is None
