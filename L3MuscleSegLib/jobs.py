"""Child processes for long jobs: live log lines, progress, and a cancel that kills the tree.

The caller's own environment is never modified: extra variables (e.g. nnU-Net's folder
variables) go to the child only. Slicer's module uses the same runner with PythonSlicer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import psutil

from .errors import CancelledError, L3MuscleSegError

log = logging.getLogger(__name__)

LineHandler = Callable[[str], None]


class CancelToken(Protocol):
    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class JobResult:
    returncode: int
    tail: tuple[str, ...]  # last lines of output, for error messages


class ProcessRunner(Protocol):
    """Seam for running a command as a child: the library's default, or Slicer's."""

    def run(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
            on_line: LineHandler | None = None, cancel: CancelToken | None = None,
            cwd: str | None = None) -> JobResult: ...


class SubprocessRunner:
    """Runs a child with merged stdout/stderr streamed line by line to ``on_line``."""

    def __init__(self, poll_seconds: float = 0.2, tail_lines: int = 40):
        self.poll_seconds = poll_seconds
        self.tail_lines = tail_lines

    def run(self, argv, *, env=None, on_line=None, cancel=None, cwd=None) -> JobResult:
        child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace", env=child_env, cwd=cwd, **_new_process_group(),
        )
        tail: list[str] = []
        reader = threading.Thread(
            target=_pump, args=(process.stdout, on_line, tail, self.tail_lines), daemon=True
        )
        reader.start()
        while process.poll() is None:
            if cancel is not None and cancel.is_set():
                kill_tree(process.pid)
                process.wait()
                reader.join(timeout=5)
                raise CancelledError(f"Cancelled: {_describe(argv)} was stopped.")
            reader.join(timeout=self.poll_seconds)
        reader.join(timeout=5)
        return JobResult(process.returncode, tuple(tail))


def run_checked(runner: ProcessRunner, argv: Sequence[str], **kwargs) -> JobResult:
    """Run and raise an error carrying the child's last output lines when it fails."""
    result = runner.run(argv, **kwargs)
    if result.returncode != 0:
        last = "\n  ".join(result.tail[-15:])
        raise L3MuscleSegError(
            f"{_describe(argv)} failed with exit code {result.returncode}. "
            f"Last output:\n  {last}"
        )
    return result


def python_command(module: str, *args: str) -> list[str]:
    """argv running ``python -m module`` with the current interpreter (PythonSlicer too)."""
    return [sys.executable, "-m", module, *args]


def kill_tree(pid: int) -> None:
    """Kill a process and all its descendants (nnU-Net spawns data-loader workers)."""
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    family = parent.children(recursive=True) + [parent]
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(family, timeout=10)


def _pump(stream, on_line, tail: list[str], keep: int) -> None:
    for raw in stream:
        line = raw.rstrip("\n")
        tail.append(line)
        del tail[:-keep]
        if on_line is not None:
            on_line(line)
        else:
            log.debug("%s", line)


def _new_process_group() -> dict:
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def _describe(argv: Sequence[str]) -> str:
    return " ".join(str(a) for a in argv[:4]) + (" …" if len(argv) > 4 else "")
