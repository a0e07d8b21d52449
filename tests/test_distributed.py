"""finetune with several training processes (PyTorch's elastic launcher, DDP over gloo on CPU) on the smoke run:
two processes on this host, and two "hosts" (two launchers with a c10d rendezvous on 127.0.0.1), each train one
model to the one-process result within noise; a killed training process stops the run with one line, nothing
published, and the next run resumes from the last checkpoint."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cart_intent.child import free_port
from conftest import ROOT, SMOKE, manifest, stage

pytestmark = pytest.mark.integration


@pytest.fixture()
def run_copy(chain, tmp_path):
    """The smoke run's data and base, without its fine-tuning."""
    run = tmp_path / "smoke"
    for folder in ("data", "base"):
        shutil.copytree(chain / folder, run / folder)
    return run


def assert_same_model_as_one_process(run, one):
    models = manifest(run, "finetune")["results"]["models"]
    assert set(models) == {"tiny"} and (run / "finetune" / "tiny" / "adapter" / "adapter_model.safetensors").is_file()
    mine, theirs = models["tiny"], manifest(one, "finetune")["results"]["models"]["tiny"]
    assert mine["world_size"] == 2 and mine["per_process_batch"] == theirs["per_process_batch"] // 2
    assert mine["steps"] == theirs["steps"]   # the same global batch: the same number of optimizer steps
    assert mine["train_loss"] == pytest.approx(theirs["train_loss"], abs=0.03)
    assert mine["best_eval_loss"] == pytest.approx(theirs["best_eval_loss"], abs=0.05)
    assert mine["evaluations"][-1]["val_exact_match"] == pytest.approx(theirs["evaluations"][-1]["val_exact_match"],
                                                                       abs=0.15)
    assert manifest(run, "finetune")["config"]["world_size"] == 2


def test_two_processes_train_the_one_process_model(run_copy, chain):
    stage("finetune", run_copy.parent, "--nproc-per-node", "2", "--master-port", str(free_port()))
    assert_same_model_as_one_process(run_copy, chain)
    assert not (run_copy / ".finetune.tmp").exists()   # published: no temporary folder left


def launcher(run, *extra):
    return subprocess.Popen([sys.executable, "-m", "stages.finetune", "--config", SMOKE,
                             "--set", f"run.artifacts_dir='{run.parent}'", *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_hosts_meet_by_c10d_rendezvous_and_train_the_same_model(run_copy, chain):
    port = str(free_port())
    hosts = [launcher(run_copy, "--nnodes", "2", "--node-rank", rank, "--master-port", port) for rank in ("0", "1")]
    outputs = [host.communicate(timeout=900)[0] for host in hosts]
    assert [host.returncode for host in hosts] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert_same_model_as_one_process(run_copy, chain)


def training_processes() -> list[int]:
    """pids of this host's finetune training processes (started by the elastic launcher)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if b"stages.finetune" in cmdline and any(v.startswith(b"TORCHELASTIC_RUN_ID=") for v in environ):
            found.append(int(proc.name))
    return found


def test_a_killed_training_process_stops_the_run_and_the_next_one_resumes(run_copy):
    every = ("--set", "finetune.eval_steps=10", "--set", "finetune.max_steps=60")
    first = launcher(run_copy, "--nproc-per-node", "2", "--master-port", str(free_port()), *every)
    deadline = time.time() + 600
    while not list(run_copy.glob(".finetune.tmp/tiny/checkpoints/checkpoint-*/cart_resume.json")):
        assert first.poll() is None and time.time() < deadline, "no checkpoint was written"
        time.sleep(1)
    victims = training_processes()
    assert len(victims) == 2
    os.kill(max(victims), signal.SIGKILL)
    output = first.communicate(timeout=300)[0]
    assert first.returncode == 1 and "Traceback" not in output.split("exited with code")[-1], output[-3000:]
    assert "of 2 exited with code -9" in output and "nothing was published" in output
    assert not (run_copy / "finetune").exists() and not training_processes()
    second = stage("finetune", run_copy.parent, "--nproc-per-node", "2", "--master-port", str(free_port()), *every)
    assert "resuming from checkpoint-" in second.stderr + second.stdout
    history = manifest(run_copy, "finetune")["results"]["models"]["tiny"]
    assert history["steps"] == 60 and history["resumed_from"].startswith("checkpoint-")
