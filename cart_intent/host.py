"""The machine in a few cheap facts for every manifest (kept apart from `hardware`'s probes, so editing a
benchmark never changes the code hash of a stage that only records where it ran)."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path


def cpuinfo() -> dict:
    """/proc/cpuinfo's first processor as key -> value (empty where there is none)."""
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def host_facts() -> dict:
    """The machine in a few cheap facts, for every manifest (no GPU query)."""
    info = cpuinfo()
    ram = 0
    try:
        ram = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        pass
    return {"hostname": platform.node(), "cpu_model": info.get("model name") or platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "ram_bytes": ram, "machine": platform.machine(), "os": platform.platform(),
            "python": platform.python_version()}
