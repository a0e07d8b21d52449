"""What a competing CPU-bound process costs llama.cpp decoding and a torch training step, for each thread
count and OpenMP wait policy: every setting is timed alone and beside `--hogs` busy processes (pure Python
loops, one core each), in a process of its own (OpenMP reads its environment once, at load). A fair
setting slows down about in proportion to the CPU the competitors take (2 cores, 1 competitor: ~2x); one
whose threads spin-wait for a descheduled sibling slows down far more (`fair_slowdown` in each row: every
runnable thread given an equal share of the cores).

    python scripts/bench_contention.py --run artifacts/smollm2 --out contention.json   # ~8 minutes on 2 cores
    python scripts/bench_contention.py --gguf model.gguf --model hf-folder/ --repeats 4

Run it on an otherwise idle machine: the competitors are the only load it may have.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CORES = len(os.sched_getaffinity(0))
# (label, threads, extra environment)
SETTINGS = [("all cores", CORES, {}),
            ("all cores, spin 10k", CORES, {"GOMP_SPINCOUNT": "10000"}),
            ("all cores, spin 100k", CORES, {"GOMP_SPINCOUNT": "100000"}),
            ("all cores, OMP passive", CORES, {"OMP_WAIT_POLICY": "PASSIVE"}),
            ("one core fewer", max(CORES - 1, 1), {})]
PROMPT = "Extract the cart operation as JSON.\nMessage: hola, me puedes quitar 2 cepillos de dientes por favor\n"


def time_llama(gguf: str, threads: int, repeats: int) -> list[float]:
    """Seconds per answer: a ~40-token prompt, 24 new tokens, greedy, no prompt cache between answers."""
    from llama_cpp import Llama
    llm = Llama(gguf, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    times = []
    for _ in range(repeats + 1):   # the first answer warms up
        llm.reset()
        began = time.perf_counter()
        llm(PROMPT, max_tokens=24, temperature=0.0, logit_bias={llm.token_eos(): -1e9})
        times.append(time.perf_counter() - began)
    return times[1:]


def time_torch(model: str, threads: int, repeats: int) -> list[float]:
    """Seconds per training step: forward and backward of 8 x 64 tokens, every weight trainable."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    ids = torch.randint(0, net.config.vocab_size, (8, 64))
    times = []
    for _ in range(repeats + 1):
        began = time.perf_counter()
        net(input_ids=ids, labels=ids).loss.backward()
        net.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - began)
    return times[1:]


def competitor(kind: str, gguf: str, env: dict) -> subprocess.Popen:
    """`busy`: a pure Python loop (one core); `llama`: another llama.cpp process answering without a pause on
    every core, with this setting's environment (two model processes on one host)."""
    if kind == "busy":
        return subprocess.Popen([sys.executable, "-c", "while True: pass"])
    return subprocess.Popen([sys.executable, __file__, "--child", "llama", "--target", gguf, "--threads",
                             str(CORES), "--repeats", str(10 ** 6)], stdout=subprocess.DEVNULL,
                            env={**os.environ, **env})


def measure(kind: str, target: str, threads: int, env: dict, hogs: list, repeats: int) -> float:
    """Median seconds of one setting, in a fresh process, beside the competitors `hogs` starts."""
    busy = [start() for start in hogs]
    time.sleep(2 if busy else 0)   # a competing model loaded and answering
    try:
        child = subprocess.run([sys.executable, __file__, "--child", kind, "--target", target, "--threads",
                                str(threads), "--repeats", str(repeats)], env={**os.environ, **env},
                               capture_output=True, text=True, check=True)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    return statistics.median(json.loads(child.stdout.strip().splitlines()[-1]))


def default_inputs(run: Path) -> tuple[str, str]:
    gguf = next(iter(sorted(run.glob("gguf/*/model-Q4_K_M.gguf"))), None)
    model = next(iter(sorted(p.parent for p in run.glob("base/*/config.json"))), None)
    if gguf is None or model is None:
        sys.exit(f"{run}: no gguf/*/model-Q4_K_M.gguf or base/*/config.json; run `make gguf` first, "
                 "or give --gguf and --model")
    return str(gguf), str(model)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="a run folder: its Q4_K_M GGUF and its base model")
    p.add_argument("--gguf", help="a GGUF file (instead of the run's)")
    p.add_argument("--model", help="a transformers model folder (instead of the run's base)")
    p.add_argument("--hogs", type=int, default=1, help="competing processes (default 1)")
    p.add_argument("--competitor", choices=["busy", "llama"], default="busy",
                   help="busy: a pure Python loop; llama: another llama.cpp process on every core")
    p.add_argument("--only", choices=["llama", "torch"], help="time only this work")
    p.add_argument("--repeats", type=int, default=5, help="timed answers or steps per setting")
    p.add_argument("--out", type=Path, help="also write the table as JSON here")
    p.add_argument("--child", choices=["llama", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        timer = time_llama if args.child == "llama" else time_torch
        print(json.dumps(timer(args.target, args.threads, args.repeats)))
        return 0
    gguf, model = default_inputs(args.run) if args.run else (None, None)
    gguf, model = args.gguf or gguf, args.model or model
    if not (gguf and model):
        p.error("give --run, or both --gguf and --model")
    rows, rival_threads = [], 1 if args.competitor == "busy" else CORES
    for kind, target in (("llama", gguf), ("torch", model)):
        if args.only not in (None, kind):
            continue
        for label, threads, env in SETTINGS:
            hogs = [lambda env=env: competitor(args.competitor, gguf, env) for _ in range(args.hogs)]
            alone = measure(kind, target, threads, env, [], args.repeats)
            shared = measure(kind, target, threads, env, hogs, args.repeats)
            rows.append({"work": "llama.cpp answer" if kind == "llama" else "torch training step",
                         "setting": label, "threads": threads, "env": env, "alone_s": round(alone, 4),
                         f"beside_{args.hogs}_{args.competitor}_s": round(shared, 4), "slowdown": round(shared / alone, 2),
                         # every runnable thread given an equal share of the cores
                         "fair_slowdown": round(max(1.0, (threads + args.hogs * rival_threads) / CORES), 2)})
            print(json.dumps(rows[-1]), flush=True)
    result = {"cores": CORES, "hogs": args.hogs, "competitor": args.competitor, "gguf": gguf, "model": model, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
