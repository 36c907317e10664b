"""Subprocess effects shared by the backends (and the pipeline's run records).

Kept tiny on purpose: run a command, turn "binary missing" and "timed out" into one-line
BackendErrors that say what to install or start, and stream a command's output by line.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import BackendError


def require(binary: str, fix: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise BackendError(f"`{binary}` is not on PATH; {fix}")
    return path


def run(argv: Sequence[str], *, timeout: float = 60, stdin: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run argv and capture text output; never raises on a non-zero exit (callers decide)."""
    try:
        return subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=timeout,
            env={**os.environ, **env} if env else None,
        )
    except FileNotFoundError:
        raise BackendError(f"`{argv[0]}` is not on PATH; install it or fix PATH") from None
    except subprocess.TimeoutExpired:
        raise BackendError(f"`{' '.join(argv[:3])} ...` did not answer within {timeout:.0f} s; "
                           "check that the service behind it is up") from None


def first_line(text: str) -> str:
    """The first non-empty line of a tool's stderr: our errors stay one line."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return "(no message)"


def stream(argv: Sequence[str]) -> Iterator[str]:
    """Yield a command's stdout+stderr lines (without newline) while it runs (`docker logs -f`)."""
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            yield line.rstrip("\n")
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait()


def stream_many(argvs: Sequence[Sequence[str]]) -> Iterator[tuple[int, str | None]]:
    """(index, line) of several commands' stdout+stderr as the lines come (`docker logs -f` of
    each node); (index, None) when command `index` has ended. Stops them all when closed early."""
    import queue
    import threading

    lines: queue.Queue = queue.Queue()
    procs = [subprocess.Popen(list(a), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for a in argvs]

    def pump(i: int, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put((i, line.rstrip("\n")))
        lines.put((i, None))

    for i, proc in enumerate(procs):
        threading.Thread(target=pump, args=(i, proc), daemon=True).start()
    try:
        running = len(procs)
        while running:
            i, line = lines.get()
            running -= line is None
            yield i, line
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
            proc.wait()


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file ('' when it does not exist): the reason a job failed."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def follow_file(path: Path, done, poll_s: float = 0.5) -> Iterator[str]:
    """Yield lines (without newline) of a growing file until `done()` is true and it is drained."""
    import time

    pos = 0
    buf = ""
    while True:
        finished = done()
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
        except FileNotFoundError:
            chunk = ""
        buf += chunk
        *complete, buf = buf.split("\n")
        yield from complete
        if finished and not chunk:
            if buf:
                yield buf
            return
        if not chunk:
            time.sleep(poll_s)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (finished, not yet reaped by its parent) is not running.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
