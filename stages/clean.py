"""clean: delete one run's artifacts (artifacts_dir/<run.name> of the config), nothing else.

The run is read through the same validated config as every stage (so `--set run.name=...` applies and a
name like ".." or "" is refused); the folder is resolved and must lie inside artifacts_dir, and be a run: stage
folders with their manifests, and the stages' own hidden lock, temporary and old folders, nothing else. Every
stage lock of the run is taken first, so a stage that is running stops the clean (exit 4, naming it).

    python -m stages.clean --config configs/smoke.toml --dry-run    # list what would be deleted
    make clean CONFIG=configs/smoke.toml                            # delete it
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from cart_intent import cli
from cart_intent.artifacts import read_manifest, take_lock
from cart_intent.config import ConfigError

# what a stage leaves beside its folder: .<folder>.lock, .<folder>.tmp, .<folder>.old
STAGE_SIDE_ENTRY = re.compile(r"\.[\w.-]+\.(lock|tmp|old)")


@dataclass
class CleanConfig:  # clean has no table of its own: the [run] table says which folder
    def validate(self) -> None:
        pass


def run(run_cfg, cfg: CleanConfig, args) -> int:
    root = run_cfg.run_dir.parent.resolve()
    target = run_cfg.run_dir.resolve()
    if target.parent != root:
        raise ConfigError(f"run.name {run_cfg.name!r}: {target} is not a folder directly inside {root}")
    if not target.exists():
        cli.console.print(f"nothing to delete: {target} does not exist")
        return 0
    strangers = not_of_a_run(target)
    if strangers:
        raise ConfigError(f"{target} does not look like a run (no stage manifest in {', '.join(strangers[:5])}): "
                          f"nothing deleted; check run.name and run.artifacts_dir")
    locks = [take_lock(path, path.parent, f"pid {os.getpid()} (clean)") for path in sorted(target.rglob(".*.lock"))]
    entries = sorted(p.name for p in target.iterdir())
    verb = "would delete" if args.dry_run else "deleting"
    cli.console.print(f"{verb} {target} ({len(entries)} entries: {', '.join(entries)})")
    if not args.dry_run:
        shutil.rmtree(target)
    for handle in locks:
        handle.close()
    return 0


def not_of_a_run(target: Path) -> list[str]:
    """The entries of target that no stage wrote (every entry when no stage manifest is there at all)."""
    entries = sorted(target.iterdir())
    stages = {p for p in entries if p.is_dir() and read_manifest(p) is not None}
    strangers = [p.name for p in entries if not (
        p in stages or STAGE_SIDE_ENTRY.fullmatch(p.name) or (p.name == "profiles" and p.is_dir()))]
    has_manifest = bool(stages) or any(target.glob("profiles/*/*/manifest.json"))
    return strangers if has_manifest else [p.name for p in entries] or [target.name]


def main(argv=None) -> int:
    return cli.run_stage(__doc__, "clean", CleanConfig, run, argv, add_args=lambda p: p.add_argument(
        "--dry-run", action="store_true", help="list the folder and its entries, delete nothing"))


if __name__ == "__main__":
    sys.exit(main())
