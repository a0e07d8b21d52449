"""generate's LLM backend (metaprompting): prompts and reply checks on hand-written replies, then real runs
against llama-cpp-python's OpenAI-compatible server on 127.0.0.1 with the smoke GGUF as the "LLM": a budget
that runs out (nothing published), a resume from the cache, a rerun that asks nothing and gives the same files."""
import json
import os
import random
import subprocess
import sys

import pytest

from conftest import ROOT, SMOKE
from stages.generate import metaprompt
from cart_intent.catalog import load_catalog

SECRET = "sk-test-do-not-write-me-4343"
CATALOG = load_catalog()
GOLD = {"lang": "hr", "action": "add", "product": "Lip Balm", "quantity": 3}


@pytest.mark.parametrize("reply, reason", [
    ("Dodaj 3 balzama za usne u košaricu, hvala!", None),
    ('"bok, ubaci mi tri labela 😊"', None),
    ("", "empty"),
    ("Dodaj 3 balzama za usne.\nDodaj 3 balzama za usne.", "several_messages"),
    ("Please add 3 lip balms to my cart, thanks", "wrong_language"),
    ("Dodaj 3 šampona u košaricu", "product_missing"),
    ("Dodaj balzam za usne u košaricu", "quantity_missing"),
    ("Makni 3 balzama za usne iz košarice", "contradicts_action"),
    ("x" * 301, "too_long"),
])
def test_reply_checks(reply, reason):
    assert metaprompt.check_reply(reply, GOLD, CATALOG) == reason


def test_other_languages_and_number_words():
    gold = {"lang": "es", "action": "remove", "product": "Lip Balm", "quantity": 12}
    assert metaprompt.check_reply("quita una docena de bálsamos labiales porfa", gold, CATALOG) is None
    assert metaprompt.check_reply("Quita 12 protectores labiales del carrito", gold, CATALOG) is None
    assert metaprompt.check_reply("añade 12 bálsamos labiales", gold, CATALOG) == "contradicts_action"
    gold = {"lang": "en", "action": "add", "product": "Lip Balm", "quantity": 2}
    assert metaprompt.check_reply("yo throw two chapsticks in my cart pls", gold, CATALOG) is None


def test_prompt_is_a_function_of_seed_example_and_attempt():
    def request(seed, i, k):
        rng = random.Random(f"{seed}/{i}/{k}")
        style, noise = metaprompt.plan(rng, "hr", {"typo": 0.5, "emoji": 0.5, "code_switch": 0.5})
        return metaprompt.build_prompt(GOLD, style, noise, CATALOG), rng.randrange(2**31)
    assert request(1, 0, 0) == request(1, 0, 0)
    assert request(1, 0, 0) != request(1, 0, 1)
    text, _ = request(1, 0, 0)
    assert "Croatian" in text and "balzam za usne" in text and "3" in text and "add" in text


def generate(artifacts_dir, *sets, check=None):
    """30 cart messages (no out-of-scope ones unless asked: the LLM rewrites cart messages only)."""
    cmd = [sys.executable, "-m", "stages.generate", "--config", SMOKE, "--set", f"run.artifacts_dir='{artifacts_dir}'",
           "--force", "--set", "generate.n_examples=30", "--set", "generate.none_share=0"]
    for item in sets:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OPENAI_API_KEY": SECRET})
    if check is not None:
        assert proc.returncode == check, proc.stderr[-3000:]
    return proc


def test_bad_backend_is_a_config_error(tmp_path):
    proc = generate(tmp_path, "generate.backend='gpt'", check=2)
    assert "generate.backend" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.integration
def test_budget_stop_resume_from_cache_and_identical_rerun(quantized, tmp_path):
    from cart_intent.child import free_port
    from test_baseline import start_server, wait_ready
    port = free_port()
    llm = [f"generate.api.base_url='http://127.0.0.1:{port}/v1'", "generate.llm_model='smoke-gguf'",
           "generate.llm_max_attempts=2", "generate.api.concurrency=3", "generate.llm_max_tokens=24",
           "generate.api.backoff_s=0.2", "generate.api.max_retries=2"]
    server = start_server(quantized / "gguf" / "tiny" / "model-Q4_K_M.gguf", port)
    try:
        wait_ready(port, server)
        run_dir = tmp_path / "smoke"
        # mixed: 15 of 30 examples by the LLM; a budget of 10 new requests stops it in the first round
        stopped = generate(tmp_path, "generate.backend='mixed'", "generate.llm_share=0.5",
                           "generate.api.max_requests=10", *llm, check=1)
        assert "generate.api.max_requests" in stopped.stderr and "Traceback" not in stopped.stderr
        assert "15 of 30 examples" in stopped.stderr and "requests" in stopped.stderr   # the estimate, first
        assert not (run_dir / "data").exists()                                         # nothing published
        cached = (run_dir / ".cache" / "api" / "generate.jsonl").read_text().splitlines()
        assert len(cached) == 10

        generate(tmp_path, "generate.backend='mixed'", "generate.llm_share=0.5", *llm, check=0)
        stats = json.loads((run_dir / "data" / "stats.json").read_text())["llm"]
        assert stats["examples"] == 15 and stats["cache_hits"] == 10       # resumed: nothing asked twice
        assert stats["accepted"] + stats["fallback_to_template"] == 15
        assert sum(stats["rejected"].values()) + stats["accepted"] == stats["attempts"]
        assert 15 <= stats["attempts"] <= 30 and stats["requests"] == stats["attempts"] - 10
        rows = [json.loads(line) for part in ("train", "val", "test")
                for line in (run_dir / "data" / f"{part}.jsonl").read_text().splitlines()]
        assert len(rows) == 30 and {r["source"] for r in rows} <= {"template", "llm"}
        assert sum(r["source"] == "llm" for r in rows) == stats["accepted"]
        card = (run_dir / "data" / "README.md").read_text()
        assert "rejection reason" in card and "mixed backend" in card
        files = {p: (run_dir / "data" / p).read_bytes() for p in ("train.jsonl", "val.jsonl", "test.jsonl")}

        generate(tmp_path, "generate.backend='mixed'", "generate.llm_share=0.5", *llm, check=0)   # same seed
        again = json.loads((run_dir / "data" / "stats.json").read_text())["llm"]
        assert again["requests"] == 0 and again["cache_hits"] == stats["attempts"]
        assert files == {p: (run_dir / "data" / p).read_bytes() for p in files}

        # every example through the LLM; the tiny model's replies are JSON-like, so most are rejected
        generate(tmp_path, "generate.backend='llm'", *llm, check=0)
        stats = json.loads((run_dir / "data" / "stats.json").read_text())["llm"]
        assert stats["examples"] == 30 and sum(stats["rejected"].values()) >= 1
        print(f"\nsmoke-GGUF as the LLM: {stats['accepted']}/30 accepted, rejected {stats['rejected']}")

        # out-of-scope messages keep their template text: only cart messages go to the LLM
        generate(tmp_path, "generate.backend='llm'", "generate.none_share=0.3", *llm, check=0)
        stats = json.loads((run_dir / "data" / "stats.json").read_text())["llm"]
        rows = [json.loads(line) for part in ("train", "val", "test")
                for line in (run_dir / "data" / f"{part}.jsonl").read_text().splitlines()]
        outside = [r for r in rows if r["action"] == "none"]
        assert outside and all(r["source"] == "template" for r in outside)
        assert stats["examples"] == len(rows) - len(outside)
    finally:
        server.terminate()
        server.wait(timeout=30)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="ignore"), path
