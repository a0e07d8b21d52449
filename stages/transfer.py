"""Moving a run between hosts: fine-tuning and GPTQ happen on a GPU host, CPU benchmarks on CPU hosts.

`export` packs a run's stage folders (all of them, or those --stages names), each file with its
folder's manifest.json, into one tar.gz. `import` unpacks one into a hidden folder beside the runs,
checks that every folder's files are exactly its manifest's outputs (nothing missing, nothing extra,
every size and SHA-256 equal) and only then renames each folder into place, so no stage ever reads a
corrupted or half-copied run. Archives holding links, devices or paths outside the run are refused.

    python -m stages.transfer export --config configs/tiny.toml        # -> artifacts/tiny.tar.gz
    python -m stages.transfer export --config configs/paper.toml --stages merge,gptq,profiles --out gpu.tar.gz
    python -m stages.transfer import gpu.tar.gz [--artifacts-dir artifacts]

Exit codes: 0 ok, 2 bad usage or config, 3 a stage folder or an archive that does not match its manifests.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import platform
import re
import shutil
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path, PurePosixPath

from rich.table import Table
from rich.text import Text

from cart_intent.artifacts import MANIFEST, read_manifest, sha256_file
from cart_intent.cli import EXIT_CONFIG, EXIT_OK, EXIT_UPSTREAM, console
from cart_intent.config import ConfigError, RunConfig, load_stage_config

INDEX = "cart-intent-transfer.json"  # an archive's first member: its run and its folders' manifest hashes
STAGE_DEPTH = 3                      # profiles/<host-id>/cpu is the deepest stage folder


class TransferError(Exception):
    """A stage folder or an archive that does not match its manifests (exit code 3)."""


EXTRACT_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}

def stage_folders(run_dir: Path) -> list[str]:
    """Every finished stage folder of a run, relative to it (data, eval-x, profiles/<host-id>/cpu, ...);
    hidden folders (temporary, caches) and folders without a manifest are never exported."""
    found = []

    def walk(folder: Path, depth: int) -> None:
        for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if (child / MANIFEST).is_file():
                found.append(child.relative_to(run_dir).as_posix())
            elif depth < STAGE_DEPTH:
                walk(child, depth + 1)

    if run_dir.is_dir():
        walk(run_dir, 1)
    return found


def select(run_dir: Path, folders: list[str], wanted: list[str]) -> list[str]:
    """The folders named by path (`merge`, `profiles`, `profiles/<host-id>/cpu`) or by stage name
    (`evaluate`, `profile-cpu`)."""
    if not wanted:
        return folders
    chosen = []
    for name in wanted:
        stage = name.replace("-", "_")
        hits = [f for f in folders if f == name.strip("/") or f.startswith(name.strip("/") + "/")
                or (read_manifest(run_dir / f) or {}).get("stage") == stage]
        if not hits:
            raise ConfigError(f"--stages {name}: no finished stage folder of that name in {run_dir} "
                              f"(there: {', '.join(folders) or 'none'})")
        chosen += [f for f in hits if f not in chosen]
    return chosen


class _HashingReader:
    """Hashes a file while tarfile copies it, so each file is read once and checked as it is packed."""

    def __init__(self, fh):
        self.fh, self.sha256 = fh, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.sha256.update(data)
        return data


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))


def export_run(run_dir: Path, folders: list[str], out: Path) -> list[tuple[str, int, int]]:
    """Write the archive (renamed into place when complete); (folder, files, bytes) per folder."""
    index = {"format": 1, "run": run_dir.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "host": platform.node(), "folders": {f: sha256_file(run_dir / f / MANIFEST) for f in folders}}
    packed = []
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    try:
        # compresslevel 1: model weights barely compress, and level 6 is several times slower on them
        with tarfile.open(partial, "w:gz", compresslevel=1) as tar:
            _add_bytes(tar, INDEX, json.dumps(index, indent=2).encode())
            for folder in folders:
                outputs = (read_manifest(run_dir / folder) or {}).get("outputs")
                if not isinstance(outputs, dict):
                    raise TransferError(f"{run_dir / folder / MANIFEST} lists no outputs: rerun that stage (FORCE=1)")
                for relative, expected in sorted(outputs.items()):
                    path = run_dir / folder / relative
                    if not path.is_file() or path.stat().st_size != expected["bytes"]:
                        raise TransferError(f"{path} is missing or changed since its stage wrote it: rerun "
                                            f"that stage (FORCE=1) before exporting")
                    info = tarfile.TarInfo(f"{run_dir.name}/{folder}/{relative}")
                    info.size, info.mtime, info.mode = expected["bytes"], int(path.stat().st_mtime), 0o644
                    with open(path, "rb") as fh:
                        reader = _HashingReader(fh)
                        tar.addfile(info, reader)
                    if reader.sha256.hexdigest() != expected["sha256"]:
                        raise TransferError(f"{path} does not match its SHA-256 in {folder}/{MANIFEST}: rerun "
                                            f"that stage (FORCE=1) before exporting")
                manifest_bytes = (run_dir / folder / MANIFEST).read_bytes()
                _add_bytes(tar, f"{run_dir.name}/{folder}/{MANIFEST}", manifest_bytes)
                packed.append((folder, len(outputs), sum(o["bytes"] for o in outputs.values())))
        partial.rename(out)
    finally:
        partial.unlink(missing_ok=True)
    return packed


def _safe_relative(name: str) -> bool:
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and "\\" not in name and ".." not in path.parts


MAX_MANIFEST_BYTES = 64 << 20  # the index and each manifest: read before anything else is written


def _unpack(archive: Path, staging: Path) -> dict:
    """Extract regular files and folders only: any other member, or a path leaving the staging folder,
    refuses the whole archive. The index and the manifests come out first; a member they do not list, or
    of another size than listed, refuses it before any other byte is written. Returns the index."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()  # reads to the end of the archive: a truncated one fails here
            for member in members:
                if not _safe_relative(member.name):
                    raise TransferError(f"{archive}: unsafe path {member.name!r} in the archive; refused")
                if not (member.isfile() or member.isdir()):
                    raise TransferError(f"{archive}: {member.name} is a link or device, not a file; refused")
            by_name = {m.name: m for m in members if m.isfile()}
            _extract(tar, staging, [by_name[INDEX]] if INDEX in by_name else [], archive, MAX_MANIFEST_BYTES)
            index = _read_index(archive, staging)
            manifests = [by_name[name] for name in (f"{index['run']}/{f}/{MANIFEST}" for f in index["folders"])
                         if name in by_name]
            _extract(tar, staging, manifests, archive, MAX_MANIFEST_BYTES)
            rest = [m for m in members if m.isfile() and m.name != INDEX and m not in manifests]
            _check_listed(archive, staging, index, rest)
            _extract(tar, staging, rest, archive)
            return index
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise TransferError(f"{archive} is not a complete tar.gz archive ({err}); copy it again") from None


def _extract(tar: tarfile.TarFile, staging: Path, members: list, archive: Path, cap: int | None = None) -> None:
    """The member checks in _unpack are what keeps the archive inside staging; tarfile's own "data" filter
    (Python 3.11.4 and newer, not Debian 12's 3.11.2) is a second guard where there is one."""
    big = next((m for m in members if cap is not None and m.size > cap), None)
    if big is not None:
        raise TransferError(f"{archive}: {big.name} is {big.size} bytes, too big for an index or manifest; refused")
    tar.extractall(staging, members=members, **EXTRACT_FILTER)


def _check_listed(archive: Path, staging: Path, index: dict, members: list) -> None:
    """Every other member is an output some manifest lists, with the size it lists."""
    listed = {}
    for folder in index["folders"]:
        if not (staging / index["run"] / folder / MANIFEST).is_file():
            raise TransferError(f"{archive}: {folder}/{MANIFEST} is missing; the archive is incomplete, copy it again")
        outputs = (read_manifest(staging / index["run"] / folder) or {}).get("outputs")
        if isinstance(outputs, dict):
            listed.update({f"{index['run']}/{folder}/{name}": entry for name, entry in outputs.items()})
    for member in members:
        entry = listed.get(member.name)
        if not isinstance(entry, dict):
            raise TransferError(f"{archive}: {member.name} is not listed in any manifest; refused")
        if member.size != entry.get("bytes"):
            raise TransferError(f"{archive}: {member.name} is {member.size} bytes, its manifest lists "
                                f"{entry.get('bytes')}; the archive is corrupted, copy it again")


def _read_index(archive: Path, staging: Path) -> dict:
    try:
        index = json.loads((staging / INDEX).read_text())
        run, folders = index["run"], index["folders"]
    except (OSError, ValueError, KeyError, TypeError):
        raise TransferError(f"{archive}: no readable {INDEX}; not an archive made by `make export`") from None
    if not (isinstance(run, str) and re.fullmatch(r"[A-Za-z0-9_-]+", run) and isinstance(folders, dict) and folders):
        raise TransferError(f"{archive}: {INDEX} names no run or no stage folders")
    for folder in folders:
        if not _safe_relative(folder) or any(part.startswith(".") for part in PurePosixPath(folder).parts):
            raise TransferError(f"{archive}: unsafe stage folder {folder!r} in {INDEX}; refused")
        if any(other != folder and other.startswith(folder + "/") for other in folders):
            raise TransferError(f"{archive}: stage folder {folder!r} holds another one; refused")
    return index


def _verify(archive: Path, staging: Path, index: dict) -> None:
    """Every folder's files are exactly its manifest's outputs, with their sizes and SHA-256."""
    run_root = staging / index["run"]
    expected = {INDEX}
    for folder, manifest_sha256 in index["folders"].items():
        manifest_path = run_root / folder / MANIFEST
        if not manifest_path.is_file():
            raise TransferError(f"{archive}: {folder}/{MANIFEST} is missing; the archive is incomplete, copy it again")
        if sha256_file(manifest_path) != manifest_sha256:
            raise TransferError(f"{archive}: {folder}/{MANIFEST} differs from the archive's index; refused")
        outputs = (read_manifest(run_root / folder) or {}).get("outputs")
        if not isinstance(outputs, dict):
            raise TransferError(f"{archive}: {folder}/{MANIFEST} lists no outputs; refused")
        for relative, record in sorted(outputs.items()):
            path = run_root / folder / relative
            shown = f"{index['run']}/{folder}/{relative}"
            if not _safe_relative(relative) or not path.is_file():
                raise TransferError(f"{archive}: {shown} is missing; the archive is incomplete, copy it again")
            if path.stat().st_size != record.get("bytes") or sha256_file(path) != record.get("sha256"):
                raise TransferError(f"{archive}: {shown} is corrupted (its size or SHA-256 differs from "
                                    f"{folder}/{MANIFEST}); copy the archive again")
            expected.add(f"{index['run']}/{folder}/{relative}")
        expected.add(f"{index['run']}/{folder}/{MANIFEST}")
    extra = sorted({p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()} - expected)
    if extra:
        raise TransferError(f"{archive}: {extra[0]} is not listed in any manifest ({len(extra)} such files); refused")


def import_run(archive: Path, artifacts_dir: Path) -> list[tuple[str, str]]:
    """Unpack, verify, then rename each folder into artifacts_dir/<run>/; (folder, what happened) per folder."""
    if not archive.is_file():
        raise ConfigError(f"{archive}: no such file")
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    # beside the runs, so the final renames stay on one file system (each one atomic)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=artifacts_dir))
    try:
        index = _unpack(archive, staging)
        _verify(archive, staging, index)
        placed = []
        for folder in index["folders"]:
            source, target = staging / index["run"] / folder, artifacts_dir / index["run"] / folder
            if (target / MANIFEST).is_file() and sha256_file(target / MANIFEST) == index["folders"][folder]:
                placed.append((folder, "unchanged"))
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            replaced = target.exists()
            if replaced:
                old = target.parent / f".{target.name}.old"
                shutil.rmtree(old, ignore_errors=True)
                target.rename(old)
                source.rename(target)
                shutil.rmtree(old)
            else:
                source.rename(target)
            placed.append((folder, "replaced" if replaced else "added"))
        return placed
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def default_archive(run: RunConfig, wanted: list[str]) -> Path:
    suffix = "-" + "+".join(re.sub(r"[^A-Za-z0-9_-]+", "-", w.strip("/")) for w in wanted) if wanted else ""
    return Path(run.artifacts_dir) / f"{run.name}{suffix}.tar.gz"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    e = commands.add_parser("export", help="pack a run's stage folders and manifests into one tar.gz")
    e.add_argument("--config", default="configs/smollm2.toml", help="run config (TOML)")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set run.artifacts_dir=elsewhere (repeatable)")
    e.add_argument("--stages", default="", help="comma-separated stage folders or stage names "
                   "(merge,gptq,profiles; default: every finished stage folder)")
    e.add_argument("--out", help="archive to write (default: <artifacts_dir>/<run>[-<stages>].tar.gz)")
    i = commands.add_parser("import", help="check an archive against its manifests, then unpack it")
    i.add_argument("archive", help="a tar.gz written by `export`")
    i.add_argument("--artifacts-dir", default="artifacts", help="where runs live (default: artifacts)")
    args = p.parse_args(argv)
    try:
        if args.command == "export":
            run, _ = load_stage_config(args.config, "run", RunConfig, args.overrides)
            wanted = [w.strip() for w in args.stages.split(",") if w.strip()]
            available = stage_folders(run.run_dir)
            if not available:
                raise TransferError(f"{run.run_dir} has no finished stage folder: run `make all` (with the same "
                                    f"CONFIG) first")
            out = Path(args.out) if args.out else default_archive(run, wanted)
            if out.is_dir() or not out.name.endswith(".tar.gz"):
                raise ConfigError(f"--out {out}: give the archive's file name, ending in .tar.gz")
            try:
                packed = export_run(run.run_dir, select(run.run_dir, available, wanted), out)
            except OSError as err:   # a folder that is not writable, a full disk: nothing was left behind
                raise ConfigError(f"--out {out}: cannot write it ({err.strerror}); nothing was written") from None
            table = Table(title=f"exported {run.run_dir} -> {out} ({out.stat().st_size / 2**20:.1f} MiB)",
                          title_justify="left")
            for column in ("stage folder", "files", "MiB"):
                table.add_column(column, justify="left" if column == "stage folder" else "right")
            for folder, files, size in packed:
                table.add_row(folder, str(files), f"{size / 2**20:.1f}")
        else:
            archive, artifacts_dir = Path(args.archive), Path(args.artifacts_dir)
            placed = import_run(archive, artifacts_dir)
            table = Table(title=f"imported {archive} into {artifacts_dir} (every file checked first)",
                          title_justify="left")
            table.add_column("stage folder")
            table.add_column("")
            for folder, status in placed:
                table.add_row(folder, status)
        console.print(table)
        return EXIT_OK
    except ConfigError as err:
        console.print(Text.assemble(("usage error ", "red"), str(err)))
        return EXIT_CONFIG
    except TransferError as err:
        console.print(Text.assemble(("refused ", "red"), str(err)))
        return EXIT_UPSTREAM


if __name__ == "__main__":
    sys.exit(main())
