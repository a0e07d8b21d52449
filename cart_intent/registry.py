"""The pipeline in one table: each stage's module, make target, output folder and the upstream folders it reads.

`upstream(run_dir, stage)` is how a stage gets its inputs: it verifies every folder the stage declares against
that folder's manifest (`require_stage`) and returns the manifests that make up the stage's input
fingerprint, so a folder a stage reads is always in its fingerprint and nothing else is. The Makefile's
prerequisites are checked against this table by a test, and the integration tests record every file a stage
opens under the run and check it against `reads` (tests/conftest.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import artifacts


@dataclass(frozen=True)
class Stage:
    name: str
    target: str                          # make <target>
    folder: str | None                   # its output under artifacts/<run>/ ("*" : a host id); None: writes none
    reads: tuple[str, ...] = ()          # upstream stages whose folders it needs
    reads_if_present: tuple[str, ...] = ()  # read (and fingerprinted) when finished; never required
    make_after: tuple[str, ...] = ()     # Make runs these first although the stage runs without them
    module: str = ""                     # python -m stages.<module>; "": its name


PIPELINE = ("generate", "base", "finetune", "merge", "gptq", "gguf", "baseline", "evaluate", "evaluate_set",
            "profile_cpu", "profile_gpu", "loadtest")
STAGES = {stage.name: stage for stage in (
    Stage("generate", "generate", "data"),
    Stage("base", "base", "base", ("generate",)),
    Stage("finetune", "finetune", "finetune", ("generate", "base")),
    Stage("merge", "merge", "merge", ("generate", "base", "finetune")),
    Stage("gptq", "gptq", "gptq", ("generate", "base", "merge")),
    Stage("gguf", "gguf", "gguf", ("generate", "base", "merge")),
    Stage("baseline", "baseline", "baseline", ("generate", "base")),
    Stage("evaluate", "evaluate", "eval", ("generate", "base", "merge", "gptq", "gguf")),
    # `evaluate --data FILE`: the same stage on a hand-written set, into eval-<file name>
    Stage("evaluate_set", "evaluate", "eval-*", ("generate", "base", "merge", "gptq", "gguf"), ("evaluate",),
          module="evaluate"),   # eval/'s fallback thresholds, when it has them
    Stage("profile_cpu", "profile-cpu", "profiles/*/cpu", ("generate", "gguf")),
    Stage("profile_gpu", "profile-gpu", "profiles/*/gpu", ("generate", "base", "gptq")),
    Stage("loadtest", "loadtest", "profiles/*/serve", ("generate", "gguf"), ("evaluate",)),
    # the report reads every finished folder of the run (tables, training curves, sizes, timings)
    Stage("report", "report", "report", ("evaluate", "baseline"), PIPELINE,
          ("profile_cpu", "profile_gpu", "loadtest")),
    # tools: compare reads each run it is given (and writes artifacts/compare/), serve and predict write nothing
    Stage("compare", "compare", None, ("evaluate",), (*PIPELINE, "report")),
    Stage("serve", "serve", None, ("generate", "gguf"), ("evaluate",)),   # the fallback's thresholds
    Stage("predict", "predict", None, ("generate", "gguf"), ("evaluate",)),
)}


def owner(folder: str) -> Stage:
    """The stage that writes `folder` under a run (eval-realistic: evaluate on a set; profiles/<host>/cpu:
    profile_cpu); KeyError for a folder no stage writes."""
    for stage in STAGES.values():
        if stage.folder and folder.count("/") == stage.folder.count("/") and Path(folder).match(stage.folder):
            return stage
    raise KeyError(folder)


def target_of(folder: str) -> str:
    """The make target that writes `folder`."""
    return owner(folder).target


def require_stage(run_dir: Path, folder: str) -> dict:
    """The manifest of a finished upstream folder whose files are still what it lists, or MissingArtifact naming
    the make target that writes it. Every file's size is checked; its SHA-256 too unless the file is no newer
    than the manifest (the fast path: a truncated file changes size, an edited one its time)."""
    path, target = run_dir / folder, target_of(folder)
    manifest = artifacts.read_manifest(path)
    if manifest is None or not isinstance(manifest.get("outputs"), dict):
        raise artifacts.MissingArtifact(f"{path} is missing or incomplete: run `make {target}` first "
                                        f"(with the same CONFIG)")
    written = (path / artifacts.MANIFEST).stat().st_mtime
    for name, entry in manifest["outputs"].items():
        file = path / name
        stat = file.stat() if file.is_file() else None
        intact = stat is not None and isinstance(entry, dict) and stat.st_size == entry.get("bytes") and (
            stat.st_mtime <= written or artifacts.sha256_file(file) == entry.get("sha256"))
        if not intact:
            raise artifacts.MissingArtifact(f"{file} is missing or differs from {path / artifacts.MANIFEST}: "
                                            f"rebuild it with `make {target} FORCE=1` (same CONFIG)")
    return manifest


def finished(run_dir: Path, stage: str) -> list[str]:
    """Every finished output folder of `stage` in the run, relative to it (a pattern may match several: the
    profiles of each host, each hand-written set)."""
    folders = sorted(path.parent for path in run_dir.glob(f"{STAGES[stage].folder}/{artifacts.MANIFEST}"))
    return [folder.relative_to(run_dir).as_posix() for folder in folders if artifacts.read_manifest(folder)]


def upstream(run_dir: Path, stage: str, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """Folder -> verified manifest of what `stage` reads: each of its `reads` (MissingArtifact names the make
    target when one is absent or altered) but those in `skip` (read only under a setting the stage checks),
    then every finished folder of its `reads_if_present`."""
    declared = STAGES[stage]
    unknown = set(skip) - set(declared.reads)
    assert not unknown, f"{stage} skips {unknown}, which it does not declare"
    manifests = {STAGES[name].folder: require_stage(run_dir, STAGES[name].folder)
                 for name in declared.reads if name not in skip}
    for name in declared.reads_if_present:
        for folder in finished(run_dir, name):
            if folder not in manifests:
                manifests[folder] = require_stage(run_dir, folder)
    return manifests
