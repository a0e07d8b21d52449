"""Shared by the integration tests: the smoke run's stages, built once per test session."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.toml")


def stage(name, artifacts_dir, *extra, check=True, timeout=900):
    """Run one stage on the smoke config under artifacts_dir; assert success unless check=False."""
    cmd = [sys.executable, "-m", f"stages.{name}", "--config", SMOKE, "--set", f"run.artifacts_dir='{artifacts_dir}'",
           *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def manifest(run_dir, folder):
    return json.loads((run_dir / folder / "manifest.json").read_text())


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
