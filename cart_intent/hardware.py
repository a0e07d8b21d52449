"""What a benchmark needs to know about the machine it runs on, and how to measure it.

`fingerprint()` names the host by what decides its speed (CPU model, cores, ISA flags, RAM, GPU),
not by its hostname (containers get random ones), so profiles of one run taken on several machines
land side by side under profiles/<host-id>/. `memory_bandwidth()` is a streaming read with one
thread per core; `PeakRSS` samples a process's resident memory while it works.
"""
from __future__ import annotations

import hashlib
import os
import re
import resource
import subprocess
import threading
import time
from pathlib import Path

from .host import cpuinfo, host_facts

# The ISA extensions that change which kernels llama.cpp and torch pick.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def gpus() -> list[dict]:
    """NVIDIA GPUs as nvidia-smi reports them (empty without a driver)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = []
    for line in out.stdout.strip().splitlines() if out.returncode == 0 else []:
        name, memory, driver, capability = (part.strip() for part in line.split(","))
        found.append({"name": name, "memory_mib": int(float(memory)), "driver": driver, "compute_capability": capability})
    return found


def fingerprint() -> dict:
    """The facts that decide a benchmark's numbers on this host (the hostname is not one of them)."""
    info = cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    facts = {k: v for k, v in host_facts().items() if k != "hostname"}
    return {**facts, "usable_cores": len(os.sched_getaffinity(0)), "isa": [f for f in ISA_FLAGS if f in flags],
            "gpus": gpus()}


def host_id(facts: dict) -> str:
    """A folder name that reads as the hardware: '<cpu>-<cores>c[-<gpu>]-<hash of the facts>'."""
    def slug(text: str) -> str:
        text = re.sub(r"\((r|tm)\)|cpu|processor|\d+-core|@.*", "", text.lower())
        return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:32]
    key = [facts["cpu_model"], facts["usable_cores"], facts["isa"], facts["ram_bytes"] // 2**30,
           [g["name"] for g in facts["gpus"]]]
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:6]
    parts = [slug(facts["cpu_model"]), f"{facts['usable_cores']}c"]
    parts += [slug(facts["gpus"][0]["name"]).replace("nvidia-", "")] if facts["gpus"] else []
    return "-".join(p for p in parts if p) + f"-{digest}"


def memory_bandwidth(mib: int = 1024, threads: int = 0, repeats: int = 5) -> dict:
    """Best-of-`repeats` streaming read (GB/s) of a buffer far larger than any cache, one thread per core.

    numpy's max() reduction releases the GIL and streams at memory speed, so threads over chunks read
    in parallel, like llama.cpp's decode threads reading the weights.
    """
    from concurrent.futures import ThreadPoolExecutor
    import numpy as np
    threads = threads or len(os.sched_getaffinity(0))
    buffer = np.ones(mib * 2**20 // 4, dtype=np.float32)
    chunks = np.array_split(buffer, threads * 4)
    rates = []
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.max, chunks))  # touch every page before timing
        for _ in range(repeats):
            began = time.perf_counter()
            list(pool.map(np.max, chunks))
            rates.append(buffer.nbytes / (time.perf_counter() - began) / 1e9)
    return {"read_gb_s": round(max(rates), 2), "median_gb_s": round(sorted(rates)[len(rates) // 2], 2),
            "buffer_mib": mib, "threads": threads, "repeats": repeats, "method": "numpy max() over chunks, threads"}


class PeakRSS:
    """Peak resident memory of this process: a sampling thread (psutil) and the kernel's ru_maxrss."""

    def __init__(self, interval_s: float = 0.01):
        import psutil
        self.process, self.interval, self.peak = psutil.Process(), interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def now(self) -> int:
        return self.process.memory_info().rss

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict:
        """`peak_rss_bytes`: the larger of the samples and the kernel's high-water mark for this process image
        (VmHWM); ru_maxrss is kept for reference, but on Linux it carries the parent's memory across exec."""
        hwm = 0
        try:
            hwm = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
        except (OSError, AttributeError):
            pass
        self.peak = max(self.peak, self.now())
        return {"peak_rss_bytes": max(self.peak, hwm), "sampled_peak_rss_bytes": self.peak, "vm_hwm_bytes": hwm,
                "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_worker(module: str, spec: dict, timeout_s: int) -> dict:
    """`python -m <module> --worker SPEC` in a fresh process, so load time and memory are its own; returns the
    JSON it wrote to spec["result"]. Its progress lines are passed through as they come; a failure or timeout
    raises RuntimeError with the worker's last line; an interrupt stops the worker too."""
    import json
    import sys
    result = Path(spec["result"])
    spec_file = result.with_name(result.stem + ".spec.json")
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.Popen([sys.executable, "-m", module, "--worker", str(spec_file)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, errors="replace")
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    last = "(no output)"
    try:
        for line in proc.stderr:
            if line.strip():
                last = line.strip()
                sys.stderr.write("  " + line)
        proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        timed_out = not timer.is_alive() and proc.returncode != 0
        timer.cancel()
        spec_file.unlink()
    if timed_out:
        raise RuntimeError(f"{module} worker on {spec['path']} ran past {timeout_s} s")
    if proc.returncode != 0:
        raise RuntimeError(f"{module} worker on {spec['path']} failed (exit {proc.returncode}): {last}")
    value = json.loads(result.read_text())
    result.unlink()
    return value


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100), as numpy's default."""
    import numpy as np
    return float(np.percentile(values, q)) if values else 0.0
