"""Child processes a stage starts and must not leave behind (serve's llama-server, loadtest's servers): started
with their output in a log, waited for until they answer, stopped on the way out (an error, Ctrl-C, SIGTERM)
and by the kernel when the stage itself dies, even by SIGKILL."""
from __future__ import annotations

import http.client
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable


class ChildFailed(RuntimeError):
    """The child exited or never answered; the message ends with its last log lines."""


def free_port(avoid: int | None = None) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, other than `avoid` (serve's own port, which it binds
    only once its llama-server child is ready: the child once drew that very port and took it)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port != avoid:
            return port


def _die_with_parent() -> None:
    """In the child before exec: the kernel sends it SIGTERM when its parent dies."""
    import ctypes
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass   # not Linux: the parent's own exit path still stops it


class Child:
    """`with Child(command, log, name, ready, timeout_s, setting) as child:` -- inside the block `ready()` has
    returned True; a child that exits or does not get ready within timeout_s (the config key `setting`)
    raises ChildFailed with the log's last lines. `log` None: a file with no name, which nothing can leave
    behind (not even a SIGKILL of this process)."""

    def __init__(self, command: list[str], log: Path | None, name: str, ready: Callable[[], bool], timeout_s: int,
                 setting: str):
        self.command, self.log, self.name, self.ready = command, log, name, ready
        self.timeout_s, self.setting = timeout_s, setting
        self.proc: subprocess.Popen | None = None

    def __enter__(self):
        self.log_file = open(self.log, "w+", errors="replace") if self.log else tempfile.TemporaryFile("w+", errors="replace")
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=self.log_file,
                                     stderr=self.log_file, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.fail(f"{self.name} exited with code {self.proc.returncode}")
            try:
                if self.ready():
                    return self
            except (OSError, http.client.HTTPException):
                pass   # not listening yet, or still loading
            time.sleep(0.2)
        self.fail(f"{self.name} did not answer within {self.timeout_s} s ({self.setting})")

    def fail(self, why: str) -> None:
        tail = self.tail()
        self.__exit__()
        raise ChildFailed(f"{why}: {tail}")

    def tail(self, lines: int = 5) -> str:
        self.log_file.flush()
        self.log_file.seek(0)
        return " | ".join(self.log_file.read().strip().splitlines()[-lines:]) or "no output"

    def exited(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
