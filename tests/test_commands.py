"""Every command a user runs (each stage and tool under stages/, each script under scripts/) answers --help:
exit 0 and a usage line, with nothing but its arguments parsed (no config read, no model loaded)."""
import subprocess
import sys

import pytest

from conftest import ROOT

COMMANDS = sorted([["-m", f"stages.{p.stem}"] for p in (ROOT / "stages").glob("*.py") if "__main__" in p.read_text()] +
                  [["-m", f"stages.{p.parent.name}"] for p in (ROOT / "stages").glob("*/__main__.py")] +
                  [[f"scripts/{p.name}"] for p in (ROOT / "scripts").glob("*.py") if "__main__" in p.read_text()])


def test_the_commands_are_found():
    assert ["-m", "stages.finetune"] in COMMANDS and ["scripts/bench_contention.py"] in COMMANDS
    assert ["-m", "stages.serve"] in COMMANDS


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[-1])
def test_every_command_answers_help(command):
    proc = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), (proc.stdout[:500], proc.stderr[-1500:])
