"""The shared stage mechanisms: upstream files checked against their manifest, resumes only of identical
attempts, code hashes over the modules a stage imports, `clean` confined to one run, user text printed literally."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cart_intent.artifacts import MissingArtifact, StageRun, code_dependencies
from cart_intent.registry import require_stage

ROOT = Path(__file__).resolve().parents[1]


def published(run_dir, files: dict[str, bytes]):
    stage = StageRun("generate", "data", run_dir, {"n": 1}, {}, "code", [])
    out = stage.fresh_tmp()
    for name, content in files.items():
        (out / name).write_bytes(content)
    stage.publish()
    return run_dir / "data"


def test_intact_upstream_passes_and_truncated_or_edited_files_name_the_target(tmp_path):
    folder = published(tmp_path, {"train.jsonl": b'{"a": 1}\n{"b": 2}\n', "test.jsonl": b"{}\n"})
    assert require_stage(tmp_path, "data")["stage"] == "generate"
    with open(folder / "train.jsonl", "r+b") as fh:  # truncated mid-line
        fh.truncate(12)
    with pytest.raises(MissingArtifact, match=r"train.jsonl .*make generate FORCE=1"):
        require_stage(tmp_path, "data")
    folder = published(tmp_path, {"train.jsonl": b'{"a": 1}\n'})
    (folder / "train.jsonl").write_bytes(b'{"a": 2}\n')  # same size, new content, newer than the manifest
    later = time.time() + 5
    os.utime(folder / "train.jsonl", (later, later))
    with pytest.raises(MissingArtifact, match="differs from"):
        require_stage(tmp_path, "data")
    (folder / "train.jsonl").unlink()
    with pytest.raises(MissingArtifact, match="missing"):
        require_stage(tmp_path, "data")


@pytest.mark.parametrize("content", ['{"stage": "base"}', "[]", '{"outputs": [1]}', "{not json"])
def test_malformed_manifest_is_a_missing_artifact(tmp_path, content):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "manifest.json").write_text(content)
    with pytest.raises(MissingArtifact, match="make base"):
        require_stage(tmp_path, "base")


def test_resume_keeps_only_an_identical_attempt(tmp_path, capsys):
    def attempt(config):
        return StageRun("finetune", "finetune", tmp_path, config, {"data": "x"}, "code", [])
    first = attempt({"learning_rate": 1e-3}).fresh_tmp(resumable=True)
    (first / "checkpoint-5").mkdir()
    assert (attempt({"learning_rate": 1e-3}).fresh_tmp(resumable=True) / "checkpoint-5").is_dir()
    assert not (attempt({"learning_rate": 1e-5}).fresh_tmp(resumable=True) / "checkpoint-5").exists()
    assert "starting fresh" in capsys.readouterr().err
    again = attempt({"learning_rate": 1e-5}).fresh_tmp(resumable=True)
    (again / "checkpoint-9").mkdir()
    assert not (attempt({"learning_rate": 1e-5}).fresh_tmp(resumable=False) / "checkpoint-9").exists()  # --force


def test_code_hash_covers_the_modules_a_stage_imports_only():
    names = {p.name for p in code_dependencies(ROOT / "stages" / "finetune.py")}
    # catalog.json through task.py: which rows are trainable depends on the catalog
    assert {"artifacts.py", "cli.py", "config.py", "generation.py", "task.py", "catalog.json"} <= names
    assert not names & {"figures.py", "tiny.py", "noise.py", "backends.py", "templates.json"}


def run_module(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          **kwargs)


@pytest.mark.parametrize("override, shown", [("generate.n_examples=[/x]", "[/x]"), ("fienetune.x=1", "[fienetune]")])
def test_user_text_in_errors_is_printed_literally(override, shown):
    proc = run_module("stages.generate", "--config", "configs/smoke.toml", "--set", override)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and shown in proc.stderr


def _finished_stage(run_dir, folder="data"):
    stage = StageRun(folder, folder, run_dir, {}, {}, "code", [])
    (stage.fresh_tmp() / "x.txt").write_text("x")
    stage.publish()


def test_clean_deletes_one_run_inside_artifacts_and_honours_set(tmp_path):
    for run in ("smoke", "exp2"):
        _finished_stage(tmp_path / run)
    base = ["stages.clean", "--config", "configs/smoke.toml", "--set", f"run.artifacts_dir='{tmp_path}'"]
    dry = run_module(*base, "--set", "run.name='exp2'", "--dry-run")
    assert dry.returncode == 0 and "would delete" in dry.stderr and (tmp_path / "exp2").is_dir()
    assert run_module(*base, "--set", "run.name='exp2'").returncode == 0
    assert not (tmp_path / "exp2").exists() and (tmp_path / "smoke" / "data").is_dir()
    for bad in ("'..'", "''", "'a/b'"):
        proc = run_module(*base, "--set", f"run.name={bad}")
        assert proc.returncode == 2 and "run.name" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "smoke" / "data").is_dir() and tmp_path.is_dir()


def test_clean_deletes_only_a_run_and_never_under_a_running_stage(tmp_path):
    base = ["stages.clean", "--config", "configs/smoke.toml", "--set", f"run.artifacts_dir='{tmp_path}'"]
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "finetune.py").write_text("code, not a run")
    proc = run_module(*base, "--set", "run.name='stages'", "--dry-run")
    assert proc.returncode == 2 and "does not look like a run" in proc.stderr and "Traceback" not in proc.stderr
    _finished_stage(tmp_path / "mixed")
    (tmp_path / "mixed" / "notes.txt").write_text("someone else's")
    proc = run_module(*base, "--set", "run.name='mixed'")
    assert proc.returncode == 2 and "notes.txt" in proc.stderr and (tmp_path / "mixed" / "data").is_dir()

    _finished_stage(tmp_path / "x")
    running = StageRun("base", "base", tmp_path / "x", {}, {}, "code", [])
    running.fresh_tmp()   # this process now holds base's lock, as a running stage does
    proc = run_module(*base, "--set", "run.name='x'")
    assert proc.returncode == 4 and f"pid {os.getpid()}" in proc.stderr and running.tmp_dir.is_dir()


def test_a_stage_never_publishes_a_folder_that_vanished_under_it(tmp_path):
    import shutil
    stage = StageRun("base", "base", tmp_path, {}, {}, "code", [])
    (stage.fresh_tmp() / "tokenizer.json").write_text("{}")
    shutil.rmtree(stage.tmp_dir)   # deleted under the stage, which then writes what it still had in hand
    stage.tmp_dir.mkdir()
    (stage.tmp_dir / "model.safetensors").write_text("half")
    with pytest.raises(MissingArtifact, match="removed or replaced while base ran; nothing was published"):
        stage.publish()
    assert not stage.out_dir.exists()


@pytest.mark.parametrize("args, shown", [
    (["stages.transfer", "import", "/tmp/[/x].tar.gz"], "/tmp/[/x].tar.gz"),
    (["stages.transfer", "import", "/tmp/[bold]zz[/bold].tar.gz"], "[bold]zz[/bold]"),
    (["stages.transfer", "export", "--config", "configs/smoke.toml", "--stages", "[/x]"], "[/x]"),
])
def test_markup_in_paths_and_names_is_shown_as_written(args, shown, tmp_path):
    """rich read "[/x]" as a closing tag (MarkupError traceback) and "[bold]zz[/bold]" as style: the console
    prints every message literally now; styles come from Text objects."""
    _finished_stage(tmp_path / "smoke")
    proc = run_module(*args, *(["--set", f"run.artifacts_dir='{tmp_path}'"] if "export" in args else []))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and shown in proc.stderr, proc.stderr[-1000:]


def test_a_config_not_in_utf8_or_nested_too_deep_is_one_line(tmp_path):
    config = tmp_path / "latin1.toml"
    config.write_bytes(b'[run]\nname = "\xff"\n')
    proc = run_module("stages.generate", "--config", str(config))
    assert proc.returncode == 2 and "not UTF-8" in proc.stderr and "Traceback" not in proc.stderr
    deep = "[" * 3000 + "]" * 3000
    proc = run_module("stages.generate", "--config", "configs/smoke.toml", "--set", f"generate.n_examples={deep}")
    assert proc.returncode == 2 and "nests deeper" in proc.stderr and "Traceback" not in proc.stderr
    rows = tmp_path / "deep.jsonl"
    rows.write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    proc = run_module("stages.generate", "--config", "configs/smoke.toml", "--set", f"run.artifacts_dir='{tmp_path}'",
                      "--set", f"generate.data_file='{rows}'")
    assert proc.returncode == 2 and "deep.jsonl:1: nested deeper" in proc.stderr and "Traceback" not in proc.stderr


def test_a_file_that_cannot_be_written_is_one_line_and_nothing_published(tmp_path):
    """Files capped at 4 KiB (RLIMIT_FSIZE: a write past it fails with EFBIG, as a full disk fails with ENOSPC):
    generate names the file it could not write, exits 1 and publishes nothing."""
    import resource
    import signal

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # the write fails instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    proc = subprocess.run([sys.executable, "-m", "stages.generate", "--config", "configs/smoke.toml", "--set",
                           f"run.artifacts_dir='{tmp_path}'"], cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=small_files, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "cannot write " in proc.stderr and "nothing was published" in proc.stderr
    assert str(tmp_path / "smoke" / ".data.tmp") in proc.stderr   # the file, in the temporary folder
    assert not (tmp_path / "smoke" / "data").exists()


@pytest.mark.parametrize("override, needle", [("finetune.epochs=inf", "finite"), ("finetune.learning_rate=nan", "finite")])
def test_non_finite_numbers_are_config_errors(override, needle):
    proc = run_module("stages.finetune", "--config", "configs/smoke.toml", "--set", override)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr


def test_a_scalar_where_a_table_belongs_is_one_line(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("run = 5\n")
    proc = run_module("stages.generate", "--config", str(config), "--set", "run.name=x")
    assert proc.returncode == 2 and "run: expected a table" in proc.stderr and "Traceback" not in proc.stderr


def test_serving_on_a_busy_port_is_its_own_one_line_exit(tmp_path):
    import socket
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = run_module("stages.serve", "--config", "configs/smoke.toml", "--set", f"serve.port={port}",
                          "--set", f"run.artifacts_dir='{tmp_path}'")
    assert proc.returncode == 4 and f"127.0.0.1:{port} is not free" in proc.stderr and "Traceback" not in proc.stderr


def test_a_second_run_of_the_same_stage_waits_for_none_and_names_the_holder(tmp_path):
    first = StageRun("gguf", "gguf", tmp_path, {}, {}, "code", [])
    first.fresh_tmp()
    probe = subprocess.run([sys.executable, "-c", (
        "import sys; from pathlib import Path; from cart_intent.artifacts import StageRun, StageBusy\n"
        f"try:\n    StageRun('gguf', 'gguf', Path({str(tmp_path)!r}), {{}}, {{}}, 'code', []).fresh_tmp()\n"
        "except StageBusy as err:\n    print(err); sys.exit(4)")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 4 and f"pid {os.getpid()}" in probe.stdout
    assert first.tmp_dir.is_dir()   # the holder's temporary folder is untouched


def test_a_free_port_is_never_the_one_to_avoid():
    """serve binds its own port only after its llama-server child is ready, so the child's port is drawn with
    serve's excluded (the kernel once handed out the same port to both, and the child took it)."""
    from cart_intent.child import free_port
    taken = free_port()
    assert all(free_port(avoid=taken) != taken for _ in range(300))
