"""The processes test support starts (the Dagster webserver and daemon, headless Chromium): a free
port to give one, the tail of its log for an error message, and stopping it with everything it
spawned. One place for the webserver and the browser, so both stop their children the same way."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail_log(path: Path, lines: int = 40) -> str:
    """The last lines of a process's log, for the message of an error about it."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def stop_process_groups(procs: list[subprocess.Popen[bytes]], grace: float = 20.0) -> None:
    """SIGTERM processes we started (session leaders), then SIGKILL what is left of their groups.

    A group holds what its leader spawned: the webserver's code server, the daemon's code server
    and run workers. The group id is the PID of the process started here. All are signalled
    first and waited for together: each takes several seconds to shut down gracefully.
    """
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    # Children may outlive their leader for a moment; give them a little, then SIGKILL.
    deadline = time.monotonic() + 3
    left = list(procs)
    while left and time.monotonic() < deadline:
        left = [p for p in left if _group_alive(p.pid)]
        if left:
            time.sleep(0.2)
    for proc in left:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
