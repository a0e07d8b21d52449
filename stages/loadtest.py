"""loadtest: requests/s and latency of `serve` under concurrent shoppers, each engine side by side.

Per engine in loadtest.engines: `python -m stages.serve` (this run's config and its [serve] table, engine
set, on a free 127.0.0.1 port) is started as a child process and warmed up (all of them first; an idle one
uses no CPU). Then for each client count, on each engine in turn: `requests` POST /v1/intent over the test
split's messages (in order, cycled), from that many concurrent clients, each sending its next message as
soon as its last one is answered (closed loop); a level stops after `max_seconds` even if requests remain.
Running the engines back to back at each count keeps a shared machine's drift out of their ratio. Per engine and client count: requests/s, mean / P50 / P95 /
P99 latency, errors, exact match against the labels, and how many answers equal the same engine's answer
at 1 client and evaluate's constrained answer for the same message (batching must not change them). Only
127.0.0.1 is touched; the server is stopped at the end, on an error and on Ctrl-C.

    python -m stages.loadtest --config configs/smollm2.toml
    python -m stages.loadtest --config configs/smoke.toml --set loadtest.requests=40 --set 'loadtest.clients=[1, 4]'

Reads artifacts/<run>/gguf (via serve), data (test split) and, when present, eval's constrained predictions.
Writes artifacts/<run>/profiles/<host-id>/serve/: results.json (one row per engine and client count, and
the ratios of the first engine to the last), results.csv, fingerprint.json, requests/<engine>__c<N>.jsonl.
"""
from __future__ import annotations

import csv
import http.client
import json
import statistics
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from rich.text import Text

from cart_intent import artifacts, cli, hardware, registry
from cart_intent.child import Child, free_port
from cart_intent.config import as_dict, load_stage_config, require
from cart_intent.intent import ENGINES, ServeConfig, gguf_path
from cart_intent.records import ServeRow, checked
from cart_intent.task import exact_match, read_split

PACKAGES = ["llama-cpp-python", "uvicorn", "fastapi", "httpx2"]


@dataclass
class LoadtestConfig:
    engines: list[str] = field(default_factory=lambda: list(ENGINES))  # the first is compared with the last
    clients: list[int] = field(default_factory=lambda: [1, 4, 8, 16])
    requests: int = 400           # per engine and client count
    max_seconds: int = 300        # per engine and client count: no new request after this
    warmup: int = 16              # untimed requests after each server starts
    request_timeout_s: int = 120
    startup_timeout_s: int = 300  # until the server answers /v1/models

    def validate(self) -> None:
        require(self.engines and set(self.engines) <= set(ENGINES) and len(set(self.engines)) == len(self.engines),
                "engines", f"distinct engines among {', '.join(ENGINES)}")
        require(self.clients and all(1 <= c <= 256 for c in self.clients) and len(set(self.clients)) == len(self.clients),
                "clients", "distinct client counts in [1, 256], e.g. [1, 4, 8, 16]")
        require(self.requests >= 1 and self.warmup >= 0, "requests", "requests >= 1 and warmup >= 0")
        require(self.max_seconds >= 1 and self.request_timeout_s >= 1 and self.startup_timeout_s >= 5,
                "max_seconds", "max_seconds >= 1, request_timeout_s >= 1, startup_timeout_s >= 5")


# ---- one server, as a user starts it ------------------------------------------------------------------------

class ServeProcess(Child):
    """`python -m stages.serve` with this run's config and one engine, on a free 127.0.0.1 port; ready once it
    lists its model (serve stops its own llama-server child)."""

    def __init__(self, args, engine: str, timeout_s: int, log: Path):
        self.port = free_port()
        sets = [*args.overrides, f'serve.engine="{engine}"', f"serve.port={self.port}", 'serve.host="127.0.0.1"']
        command = [sys.executable, "-m", "stages.serve", "--config", args.config,
                   *(part for item in sets for part in ("--set", item))]
        super().__init__(command, log, "serve", self.answers, timeout_s, "loadtest.startup_timeout_s")

    def answers(self) -> bool:
        return request(self.port, "GET", "/v1/models", None, 5)[0] == 200


def request(port: int, method: str, path: str, body: dict | None, timeout: float,
            connection: http.client.HTTPConnection | None = None) -> tuple[int, dict]:
    """(status, JSON answer) over a kept-alive connection when one is given."""
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
    reply = conn.getresponse()
    payload = reply.read()
    if connection is None:
        conn.close()
    return reply.status, json.loads(payload) if payload else {}


# ---- one level: N clients, closed loop -----------------------------------------------------------------------

def run_level(port: int, messages: list[dict], clients: int, cfg: LoadtestConfig, label: str) -> tuple[list[dict], float]:
    """Every request's record and the level's wall time (first send to last answer)."""
    records, lock, taken = [], threading.Lock(), [0]
    began = time.perf_counter()
    deadline = began + cfg.max_seconds

    def client(advance) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=cfg.request_timeout_s)
        while True:
            with lock:
                if taken[0] >= cfg.requests or time.perf_counter() > deadline:
                    break
                index, taken[0] = taken[0], taken[0] + 1
            example = messages[index % len(messages)]
            sent = time.perf_counter()
            try:
                status, answer = request(port, "POST", "/v1/intent", {"text": example["text"]}, cfg.request_timeout_s, conn)
            except (OSError, http.client.HTTPException, ValueError) as err:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=cfg.request_timeout_s)
                status, answer = 0, {"detail": f"{type(err).__name__}: {err}"}
            record = {"index": index, "id": example["id"], "status": status, "latency_s": round(time.perf_counter() - sent, 5),
                      "answer": {k: answer.get(k) for k in ("action", "product", "quantity")} if status == 200 else None,
                      **({"error": str(answer.get("detail"))[:300]} if status != 200 else {}),
                      "correct": status == 200 and exact_match(answer, example)}
            with lock:
                records.append(record)
            advance()
        conn.close()

    with cli.progress(label, cfg.requests) as advance:
        threads = [threading.Thread(target=client, args=(advance,), daemon=True) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return sorted(records, key=lambda r: r["index"]), time.perf_counter() - began


def summary(engine: str, clients: int, records: list[dict], seconds: float, reference: dict[str, dict],
            evaluated: dict[str, dict]) -> dict:
    """One results row: throughput, latency percentiles, errors and what the answers were."""
    latencies = [r["latency_s"] for r in records]
    answered = [r for r in records if r["status"] == 200]

    def same(table: dict[str, dict]) -> float | None:
        known = [r for r in records if r["id"] in table]
        return round(sum(r["answer"] == table[r["id"]]["answer"] for r in known) / len(known), 4) if known else None

    def evaluate_exact_match() -> float | None:   # on the same messages; one sent twice counts twice
        known = [r for r in records if r["id"] in evaluated]
        return round(sum(evaluated[r["id"]]["correct"] for r in known) / len(known), 4) if known else None

    return {"engine": engine, "clients": clients, "requests": len(records), "seconds": round(seconds, 3),
            "requests_per_s": round(len(records) / seconds, 3),
            "latency_mean_s": round(statistics.mean(latencies), 4),
            **{f"latency_p{q}_s": round(hardware.percentile(latencies, q), 4) for q in (50, 95, 99)},
            "errors": len(records) - len(answered),
            "exact_match": round(sum(r["correct"] for r in records) / len(records), 4),
            "same_as_1_client": same(reference), "same_as_evaluate": same(evaluated),
            "evaluate_exact_match": evaluate_exact_match()}


# ---- the stage ---------------------------------------------------------------------------------------------

def evaluated_answers(run_dir: Path, eval_manifest: dict | None, gguf_file: Path, variant: str) -> dict[str, dict]:
    """Message id -> {"answer", "correct"} of evaluate's constrained decoding of the served file; empty when
    evaluate has not run or left that file out (the comparison is then left out, not guessed)."""
    name = f"predictions/{gguf_file.parent.name}__gguf-{variant}__constrained.jsonl"
    if eval_manifest is None or name not in eval_manifest["outputs"]:
        return {}
    return {row["id"]: {"answer": row["parsed"] if row["valid"] else None, "correct": row["correct"]}
            for row in artifacts.read_jsonl(run_dir / "eval" / name)}


def measure(args, cfg: LoadtestConfig, messages: list[dict], evaluated: dict, out: Path) -> list[dict]:
    """Every engine's server started and warmed up first, then each client count run on one engine after the
    other (so a shared machine's drift falls on both sides of a ratio alike); one row per engine and count."""
    rows, reference = [], {engine: {} for engine in cfg.engines}
    with ExitStack() as stack:
        servers = {engine: stack.enter_context(ServeProcess(args, engine, cfg.startup_timeout_s, out / f"serve-{engine}.log"))
                   for engine in cfg.engines}
        for server in servers.values():
            for i in range(cfg.warmup):
                request(server.port, "POST", "/v1/intent", {"text": messages[-1 - i % len(messages)]["text"]},
                        cfg.request_timeout_s)
        for clients in sorted(cfg.clients):
            for engine, server in servers.items():
                records, seconds = run_level(server.port, messages, clients, cfg, f"{engine}, {clients} clients")
                if not reference[engine]:   # the fewest clients: the unbatched answers, when 1 is among the counts
                    reference[engine] = {r["id"]: r for r in records if r["status"] == 200}
                artifacts.write_jsonl(out / "requests" / f"{engine}__c{clients}.jsonl", records)
                rows.append(checked(ServeRow, summary(engine, clients, records, seconds, reference[engine], evaluated)))
                cli.console.print(f"{engine}, {clients} clients: {rows[-1]['requests_per_s']} requests/s, "
                                  f"P95 {rows[-1]['latency_p95_s']} s, errors {rows[-1]['errors']}, "
                                  f"exact match {rows[-1]['exact_match']}")
    return rows


def ratios(rows: list[dict], engines: list[str]) -> list[dict]:
    """The first engine against the last at each client count: requests/s and P95 latency."""
    if len(engines) < 2:
        return []
    by = {(r["engine"], r["clients"]): r for r in rows}
    first, last = engines[0], engines[-1]
    return [{"clients": c, "engines": f"{first} / {last}",
             "requests_per_s": round(by[first, c]["requests_per_s"] / by[last, c]["requests_per_s"], 3),
             "latency_p95": round(by[first, c]["latency_p95_s"] / by[last, c]["latency_p95_s"], 3)}
            for (engine, c) in by if engine == first and (last, c) in by]


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def measured_code() -> str:
    """This stage's code and the code it measures (serve, started as a process, so no import says so)."""
    return artifacts.sha256_json([artifacts.code_hash(__file__), artifacts.code_hash(Path(__file__).parent / "serve" / "stage.py")])


def run(run_cfg, cfg: LoadtestConfig, args) -> int:
    run_dir = run_cfg.run_dir
    _, serve_cfg = load_stage_config(args.config, "serve", ServeConfig, args.overrides)
    manifests = registry.upstream(run_dir, "loadtest")   # eval too, when evaluate has run
    gguf_file = gguf_path(run_cfg, serve_cfg)
    evaluated = evaluated_answers(run_dir, manifests.get("eval"), gguf_file, serve_cfg.variant)
    facts = hardware.fingerprint()
    host = hardware.host_id(facts)
    served = {k: v for k, v in as_dict(serve_cfg).items() if k not in ("host", "port", "engine")}
    stage = artifacts.StageRun("loadtest", f"profiles/{host}/serve", run_dir, {**as_dict(cfg), "serve": served},
                               artifacts.input_fingerprint(manifests),
                               measured_code(), PACKAGES)
    if cli.already_done(stage, args):
        return 0
    messages = read_split(run_dir, "test")
    out = stage.fresh_tmp()
    (out / "requests").mkdir()
    cli.console.print(f"starting serve with {', '.join(cfg.engines)} on {gguf_file.name}")
    try:
        rows = measure(args, cfg, messages, evaluated, out)
    except RuntimeError as err:
        cli.console.print(Text.assemble(("loadtest failed ", "red"), str(err)))
        return cli.EXIT_FAILED
    compared = ratios(rows, cfg.engines)
    artifacts.write_json(out / "fingerprint.json", {**facts, "host_id": host})
    artifacts.write_json(out / "results.json", {"host": host, "model": gguf_file.parent.name, "variant": serve_cfg.variant,
                                                "serve": served, "rows": rows, "ratios": compared})
    write_csv(out / "results.csv", rows)
    stage.results.update(host=host, rows=rows, ratios=compared)
    stage.publish()
    show(rows, compared, host)
    return cli.EXIT_OK


def show(rows: list[dict], compared: list[dict], host: str) -> None:
    cli.show_results(f"load test on {host}", {f"{r['engine']} x{r['clients']}": {
        "req/s": r["requests_per_s"], "mean s": r["latency_mean_s"], "p50 s": r["latency_p50_s"],
        "p95 s": r["latency_p95_s"], "p99 s": r["latency_p99_s"], "errors": r["errors"], "exact match": r["exact_match"],
        "same as 1 client": r["same_as_1_client"], "same as evaluate": r["same_as_evaluate"]} for r in rows},
        ["req/s", "mean s", "p50 s", "p95 s", "p99 s", "errors", "exact match", "same as 1 client", "same as evaluate"])
    for ratio in compared:
        cli.console.print(f"{ratio['engines']} at {ratio['clients']} clients: requests/s x{ratio['requests_per_s']}, "
                          f"P95 latency x{ratio['latency_p95']}")


def main(argv=None) -> int:
    return cli.run_stage(__doc__, "loadtest", LoadtestConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
