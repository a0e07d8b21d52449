"""An OpenAI-compatible client for paid or remote models: bounded concurrency, retries with exponential
backoff on 429/5xx/timeouts (honouring Retry-After), refused connections retried only for a short grace
period (a dead endpoint fails in seconds, not minutes), a request budget, and an append-only on-disk cache
keyed by endpoint + model + request, so an interrupted or repeated run pays for nothing twice.

The API key is read from the environment variable named in the config and handed to the `openai`
client only; it is never part of a cache key, a cached record, a log line or a manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .artifacts import jsonl_lines
from .config import require
from .task import Completion

OPENAI_URL = "https://api.openai.com/v1"
CONNECT_GRACE_S = 10.0    # refused connections are retried this long in all (a server still starting), then given up
MAX_RETRY_AFTER_S = 120.0  # a longer Retry-After is not waited for


class ApiUnavailable(Exception):
    """The endpoint cannot be used (no key, unreachable after retries, refused, budget spent)."""


@dataclass
class ApiSettings:
    """How to reach an OpenAI-compatible endpoint: the `api` sub-table of every stage that calls one
    ([generate.api], [baseline.api])."""
    base_url: str = ""                 # "": OpenAI; any OpenAI-compatible /v1 URL otherwise
    key_env: str = "OPENAI_API_KEY"    # the variable's name; its value is never written anywhere
    mode: str = "chat"                 # "chat" or "completion"
    concurrency: int = 4
    max_retries: int = 6               # per request, on 429/5xx/timeouts
    backoff_s: float = 1.0             # first retry delay, doubled each time
    timeout_s: float = 60.0
    max_requests: int = 5000           # budget guard: new (uncached) requests in one run

    def validate(self) -> None:
        require(self.base_url == "" or self.base_url.startswith(("http://", "https://")), "base_url",
                '"" (OpenAI) or an http(s):// URL')
        require(self.key_env.replace("_", "").isalnum(), "key_env", "an environment variable name")
        require(self.mode in ("chat", "completion"), "mode", '"chat" or "completion"')
        for key in ("concurrency", "max_requests"):
            require(getattr(self, key) >= 1, key, "an integer >= 1")
        require(self.max_retries >= 0, "max_retries", "an integer >= 0")
        require(self.backoff_s >= 0, "backoff_s", "seconds >= 0")
        require(self.timeout_s > 0, "timeout_s", "seconds > 0")


CACHED_FIELDS = {"key": str, "text": str, "prompt_tokens": int, "completion_tokens": int, "seconds": (int, float)}


class ResponseCache:
    """Append-only JSONL: one line per paid answer, written as soon as it arrives."""

    def __init__(self, path: Path):
        self.path, self.lock, self.records = path, threading.Lock(), {}
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            for line in jsonl_lines(path.read_text(encoding="utf-8")):
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):
                    continue  # a line cut by an interrupt: that request is simply asked again
                if isinstance(record, dict) and all(isinstance(record.get(k), t) for k, t in CACHED_FIELDS.items()):
                    self.records[record["key"]] = record   # any other line (edited, foreign) is asked again too

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def put(self, record: dict) -> None:
        with self.lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            self.records[record["key"]] = record


def retry_after_s(err) -> float | None:
    """The server's Retry-After (seconds form) on a 429/503, if it sent one."""
    response = getattr(err, "response", None)
    try:
        return max(float(response.headers.get("retry-after")), 0.0) if response is not None else None
    except (TypeError, ValueError):
        return None


class OpenAICompatible:
    """One model behind one endpoint. `budget_key` names the setting that raises the request budget, for the
    message when it is spent (e.g. "baseline.api.max_requests")."""

    def __init__(self, model: str, settings: ApiSettings, cache: ResponseCache, budget_key: str, log=print):
        import openai
        self.base_url = (settings.base_url or OPENAI_URL).rstrip("/")
        key = os.environ.get(settings.key_env, "")
        if not key and self.base_url == OPENAI_URL:
            raise ApiUnavailable(f"{settings.key_env} is not set")
        self.client = openai.OpenAI(base_url=self.base_url, api_key=key or "not-needed", max_retries=0,
                                    timeout=settings.timeout_s)
        self.model, self.cache, self.mode = model, cache, settings.mode
        self.concurrency, self.max_retries, self.backoff_s = settings.concurrency, settings.max_retries, settings.backoff_s
        self.budget, self.budget_key, self.lock, self.log = settings.max_requests, budget_key, threading.Lock(), log
        self.stats = {"requests": 0, "retries": 0, "cache_hits": 0}

    def payload(self, prompt: str, max_tokens: int, extra: dict | None = None) -> dict:
        """The request body: greedy by default; `extra` adds or overrides fields (temperature, seed) and is
        part of the cache key like everything else in the body."""
        body = {"model": self.model, "temperature": 0, "max_tokens": max_tokens, **(extra or {})}
        if self.mode == "chat":
            return {**body, "messages": [{"role": "user", "content": prompt}]}
        return {**body, "prompt": prompt}

    def _key(self, payload: dict) -> str:
        return hashlib.sha256(json.dumps([self.base_url, payload], sort_keys=True).encode()).hexdigest()

    def _call(self, payload: dict):
        import openai
        waited = 0.0
        retryable = (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                     openai.APIConnectionError)
        for attempt in range(self.max_retries + 1):
            with self.lock:
                if self.budget <= 0:
                    raise ApiUnavailable(f"request budget ({self.budget_key}) spent")
                self.budget -= 1
                self.stats["requests"] += 1
            try:
                if self.mode == "chat":
                    return self.client.chat.completions.create(**payload)
                return self.client.completions.create(**payload)
            except retryable as err:
                delay = self.backoff_s * 2**attempt * (1 + random.random() / 4)
                refused = isinstance(err, openai.APIConnectionError) and not isinstance(err, openai.APITimeoutError)
                waited += delay
                hint = retry_after_s(err)
                if attempt == self.max_retries or (refused and waited > CONNECT_GRACE_S) or \
                        (hint is not None and hint > MAX_RETRY_AFTER_S):
                    raise ApiUnavailable(f"{self.base_url} failed {attempt + 1} times: {type(err).__name__}") from None
                delay = hint if hint is not None else delay
                with self.lock:
                    self.stats["retries"] += 1
                self.log(f"{self.model}: {type(err).__name__}, retry {attempt + 1}/{self.max_retries} in {delay:.1f} s")
                time.sleep(delay)
            except openai.APIStatusError as err:  # 400/401/403/404: retrying cannot help
                raise ApiUnavailable(f"{self.base_url} answered {err.status_code} for model {self.model}") from None

    def answer(self, prompt: str, max_tokens: int, extra: dict | None = None) -> Completion:
        payload = self.payload(prompt, max_tokens, extra)
        key = self._key(payload)
        cached = self.cache.get(key)
        if cached:
            with self.lock:
                self.stats["cache_hits"] += 1
            return Completion(cached["text"], cached["prompt_tokens"], cached["completion_tokens"],
                              cached["seconds"], cached=True)
        began = time.perf_counter()
        response = self._call(payload)
        text = self.reply_text(response)
        usage = getattr(response, "usage", None)
        record = {"key": key, "model": self.model, "text": text, "seconds": round(time.perf_counter() - began, 4),
                  "prompt_tokens": getattr(usage, "prompt_tokens", 0) or 0,
                  "completion_tokens": getattr(usage, "completion_tokens", 0) or 0}
        self.cache.put(record)
        return Completion(text, record["prompt_tokens"], record["completion_tokens"], record["seconds"])

    def reply_text(self, response) -> str:
        """The completion's text, or ApiUnavailable when a 200 reply holds none (`"choices": []`, an HTML page)."""
        try:
            choice = response.choices[0]
            text = choice.message.content if self.mode == "chat" else choice.text
        except (AttributeError, IndexError, TypeError):
            raise ApiUnavailable(f"{self.base_url} answered without a completion for model {self.model} "
                                 f"(not an OpenAI-compatible reply)") from None
        return text if isinstance(text, str) else ""

    def answer_all(self, prompts: list[str], max_tokens: int, on_done=None,
                   extras: list[dict] | None = None) -> list[Completion]:
        """Answers in prompt order (extras: one payload addition per prompt); the first unrecoverable error
        stops the rest (cached answers stay)."""
        stop = threading.Event()

        def one(prompt, extra):
            if stop.is_set():
                raise ApiUnavailable("stopped after an earlier failure")
            try:
                result = self.answer(prompt, max_tokens, extra)
            except ApiUnavailable:
                stop.set()
                raise
            if on_done:
                on_done()
            return result
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(one, prompts, extras or [None] * len(prompts)))
