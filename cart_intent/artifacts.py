"""Artifact I/O shared by every stage.

A stage writes into `<run>/.<stage>.tmp`, which is renamed to `<run>/<stage>` only
when complete; `manifest.json` is written last, so a folder without one is never
trusted. The manifest records config and code hashes, input hashes, every output
file with size and hash, package versions, host facts and times. A rerun whose
fingerprint (config + code + inputs + the image it runs in) matches the existing manifest is skipped.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from .host import host_facts

MANIFEST = "manifest.json"
# the temporary folder this process's stage writes into: named when a write fails without naming its file
WRITING_INTO: list[Path] = []
RESUME_STAMP = ".fingerprint.json"  # in a temporary folder: what the attempt that wrote it ran with
REPO_DIR = Path(__file__).resolve().parents[1]
# top-level packages whose modules enter a code hash: the commands and the library
PROJECT_PACKAGES = ("stages", "cart_intent")


class MissingArtifact(Exception):
    """An upstream artifact is absent or incomplete (exit code 3)."""


class StageBusy(Exception):
    """Another process is writing the same stage of the same run (exit code 4)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def data_file(module: str, name: str) -> Path:
    """A data file shipped beside a module (catalog.json, templates.json): found through this call by
    code_dependencies, so editing the file reruns exactly the stages whose code reads it."""
    return Path(module).with_name(name)


def code_dependencies(source: Path) -> list[Path]:
    """The project modules a file imports, transitively (cart_intent modules and a stage's own helpers), and the
    data files they name through `data_file(__file__, "<name>")`."""
    found: dict[Path, None] = {}
    data: set[Path] = set()
    pending = [source]
    while pending:
        path = pending.pop()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        data |= {path.parent / name for name in data_files_named(tree)}
        for module in imported_modules(tree, path.parent):
            if module.is_file() and module != source and module not in found:
                found[module] = None
                pending.append(module)
    return sorted(found) + sorted(data)


def data_files_named(tree: ast.AST) -> list[str]:
    """The names in the `data_file(__file__, "<name>")` calls of a module."""
    return [node.args[1].value for node in ast.walk(tree) if isinstance(node, ast.Call) and len(node.args) == 2
            and getattr(node.func, "id", getattr(node.func, "attr", None)) == "data_file"
            and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)]


def imported_modules(tree: ast.AST, folder: Path) -> list[Path]:
    """Files of the `from X import Y` statements in tree that could be project modules (X or X.Y)."""
    paths = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:  # from . import x, from .x import y: beside the importing file
            base = folder.joinpath(*([".."] * (node.level - 1)), *(node.module or "").split(".")).resolve()
        elif (node.module or "").split(".")[0] in PROJECT_PACKAGES:
            base = REPO_DIR.joinpath(*node.module.split("."))
        else:
            continue
        paths += [base.with_suffix(".py")] + [base / f"{alias.name}.py" for alias in node.names]
    return paths


def code_hash(stage_file: str | Path) -> str:
    """Hash of the stage script and the library modules (and data files) it uses: changing the code a stage
    runs reruns it; editing a module it never imports does not."""
    stage = Path(stage_file).resolve()
    files = [stage, *code_dependencies(stage)]
    return sha256_json({p.relative_to(REPO_DIR).as_posix(): sha256_file(p) for p in files})


def package_versions(names: list[str]) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def runner_facts() -> dict:
    """Which runner produced a stage: `local` (.venv) or `docker`, with the image compose.yaml names and, when
    the host knew them, the image's ID and registry digest (set by compose.yaml; a container cannot ask the
    engine)."""
    facts = {"kind": os.environ.get("CART_RUNNER") or "local"}
    for key, variable in (("image", "CART_IMAGE"), ("id", "CART_IMAGE_ID"), ("digest", "CART_IMAGE_DIGEST")):
        if os.environ.get(variable):
            facts[key] = os.environ[variable]
    return facts


def environment_id() -> str:
    """The environment a stage ran in, as part of its fingerprint, so a stage reruns when its image changes:
    the image ID under docker (a content hash, the same after a push and pull), else the image reference
    (its tag hashes the image's inputs); `local` for .venv."""
    facts = runner_facts()
    if facts["kind"] == "local":
        return "local"
    return facts.get("id") or facts.get("image") or facts["kind"]


def _read_json_or_none(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_manifest(folder: Path) -> dict | None:
    manifest = _read_json_or_none(folder / MANIFEST)
    return manifest if isinstance(manifest, dict) else None


def input_fingerprint(manifests: dict[str, dict]) -> dict[str, str]:
    """Upstream stage -> hash of its outputs, as the manifests list them."""
    return {name: sha256_json(m["outputs"]) for name, m in sorted(manifests.items())}


@dataclass
class StageRun:
    """One execution of a stage: where it writes and what it has recorded so far."""
    stage: str
    folder: str
    run_dir: Path
    config: dict
    inputs: dict[str, str]
    code: str
    packages: list[str]
    tmp_dir: Path = field(init=False)
    out_dir: Path = field(init=False)
    started: float = field(default_factory=time.time)
    results: dict = field(default_factory=dict)

    def __post_init__(self):
        self.out_dir = self.run_dir / self.folder
        # next to the output folder, so the final rename never crosses folders (profiles/<host>/cpu)
        self.tmp_dir = self.out_dir.parent / f".{self.out_dir.name}.tmp"

    @property
    def fingerprint(self) -> dict:
        return {"config_hash": sha256_json(self.config), "code_hash": self.code, "inputs": self.inputs,
                "environment": environment_id()}

    def up_to_date(self) -> bool:
        old = read_manifest(self.out_dir)
        return old is not None and {k: old.get(k) for k in self.fingerprint} == self.fingerprint

    def lock(self) -> None:
        """Hold `.<folder>.lock` beside the output until this process ends: a second run of the same stage and
        run (or `make clean` of the run) stops with one line naming the holder instead of deleting the first
        one's temporary folder."""
        path = self.out_dir.parent / f".{self.out_dir.name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_handle = take_lock(path, self.out_dir, f"pid {os.getpid()} ({self.stage}, since "
                                                          f"{time.strftime('%H:%M:%S')})")  # released at exit

    def fresh_tmp(self, resumable: bool = False) -> Path:
        """The temporary folder (the stage's lock taken first). `resumable` keeps a previous attempt's files only
        when that attempt had the same fingerprint (config, code, inputs); any other leftover is deleted, and
        the user told why."""
        self.lock()
        stamp = self.tmp_dir / RESUME_STAMP
        if self.tmp_dir.exists():
            same = resumable and stamp.is_file() and _read_json_or_none(stamp) == self.fingerprint
            if resumable and not same:
                print(f"{self.stage}: an interrupted attempt with other config, code or inputs is in "
                      f"{self.tmp_dir}; starting fresh", file=sys.stderr)
            if not same:
                shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        WRITING_INTO[:] = [self.tmp_dir]
        stamp.write_text(json.dumps(self.fingerprint, sort_keys=True))
        return self.tmp_dir

    def publish(self) -> dict:
        """Rename the temporary folder into place, then write the manifest last. The stamp fresh_tmp wrote must
        still be there: a folder deleted under the stage (and maybe half rewritten) is never published."""
        stamp = self.tmp_dir / RESUME_STAMP
        if _read_json_or_none(stamp) != self.fingerprint:
            raise MissingArtifact(f"{self.tmp_dir} was removed or replaced while {self.stage} ran; nothing was "
                                  f"published: run it again")
        stamp.unlink()
        outputs = {str(p.relative_to(self.tmp_dir)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                   for p in sorted(self.tmp_dir.rglob("*")) if p.is_file()}
        if self.out_dir.exists():
            trash = self.out_dir.parent / f".{self.out_dir.name}.old"
            shutil.rmtree(trash, ignore_errors=True)
            self.out_dir.rename(trash)
            shutil.rmtree(trash)
        self.tmp_dir.rename(self.out_dir)
        manifest = {
            "stage": self.stage, **self.fingerprint, "config": self.config, "outputs": outputs,
            "results": self.results, "packages": package_versions(self.packages), "host": host_facts(),
            "runner": runner_facts(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": round(time.time() - self.started, 3),
        }
        tmp_manifest = self.out_dir / (MANIFEST + ".tmp")
        tmp_manifest.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
        tmp_manifest.rename(self.out_dir / MANIFEST)
        return manifest


def take_lock(path: Path, guarded: Path, holder: str):
    """An exclusive lock on path (created if missing), held as long as the returned handle is open, with holder
    written into it; StageBusy naming the present holder when another process has it."""
    import fcntl
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        present = handle.read().strip() or "another process"
        handle.close()
        raise StageBusy(f"{guarded} is being written by {present}; wait for it to finish or stop it") from None
    handle.seek(0)
    handle.truncate()
    handle.write(holder)
    handle.flush()
    return handle


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def jsonl_lines(text: str) -> list[str]:
    """The lines of JSON Lines text: split at "\n" only. Rows are written with ensure_ascii=False, which leaves
    U+2028, U+2029 and U+0085 unescaped inside strings, and str.splitlines() would cut a row at each of them."""
    return text.split("\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in jsonl_lines(Path(path).read_text(encoding="utf-8")) if line.strip()]


@contextmanager
def timer(results: dict, key: str):
    start = time.perf_counter()
    yield
    results[key] = round(time.perf_counter() - start, 3)
