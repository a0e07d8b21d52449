"""Every stage stops on SIGTERM like on Ctrl-C: exit 130, one line, nothing published."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, SMOKE

pytestmark = pytest.mark.integration


def test_sigterm_stops_a_stage_with_130_and_publishes_nothing(chain, tmp_path):
    run_dir = tmp_path / "smoke"
    run_dir.mkdir()
    os.symlink(chain / "data", run_dir / "data")
    proc = subprocess.Popen([sys.executable, "-m", "stages.base", "--config", SMOKE, "--set",
                             f"run.artifacts_dir='{tmp_path}'"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / ".base.tmp").exists():  # the stage is at work
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert not (run_dir / "base").exists()
