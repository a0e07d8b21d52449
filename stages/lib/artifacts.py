"""Artifact I/O shared by every stage.

A stage writes into `<run>/.<stage>.tmp`, which is renamed to `<run>/<stage>` only
when complete; `manifest.json` is written last, so a folder without one is never
trusted. The manifest records config and code hashes, input hashes, every output
file with size and hash, package versions, host facts and times. A rerun whose
fingerprint (config + code + inputs) matches the existing manifest is skipped.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

MANIFEST = "manifest.json"
LIB_DIR = Path(__file__).resolve().parent


class MissingArtifact(Exception):
    """An upstream artifact is absent or incomplete (exit code 3)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def code_hash(stage_file: str | Path) -> str:
    """Hash of the stage script and the shared library: changing code reruns the stage."""
    files = [Path(stage_file).resolve(), *sorted(LIB_DIR.glob("*.py")), *sorted(LIB_DIR.glob("*.json"))]
    return sha256_json({p.name: sha256_file(p) for p in files})


def package_versions(names: list[str]) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def host_facts() -> dict:
    facts = {"hostname": platform.node(), "os": platform.platform(), "machine": platform.machine(),
             "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                facts["ram_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    return facts


def runner_facts() -> dict:
    """Which runner produced a stage: `local` (.venv) or `docker`, with the image compose.yaml names and,
    when the host knew it, the image's digest (set by compose.yaml; a container cannot ask the engine)."""
    facts = {"kind": os.environ.get("CART_RUNNER") or "local"}
    for key, variable in (("image", "CART_IMAGE"), ("digest", "CART_IMAGE_DIGEST")):
        if os.environ.get(variable):
            facts[key] = os.environ[variable]
    return facts


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def require_stage(run_dir: Path, stage: str, make_target: str) -> dict:
    """The manifest of a finished upstream stage, or MissingArtifact naming the make target."""
    manifest = read_manifest(run_dir / stage)
    if manifest is None:
        raise MissingArtifact(f"{run_dir / stage} is missing or incomplete: run `make {make_target}` first "
                              f"(with the same CONFIG)")
    return manifest


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
        return {"config_hash": sha256_json(self.config), "code_hash": self.code, "inputs": self.inputs}

    def up_to_date(self) -> bool:
        old = read_manifest(self.out_dir)
        return old is not None and {k: old.get(k) for k in self.fingerprint} == self.fingerprint

    def fresh_tmp(self, keep: bool = False) -> Path:
        """The temporary folder; `keep` leaves a previous attempt's files (for resuming)."""
        if self.tmp_dir.exists() and not keep:
            shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return self.tmp_dir

    def publish(self) -> dict:
        """Rename the temporary folder into place, then write the manifest last."""
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


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@contextmanager
def timer(results: dict, key: str):
    start = time.perf_counter()
    yield
    results[key] = round(time.perf_counter() - start, 3)
