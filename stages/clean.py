"""clean: delete one run's artifacts (artifacts_dir/<run.name> of the config), nothing else.

The run is read through the same validated config as every stage (so `--set run.name=...` applies and a
name like ".." or "" is refused); the folder is resolved and must lie inside artifacts_dir.

    python -m stages.clean --config configs/smoke.toml --dry-run    # list what would be deleted
    make clean CONFIG=configs/smoke.toml                            # delete it
"""
from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass

from stages.lib import cli
from stages.lib.config import ConfigError


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
        cli.console.print(f"nothing to delete: {target} does not exist", markup=False)
        return 0
    entries = sorted(p.name for p in target.iterdir())
    verb = "would delete" if args.dry_run else "deleting"
    cli.console.print(f"{verb} {target} ({len(entries)} entries: {', '.join(entries)})", markup=False)
    if not args.dry_run:
        shutil.rmtree(target)
    return 0


def main(argv=None) -> int:
    return cli.run_stage(__doc__, "clean", CleanConfig, run, argv, add_args=lambda p: p.add_argument(
        "--dry-run", action="store_true", help="list the folder and its entries, delete nothing"))


if __name__ == "__main__":
    sys.exit(main())
