"""serve and predict on the smoke run's Q4_K_M GGUF: the server on a free 127.0.0.1 port, with either engine
(llama-server behind this project's front, and llama-cpp-python in process), answers valid and invalid
/v1/intent requests, the OpenAI-compatible routes, and a bounded load test with no failure; a client that
hangs up frees its llama-server slot; the loadtest stage measures both engines."""
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import ROOT, SMOKE
from cart_intent.catalog import load_catalog
from cart_intent.child import free_port

pytestmark = pytest.mark.integration
MAX_CHARS = 200


def command(name, artifacts_dir, *sets):
    cmd = [sys.executable, "-m", f"stages.{name}", "--config", SMOKE, "--set", f"run.artifacts_dir='{artifacts_dir}'",
           "--set", f"serve.max_text_chars={MAX_CHARS}"]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def post(port, body, timeout=60):
    """(status, decoded JSON answer) for a POST to /v1/intent; body bytes are sent as they are."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/intent", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@contextmanager
def running_server(quantized, *sets):
    """serve on a free port until the block ends; yields (port, process)."""
    port = free_port()
    proc = subprocess.Popen(command("serve", quantized.parent, f"serve.port={port}", "serve.threads=2", *sets),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, f"server exited: {proc.stderr.read()[-2000:]}"
            assert time.time() < deadline, "server did not start within 120 s"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except urllib.error.HTTPError:
                break   # it answers (401 when it asks for a key)
            except OSError:
                time.sleep(0.3)
        yield port, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module", params=["llama-server", "llama-cpp-python"])
def server(request, quantized):
    with running_server(quantized, f'serve.engine="{request.param}"') as (port, _):
        yield port


def assert_intent(answer):
    if answer["action"] == "none":   # the none-form: no cart operation
        assert answer["product"] is None and answer["quantity"] is None
    else:
        assert answer["action"] in ("add", "remove")
        assert answer["product"] in load_catalog().names
        assert isinstance(answer["quantity"], int) and answer["quantity"] >= 1
    assert isinstance(answer["raw"], str) and answer["latency_s"] >= 0
    confidence = answer["confidence"]
    assert 0 < confidence["overall"] <= min(confidence["action"], confidence["product"], confidence["quantity"]) <= 1


def test_intent_answers_schema_checked_json(server):
    for text in ("dodaj 3 paste za zube", "add two lip balms please", "quita 4 jabones del carrito"):
        status, answer = post(server, {"text": text})
        assert status == 200, answer
        assert_intent(answer)


@pytest.mark.parametrize("body, needle", [
    ({}, "text"),                                  # no text
    ({"text": ""}, "empty"),
    ({"text": "   \n "}, "empty"),
    ({"text": "x" * (MAX_CHARS + 1)}, "longer than"),
    ({"text": "\U0001F600" * MAX_CHARS}, "tokens"),          # within the characters, over the context
    ({"text": "add \ud800 2 soaps"}, "unicode"),             # a lone surrogate: valid JSON, not UTF-8
    ({"text": 42}, "text"),                        # not a string
    ({"text": ["add", "3"]}, "text"),
    ({"text": "add 3 soaps", "extra": 1}, "extra"),
    (b"add 3 soaps", "json"),                      # not JSON
    (b'{"text": "add 3', "json"),                  # broken JSON
    (b"[1, 2]", ""),                               # JSON, not an object
    (b'{"text": NaN}', "nan"),                     # Python's parser takes it; no JSON encoder gives it back
])
def test_bad_requests_get_a_4xx_with_a_message(server, body, needle):
    status, answer = post(server, body)
    assert 400 <= status < 500, (status, answer)
    assert answer.get("detail"), answer
    assert needle in json.dumps(answer).lower()


def test_openai_compatible_routes(server):
    from openai import OpenAI
    client = OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="unused", max_retries=0, timeout=60)
    [model] = [m.id for m in client.models.list().data]
    assert model.endswith("-Q4_K_M")
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "add 3 soaps"}],
                                           max_tokens=8, temperature=0)
    assert reply.choices[0].message.content is not None and reply.usage.completion_tokens <= 8
    done = client.completions.create(model=model, prompt="Message: add 3 soaps\nJSON:", max_tokens=8)
    assert isinstance(done.choices[0].text, str)
    status, answer = post(server, {"text": "add 3 soaps"})   # the shared context still answers intents
    assert status == 200, answer


def test_chat_route_answers_as_the_model_and_the_intent_route(server, quantized):
    """One user message on /v1/chat/completions: the GGUF's chat template sends the training prompt, so the
    answer is the free-decoding one; with the answer's JSON Schema as response_format (either OpenAI form),
    the answer is /v1/intent's (schema-constrained), and schema-valid."""
    from openai import OpenAI
    from cart_intent.backends import GGUFBackend
    from cart_intent.task import build_prompt, parse_output, read_split
    client = OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="unused", max_retries=0, timeout=120)
    [model] = [m.id for m in client.models.list().data]
    schema = json.loads((quantized / "gguf" / "tiny" / "schema.json").read_text())
    texts = [ex["text"] for ex in read_split(quantized, "test")[:12]]
    free = GGUFBackend(quantized / "gguf" / "tiny" / "model-Q4_K_M.gguf", n_threads=1).generate(
        [build_prompt(t) for t in texts])
    formats = ({"type": "json_object", "schema": schema},
               {"type": "json_schema", "json_schema": {"name": "cart_intent", "schema": schema}})
    for text, completion in zip(texts, free):
        def chat(**extra):
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                                   max_tokens=48, temperature=0, **extra)
            return parse_output(reply.choices[0].message.content)
        assert chat() == parse_output(completion.text)
        status, intent = post(server, {"text": text})
        expected = {k: intent[k] for k in ("action", "product", "quantity")} if status == 200 else None
        for response_format in formats:
            assert chat(response_format=response_format) == expected, (text, response_format["type"])


def test_a_hostile_grammar_is_a_4xx_and_the_server_lives(server, quantized):
    """A left-recursive grammar crashed llama.cpp inside the serving process (SIGSEGV) on the in-process engine;
    llama-server rejects it in its own process. Either way: a 4xx, and the server answers the next intent."""
    hostile = {"prompt": "x", "max_tokens": 4, "grammar": 'root ::= root "a" | "a"'}
    for path, body in (("/v1/completions", hostile),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
                                                 "grammar": 'root ::= root "a" | "a"'})):
        req = urllib.request.Request(f"http://127.0.0.1:{server}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=60)
        assert 400 <= refused.value.code < 500, path
    schema = json.loads((quantized / "gguf" / "tiny" / "schema.json").read_text())
    answer_format = {"type": "json_schema", "json_schema": {"name": "cart_intent", "schema": schema}}
    req = urllib.request.Request(f"http://127.0.0.1:{server}/v1/chat/completions", headers={
        "Content-Type": "application/json"}, data=json.dumps({"messages": [{"role": "user", "content": "add 3 soaps"}],
                                                              "max_tokens": 48, "response_format": answer_format}).encode())
    assert urllib.request.urlopen(req, timeout=120).status == 200   # the answer's own schema still decodes
    status, answer = post(server, {"text": "add 3 soaps"})
    assert status == 200, answer


@pytest.mark.parametrize("body", [
    {"response_format": {"type": "json_schema", "json_schema": "x"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "x"}}},
    {"response_format": {"type": "yaml"}},
    {"response_format": "json"},
    {"response_format": {"type": "json_object", "schema": ["x"]}},
    {"temperature": float("nan")},
    {"messages": [{"role": "user", "content": [[]]}], "tools": [[[[]]]]},
    {"deep": True},
])
def test_malformed_chat_requests_are_a_4xx(server, body):
    if body.get("deep"):
        data = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    else:
        data = json.dumps({"messages": [{"role": "user", "content": "add 3 soaps"}], "max_tokens": 4, **body}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{server}/v1/chat/completions", data=data,
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=60)
    assert 400 <= refused.value.code < 500, (refused.value.code, refused.value.read()[:300])


def test_logit_bias_keys_per_engine(server, request):
    """llama-server reads a key that is not a token id as token text; llama-cpp-python's app called int() on it
    and answered 500: a 400 there now."""
    in_process = request.node.callspec.params["server"] == "llama-cpp-python"
    for bias in ({"x": 1}, {"1.5": 1}):
        body = {"messages": [{"role": "user", "content": "add 3 soaps"}], "max_tokens": 2, "logit_bias": bias}
        req = urllib.request.Request(f"http://127.0.0.1:{server}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            status = urllib.request.urlopen(req, timeout=60).status
        except urllib.error.HTTPError as err:
            status = err.code
        assert status == (400 if in_process else 200), (bias, status)


def test_text_over_the_slot_context_is_a_4xx_on_llama_server(quantized):
    """serve.n_ctx above the model's training context (the smoke base: 256): llama-server caps each slot there,
    and the front must check texts against that cap (a text between the two was a 502 after decoding began)."""
    with running_server(quantized, 'serve.engine="llama-server"', "serve.n_ctx=4096", "serve.slots=1") as (port, _):
        status, answer = post(port, {"text": "add 3 soaps " + "\U0001F9F4" * 60})
        assert 400 <= status < 500 and "tokens" in answer["detail"], (status, answer)
        assert post(port, {"text": "add 3 soaps"})[0] == 200


def request(port, path, method="GET", body=None, headers=None):
    """(status, headers) of one request, errors included."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, headers=headers or {},
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}


@pytest.mark.parametrize("engine", ["llama-server", "llama-cpp-python"])
def test_no_cors_but_the_configured_origins_and_an_api_key_on_every_route_but_health(quantized, engine, monkeypatch):
    """Any web page could drive the server: llama-server's and llama-cpp-python's allow-any-origin headers went
    through. Now only serve.cors_origins get CORS headers, and serve.api_key_env asks for a bearer key."""
    monkeypatch.setenv("CART_TEST_KEY", "s3cret-key")
    sets = (f'serve.engine="{engine}"', 'serve.cors_origins=["https://shop.example"]', 'serve.api_key_env="CART_TEST_KEY"')
    with running_server(quantized, *sets) as (port, _):
        key = {"Authorization": "Bearer s3cret-key", "Content-Type": "application/json"}
        assert request(port, "/health")[0] == 200   # no key: load balancers and the image's HEALTHCHECK
        assert request(port, "/v1/intent", "POST", {"text": "add 3 soaps"}, {"Content-Type": "application/json"})[0] == 401
        assert request(port, "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert request(port, "/v1/intent", "POST", {"text": "add 3 soaps"}, key)[0] == 200
        for path in ("/v1/models", "/slots") if engine == "llama-server" else ("/v1/models",):
            status, headers = request(port, path, headers={**key, "Origin": "http://evil.example"})
            assert status == 200 and not [h for h in headers if h.startswith("access-control-")], (path, headers)
        preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
        status, headers = request(port, "/v1/intent", "OPTIONS", headers=preflight)
        assert status == 400 and "access-control-allow-origin" not in headers
        status, headers = request(port, "/v1/intent", "OPTIONS", headers={**preflight, "Origin": "https://shop.example"})
        assert status == 200 and headers["access-control-allow-origin"] == "https://shop.example"
        assert "access-control-allow-credentials" not in headers


@pytest.mark.parametrize("engine", ["llama-server", "llama-cpp-python"])
def test_a_stopped_server_exits_130_and_leaves_no_log(quantized, engine, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))   # where llama-server's log would be left
    with running_server(quantized, f'serve.engine="{engine}"') as (_, proc):
        proc.terminate()
        assert proc.wait(timeout=60) == 130, proc.stderr.read()[-2000:]
    assert not list(tmp_path.glob("llama-server-*"))


def test_served_threads_sleep_while_they_wait_unless_told(quantized, monkeypatch):
    """serve's llama-server child runs with OMP_WAIT_POLICY=PASSIVE (fair beside other load); a value the user
    set is kept."""
    for given, expected in ((None, b"OMP_WAIT_POLICY=PASSIVE"), ("ACTIVE", b"OMP_WAIT_POLICY=ACTIVE")):
        if given:
            monkeypatch.setenv("OMP_WAIT_POLICY", given)
        else:
            monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        with running_server(quantized, 'serve.engine="llama-server"') as (_, proc):
            children = [p for p in Path("/proc").iterdir() if p.name.isdigit() and (p / "stat").exists()
                        and (p / "stat").read_text().rsplit(")", 1)[1].split()[1] == str(proc.pid)]
            environments = [(p / "environ").read_bytes().split(b"\0") for p in children]
            assert [env for env in environments if expected in env], environments


def test_a_killed_server_leaves_no_log_behind(quantized, tmp_path, monkeypatch):
    """SIGKILL gives serve no way out: its llama-server child dies with it, and its log has no name to leave."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    with running_server(quantized, 'serve.engine="llama-server"') as (_, proc):
        proc.kill()
        assert proc.wait(timeout=60) == -9
    time.sleep(1)   # the kernel's SIGTERM to the orphaned child (PR_SET_PDEATHSIG)
    assert not list(tmp_path.iterdir())


def test_a_missing_api_key_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("CART_TEST_KEY", raising=False)
    proc = subprocess.run(command("serve", tmp_path, 'serve.api_key_env="CART_TEST_KEY"'), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "CART_TEST_KEY is not set" in proc.stderr and "Traceback" not in proc.stderr


def test_bounded_load_200_requests_8_clients(server):
    texts = ["dodaj 3 paste za zube", "add two lip balms", "quita 4 jabones", "remove 1 shampoo"]

    def one(i):
        began = time.perf_counter()
        status, answer = post(server, {"text": texts[i % len(texts)]}, timeout=120)
        return status, answer, time.perf_counter() - began

    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(200)))
    seconds = time.perf_counter() - began
    failed = [(s, a) for s, a, _ in results if s != 200]
    assert not failed, failed[:3]
    for _, answer, _ in results:
        assert_intent(answer)
    latencies = sorted(t for _, _, t in results)
    p95 = latencies[int(0.95 * len(latencies)) - 1]
    print(f"\nload test: 200 requests, 8 clients: {200 / seconds:.1f} requests/s, P95 {p95 * 1000:.0f} ms")


def get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
        return json.loads(reply.read())


def wait_for(condition, what, seconds=60):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"{what} within {seconds} s"
        time.sleep(0.1)


def test_client_hanging_up_frees_its_llama_server_slot(quantized):
    """One slot, a completion that would decode 15,000 tokens: the client closes its connection once the slot
    is busy; the slot stops decoding (far short of 15,000) and answers the next request."""
    long_request = {"prompt": "add 3 soaps", "max_tokens": 15000, "ignore_eos": True, "temperature": 0}
    with running_server(quantized, "serve.slots=1", "serve.n_ctx=16384") as (port, proc):
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        body = json.dumps(long_request).encode()
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_for(lambda: get(port, "/slots")[0]["is_processing"], "the slot took the request")
        client.close()
        wait_for(lambda: not get(port, "/slots")[0]["is_processing"], "the slot was freed")
        [slot] = get(port, "/slots")
        assert slot["next_token"][0]["n_decoded"] < 15000, slot["next_token"]
        status, answer = post(port, {"text": "dodaj 3 paste za zube"})
        assert status == 200, answer
        assert proc.poll() is None


def test_loadtest_measures_both_engines(quantized):
    """The loadtest stage on the smoke run: both engines at 1 and 4 clients, every request answered, the
    answers of the batched server the same as its own at 1 client, results as JSON and CSV."""
    proc = subprocess.run(command("loadtest", quantized.parent, "serve.threads=2", "loadtest.requests=24",
                                  "loadtest.clients=[1, 4]", "loadtest.warmup=2"),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [folder] = (quantized / "profiles").glob("*/serve")
    results = json.loads((folder / "results.json").read_text())
    rows = {(r["engine"], r["clients"]): r for r in results["rows"]}
    assert set(rows) == {(e, c) for e in ("llama-server", "llama-cpp-python") for c in (1, 4)}
    for row in rows.values():
        assert row["requests"] == 24 and row["errors"] == 0, row
        assert row["requests_per_s"] > 0 and row["latency_p50_s"] <= row["latency_p95_s"] <= row["latency_p99_s"]
        assert row["same_as_1_client"] == 1.0, row
    assert rows["llama-server", 1]["exact_match"] == rows["llama-cpp-python", 1]["exact_match"]
    assert [r["clients"] for r in results["ratios"]] == [1, 4]
    header = (folder / "results.csv").read_text().splitlines()[0].split(",")
    assert {"engine", "clients", "requests_per_s", "latency_p95_s", "errors", "exact_match"} <= set(header)
    assert len(list((folder / "requests").glob("*.jsonl"))) == 4


def test_predict_one_text_and_stdin_lines(quantized):
    proc = subprocess.run(command("predict", quantized.parent, "serve.threads=2") + ["--text", "dodaj 3 paste za zube"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [line] = proc.stdout.splitlines()
    answer = json.loads(line)
    assert answer["text"] == "dodaj 3 paste za zube"
    assert_intent(answer)

    lines = ["add two lip balms", "", "quita 4 jabones", "x" * (MAX_CHARS + 5)]
    proc = subprocess.run(command("predict", quantized.parent, "serve.threads=2"), input="\n".join(lines) + "\n",
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [a["text"] for a in answers] == [lines[0], lines[2], lines[3]]
    assert_intent(answers[0])
    assert_intent(answers[1])
    assert "longer than" in answers[2]["error"]

    # lines that cannot be answered get an error object each; the lines after them are still answered
    raw = b"\xff\xfe add 3\n" + ("\U0001F600" * MAX_CHARS).encode() + b"\nadd two lip balms\n"
    proc = subprocess.run(command("predict", quantized.parent, "serve.threads=2"), input=raw, cwd=ROOT,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr[-2000:]
    answers = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert "UTF-8" in answers[0]["error"] and "tokens" in answers[1]["error"]
    assert_intent(answers[2])


def test_the_fallback_turns_a_doubtful_answer_into_the_none_form_with_candidates(quantized):
    """Rasa's two knobs: below the confidence threshold, or with a runner-up product too close, the reply is the
    none-form with the reason and the candidates, the model's own answer first."""
    texts = ["dodaj 3 paste za zube", "add two lip balms"]
    plain, doubtful, ambiguous = ([json.loads(line) for line in subprocess.run(
        command("predict", quantized.parent, "serve.threads=2", *knobs), input="\n".join(texts) + "\n", cwd=ROOT,
        capture_output=True, text=True, timeout=300, check=True).stdout.splitlines()]
        for knobs in (("serve.fallback='off'",), ("serve.fallback='config'", "serve.fallback_threshold=1.0"),
                      ("serve.fallback='config'", "serve.ambiguity_margin=1.0")))
    for answer, low, close in zip(plain, doubtful, ambiguous):
        assert_intent(answer)
        assert_intent(low)
        if answer["action"] == "none":   # already no cart operation: nothing to fall back from
            assert "fallback" not in low and "fallback" not in close
            continue
        model_answer = {k: answer[k] for k in ("action", "product", "quantity")}
        assert low["fallback"] == "low_confidence" and low["action"] == "none" and low["product"] is None
        assert {k: low["candidates"][0][k] for k in model_answer} == model_answer
        assert low["candidates"][0]["confidence"] == answer["confidence"]["overall"]
        if answer["confidence"]["runner_up"]:
            assert close["fallback"] == "ambiguous"
            assert [c["product"] for c in close["candidates"][1:]] == [
                p for p in answer["confidence"]["runner_up"]["products"] if p != answer["product"]]


def test_a_truncated_gguf_exits_3_in_predict_and_serve(quantized, tmp_path):
    """serve and predict check the file against the gguf manifest, as the stages check their inputs."""
    import shutil
    run = tmp_path / "smoke"
    for folder in ("data", "gguf"):
        shutil.copytree(quantized / folder, run / folder)
    with open(run / "gguf" / "tiny" / "model-Q4_K_M.gguf", "r+b") as fh:
        fh.truncate(100_000)
    for name in ("predict", "serve"):
        proc = subprocess.run(command(name, tmp_path, f"serve.port={free_port()}") + ["--text", "add 3 soaps"][
            : 2 if name == "predict" else 0], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "model-Q4_K_M.gguf" in proc.stderr and "make gguf" in proc.stderr


def test_missing_gguf_exits_3_naming_make_gguf(tmp_path):
    proc = subprocess.run(command("serve", tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "make gguf" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(command("predict", tmp_path, "serve.port=0") + ["--text", "x"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "serve.port" in proc.stderr


def test_the_llama_server_back_end_answers_as_the_in_process_one(quantized):
    """One inference interface: llama-server's slots (two answers at once, from two threads) give the in-process
    llama.cpp back end's answers, constrained and free, on the same GGUF."""
    from cart_intent.backends import GGUFBackend, LlamaServerBackend, answer_text
    from cart_intent.intent import ServeConfig
    from cart_intent.task import build_prompt
    from cart_intent.llama_server import LlamaServer
    path, names = quantized / "gguf" / "tiny" / "model-Q4_K_M.gguf", load_catalog().names
    rows = [json.loads(line) for line in (quantized / "data" / "test.jsonl").read_text().splitlines()[:6]]
    prompts = [build_prompt(row["text"]) for row in rows]
    local = GGUFBackend(path, n_threads=2)
    answers = local.generate(prompts, constrained=True, products=names)
    expected = [c.text for c in answers]
    expected_free = [answer_text(c.text) for c in local.generate(prompts)]
    local.close()
    with LlamaServer(path, ServeConfig(slots=2, threads=2), "tiny") as server:
        backend = LlamaServerBackend(path, server.port, slots=2)
        with ThreadPoolExecutor(2) as pool:
            served_answers = list(pool.map(lambda p: backend.generate([p], constrained=True, products=names)[0],
                                           prompts))
        served_free = [answer_text(c.text) for c in backend.generate(prompts)]
    assert [c.text for c in served_answers] == expected and served_free == expected_free
    # the same probabilities, from llama-server's n_probs (within the rounding of two slots' batched products)
    for mine, theirs in zip(answers, served_answers):
        assert theirs.confidence["overall"] == pytest.approx(mine.confidence["overall"], rel=0.05, abs=1e-6)
        assert theirs.confidence["product"] == pytest.approx(mine.confidence["product"], rel=0.05, abs=1e-6)
        assert (theirs.confidence["runner_up"] or {}).get("products") == (mine.confidence["runner_up"] or {}).get(
            "products")
