"""The command line every stage shares: --config, --set, --force, and exit codes.

0 ok (also: up to date, or skipped for absent hardware), 1 the stage ran and its own check failed (merge
parity, a llama.cpp tool), 2 bad config or usage, 3 missing or invalid upstream artifact, 4 busy (another
process holds this stage's folder, or the port to serve on), 130 interrupted (Ctrl-C or SIGTERM).
"""
from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .artifacts import WRITING_INTO, MissingArtifact, StageBusy
from .config import ConfigError, as_dict, load_stage_config

# markup off: paths, names and config values are user text, printed as written ("[/x]" is no tag);
# styles come from Text.assemble
console = Console(stderr=True, soft_wrap=True, markup=False)  # one message, one line, whatever the width

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_UPSTREAM, EXIT_BUSY, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
# a full disk or a folder that cannot be written: one line naming the file, EXIT_FAILED
UNWRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def sigterm_as_interrupt() -> None:
    """SIGTERM (a stopped container, `kill`) stops a stage like Ctrl-C: child processes started through
    subprocess.run are killed on the way out, nothing is published, the exit code is 130."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def share_cpu_fairly() -> None:
    """For the programs that answer users (serve, predict): OpenMP threads -- llama.cpp's, llama-server's and
    torch's -- sleep while they wait instead of spinning, unless OMP_WAIT_POLICY is set. Beside other load, a
    spinning thread burns its core waiting for a descheduled sibling: answers were 2.7-3.9x slower beside one
    competing process (1.1-1.7x passive, about the CPU it takes; passive is 30-80% slower alone), on 2 cores
    (scripts/bench_contention.py). Call it before llama.cpp or torch is loaded: OpenMP reads it once."""
    if not os.environ.get("OMP_WAIT_POLICY"):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def parser(doc: str) -> argparse.ArgumentParser:
    script = Path(sys.argv[0])   # the stage's name: stages/finetune.py and stages/serve/__main__.py alike
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                prog=script.parent.name if script.name == "__main__.py" else script.stem)
    p.add_argument("--config", default="configs/smollm2.toml",
                   help="run config (TOML); default configs/smollm2.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set generate.n_examples=600 (repeatable)")
    p.add_argument("--force", action="store_true", help="rerun even if inputs and config are unchanged "
                   "(make: FORCE=1)")
    return p


def show_config(title: str, values: dict) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    for key, value in values.items():
        table.add_row(Text(str(key)), Text(str(value)))  # user text, never console markup
    console.print(table)


def already_done(stage, args) -> bool:
    """True (and says so) when the stage's config, code and inputs match its manifest and no rerun is forced."""
    if stage.up_to_date() and not args.force:
        console.print(Text.assemble((f"{stage.stage} is up to date", "green"), f" ({stage.out_dir}); FORCE=1 reruns"))
        return True
    return False


def run_stage(doc: str, section: str, cfg_cls, body: Callable, argv=None,
              add_args: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse arguments, load and show the config, call body(run, cfg, args); map errors to exit codes."""
    p = parser(doc)
    if add_args:
        add_args(p)
    args = p.parse_args(argv)
    sigterm_as_interrupt()
    try:
        run, cfg = load_stage_config(args.config, section, cfg_cls, args.overrides)
        show_config(f"{section} · run {run.name}", as_dict(cfg))
        return body(run, cfg, args) or EXIT_OK
    except ConfigError as err:
        console.print(Text.assemble(("config error ", "red"), str(err)))
        return EXIT_CONFIG
    except MissingArtifact as err:
        console.print(Text.assemble(("missing input ", "red"), str(err)))
        return EXIT_UPSTREAM
    except StageBusy as err:
        console.print(Text.assemble(("busy ", "red"), str(err)))
        return EXIT_BUSY
    except KeyboardInterrupt:
        console.print(Text.assemble((f"{section} interrupted", "yellow"), "; rerun to start again (nothing was published)"))
        return EXIT_INTERRUPTED
    except OSError as err:
        if err.errno not in UNWRITABLE:
            raise
        where = err.filename or (f"a file in {WRITING_INTO[0]}" if WRITING_INTO else "a file")
        console.print(Text.assemble(("cannot write ", "red"), f"{where} ({err.strerror}); nothing was published: "
                                    "free space or make the artifacts folder writable, then rerun"))
        return EXIT_FAILED


def show_results(title: str, rows: dict[str, dict], columns: list[str]) -> None:
    """One row per model/variant; a skipped row shows its reason."""
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for column in columns:
        table.add_column(column, justify="right")
    for name, row in rows.items():
        cells = [str(row.get(c, "")) for c in columns] if "skipped" not in row else [f"skipped: {row['skipped']}"]
        table.add_row(*(Text(cell) for cell in (str(name), *cells)))
    console.print(table)


# A progress line this often when the output is not a terminal (a log file, CI); CART_PROGRESS_EVERY_S overrides.
PROGRESS_EVERY_S = float(os.environ.get("CART_PROGRESS_EVERY_S") or 30)


@contextmanager
def progress(description: str, total: int, every_s: float = PROGRESS_EVERY_S):
    """Count, rate and ETA of a long loop. Yields advance(n=1): a rich bar on a terminal; otherwise one line
    every `every_s` seconds and one at the end, so a log shows the work as it happens."""
    if console.is_terminal:
        from rich.markup import escape
        from rich.progress import MofNCompleteColumn, Progress
        with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), console=console) as bar:
            task = bar.add_task(escape(description), total=total)   # a model name is user text
            yield lambda n=1: bar.advance(task, n)
        return
    began = last = time.monotonic()
    done, lock = 0, threading.Lock()   # API answers arrive on worker threads

    def advance(n: int = 1) -> None:
        nonlocal done, last
        with lock:
            done += n
            now = time.monotonic()
            if not (now - last >= every_s or done >= total):
                return
            last, count, rate = now, done, done / max(now - began, 1e-9)
        eta = f", ETA {(total - count) / rate:.0f} s" if count < total else f" in {now - began:.0f} s"
        console.print(Text(f"{description}: {count}/{total}, {rate:.2f}/s{eta}"))
    yield advance
