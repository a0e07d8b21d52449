"""Shared by the integration tests: the smoke run's stages, built once per test session."""
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cart_intent import registry

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.toml")


# Runs a stage module as `python -m` would, recording every file it opens under the artifacts folder.
RECORD_OPENS = """
import atexit, json, os, runpy, sys
root, log, module = sys.argv[1:4]
opened = set()
def record(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(args[0]))
        if path.startswith(root + os.sep):
            opened.add(os.path.relpath(path, root))
sys.addaudithook(record)
atexit.register(lambda: open(log, "w").write(json.dumps(sorted(opened))))
sys.argv = [module, *sys.argv[4:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def undeclared_reads(name: str, extra: tuple, opened: list[str]) -> list[str]:
    """The files a stage opened in a run folder that neither it writes nor the registry says it reads."""
    declared = registry.STAGES.get("evaluate_set" if name == "evaluate" and "--data" in extra else name)
    if declared is None:  # a tool outside the pipeline (clean, transfer, publish)
        return []
    allowed = {declared.name, *declared.reads, *declared.reads_if_present}
    undeclared = []
    for path in opened:
        run, *parts = path.split("/")
        if not parts or run.startswith(".") or (run == "compare" and name == "compare"):
            continue  # the user's own files and caches beside the runs; compare's own folder
        folders = ["/".join(parts[:i]) for i in range(1, len(parts))]
        # a stage writes <folder> through .<folder>.tmp, moves the last one to .<folder>.old, locks .<folder>.lock
        folders = [re.sub(r"(^|/)\.([^/]+)\.(tmp|lock|old)$", r"\1\2", f) for f in folders + ["/".join(parts)]]
        owners = {registry.owner(f).name for f in folders if is_stage_folder(f)}
        if not owners & allowed:
            undeclared.append(path)
    return undeclared


def is_stage_folder(folder: str) -> bool:
    try:
        return bool(registry.owner(folder))
    except KeyError:
        return False


def stage(name, artifacts_dir, *extra, check=True, timeout=900):
    """Run one stage on the smoke config under artifacts_dir; assert success unless check=False, and that every
    file it opened in a run is one the registry says it reads or writes."""
    root = Path(ROOT, artifacts_dir).resolve()
    with tempfile.NamedTemporaryFile(suffix=".json") as log:
        cmd = [sys.executable, "-c", RECORD_OPENS, str(root), log.name, f"stages.{name}", "--config", SMOKE,
               "--set", f"run.artifacts_dir='{artifacts_dir}'", *extra]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        opened = json.loads(Path(log.name).read_text() or "[]")
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    undeclared = undeclared_reads(name, extra, opened)
    assert not undeclared, f"stages.{name} opened files the registry does not declare: {undeclared[:5]}"
    return proc


def manifest(run_dir, folder):
    return json.loads((run_dir / folder / "manifest.json").read_text())


def pytest_collection_modifyitems(config, items):
    """`gpu` tests are skipped, with the reason, where torch sees no CUDA device."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch  # only when a gpu test is collected: torch takes seconds to import
    if not torch.cuda.is_available():
        for item in gpu_tests:
            item.add_marker(pytest.mark.skip(reason="no CUDA device (torch.cuda.is_available() is False)"))


@pytest.fixture(scope="session")
def chain(tmp_path_factory):
    """artifacts/smoke after generate -> base -> finetune -> merge."""
    root = tmp_path_factory.mktemp("chain")
    for name in ("generate", "base", "finetune", "merge"):
        stage(name, root)
    return root / "smoke"


@pytest.fixture(scope="session")
def quantized(chain):
    """The smoke run after gptq and gguf too (gptq given a relative artifacts_dir, as `make` does)."""
    stage("gptq", os.path.relpath(chain.parent, ROOT))
    stage("gguf", chain.parent)
    return chain
