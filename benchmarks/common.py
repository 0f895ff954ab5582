"""How the benchmarks measure: child processes with the peak RSS of their whole process tree
and its CPU (descendants orphaned to us included), a local database server's CPU, SQL time per
statement shape inside a process; the log lines, and the line a child reports its result on.

Nothing here is specific to one patch, and nothing here imports another benchmark module.
``report_verify``, ``read_passes`` and ``plan_cost`` run their workers with another checkout's
code on ``PYTHONPATH`` (``benchmarks.ab.run_code_worker``): those workers import
``StatementTimer`` and ``server_cpu_seconds`` from that checkout's ``benchmarks.common``, so both
stay here, under this module's name.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy.engine import Engine

REPO_ROOT = Path(__file__).resolve().parents[1]
#: A child process reports its result on one stdout line starting with this.
RESULT_MARK = "BENCH_RESULT "


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Child processes with peak RSS of the whole process tree
# ---------------------------------------------------------------------------------------------


@dataclass
class ProcessResult:
    returncode: int | None  # None: killed at the timeout
    wall_s: float
    peak_rss_mb: float  # sum over the process tree, at its largest
    peak_procs: int  # processes alive in the tree at the RSS peak
    stdout: str
    stderr: str
    cpu_s: float = float("nan")  # user + system CPU of the child and its reaped descendants
    #: peak RSS of each process of the tree (pid → MB), for "any process ≤ N MB" and per op
    peak_rss_by_pid: dict[int, float] = field(default_factory=dict)
    root_pid: int | None = None  # the child itself

    @property
    def largest_process_mb(self) -> float:
        """The peak RSS of the tree's largest single process."""
        return max(self.peak_rss_by_pid.values(), default=0.0)

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def _tree_rss(proc: psutil.Process, peaks: dict[int, float]) -> tuple[float, int]:
    """RSS of a process tree (MB) and its size now; raises ``peaks[pid]`` to each member's."""
    total, n = 0, 0
    try:
        members = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0, 0
    for p in members:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            rss = p.memory_info().rss / (1024 * 1024)
            total += rss
            n += 1
            if rss > peaks.get(p.pid, 0.0):
                peaks[p.pid] = rss
    return total, n


def handle_interrupts() -> None:
    """SIGINT/SIGTERM raise KeyboardInterrupt, so databases, servers and children are cleaned
    up (importing Dagster replaces the SIGINT handler: call again after that)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def server_cpu_seconds(pid: int | None) -> float | None:
    """CPU used so far by a local server process tree (postmaster, backends, exited backends)."""
    if pid is None:
        return None
    try:
        root = psutil.Process(pid)
        t = root.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                c = child.cpu_times()
                total += c.user + c.system
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return total


def _kill_tree(pid: int) -> None:
    """Kill a child we started and its descendants (by pid, never by name)."""
    try:
        root = psutil.Process(pid)
        members = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)


def run_monitored(
    cmd: Sequence[str],
    env: dict[str, str] | None = None,
    cwd: Path = REPO_ROOT,
    timeout: float = 900.0,
    poll_s: float = 0.05,
) -> ProcessResult:
    """Run a command; poll the RSS of it and all its descendants; kill it at the timeout. Its
    CPU is the whole tree's, descendants that outlive it (the op fork server) included."""
    adopt_orphans()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.monotonic()
        child = subprocess.Popen(
            list(cmd), cwd=cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL
        )
        try:
            return _watch(child, t0, timeout, poll_s, out, err)
        except BaseException:  # interrupted: take the child's process tree down with us
            _kill_tree(child.pid)
            child.wait()
            raise


#: prctl(2) option: orphaned descendants are reparented to this process instead of init.
PR_SET_CHILD_SUBREAPER = 36


def adopt_orphans() -> None:
    """Make this process the child subreaper of its descendants (Linux ``prctl``), so that a
    descendant orphaned by the measured child's exit (Dagster's op fork server: the CLI never
    waits for it) is reparented to us and its CPU, with its reaped op processes', is counted."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _orphans_cpu(pids: set[int], within_s: float = 30.0) -> float:
    """CPU of the descendants in ``pids`` that were orphaned to us, waited for as they exit."""
    cpu, deadline = 0.0, time.monotonic() + within_s
    pending = set(pids)
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            try:
                done, _, usage = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:  # not ours: reaped by its own parent (an op process)
                pending.discard(pid)
                continue
            if done:
                cpu += usage.ru_utime + usage.ru_stime
                pending.discard(pid)
        if pending:
            time.sleep(0.01)
    if pending:
        log(f"descendants still running {within_s:.0f} s after the run, CPU not counted: {sorted(pending)}")
    return cpu


def _watch(child: subprocess.Popen, t0: float, timeout: float, poll_s: float,
           out: Any, err: Any) -> ProcessResult:
    """Poll the child until it exits (or kill it at the timeout)."""
    ps = psutil.Process(child.pid)
    others = {c.pid for c in psutil.Process().children()} - {child.pid}
    peak, peak_n = 0.0, 0
    peaks: dict[int, float] = {}
    rc: int | None = None
    cpu = float("nan")
    while True:
        rss, n = _tree_rss(ps, peaks)
        if rss > peak:
            peak, peak_n = rss, n
        # wait4, not poll(): its rusage covers the child and every descendant it reaped
        # (Dagster's op processes), i.e. the CPU the whole run used, whatever the load.
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            rc = child.returncode = os.waitstatus_to_exitcode(status)
            # Its orphans are ours by now (reparented at its exit): those seen while polling,
            # and any that appeared between two polls.
            adopted = {c.pid for c in psutil.Process().children()} - others
            cpu = usage.ru_utime + usage.ru_stime + _orphans_cpu((set(peaks) | adopted) - {child.pid})
            break
        if time.monotonic() - t0 > timeout:
            _kill_tree(child.pid)
            child.wait()
            rc = None
            break
        time.sleep(poll_s)
    wall = time.monotonic() - t0
    out.seek(0)
    err.seek(0)
    return ProcessResult(rc, wall, peak, peak_n, out.read(), err.read(), cpu, peaks, child.pid)


# ---------------------------------------------------------------------------------------------
# SQL statement timing (profiling)
# ---------------------------------------------------------------------------------------------


class StatementTimer:
    """Total time and calls per SQL statement shape, from SQLAlchemy cursor events."""

    def __init__(self) -> None:
        self.stats: dict[str, list[float]] = {}
        self._engines: list[Engine] = []
        self._lock = threading.Lock()  # checks run on several connections at once

    @staticmethod
    def shape(statement: str) -> str:
        s = re.sub(r"\s+", " ", statement).strip()
        s = re.sub(r"\bVALUES \(.*", "VALUES (…)", s)
        s = re.sub(r"\bIN \(__\[POSTCOMPILE[^)]*\]\)", "IN (…)", s)
        return s

    def attach(self, engine: Engine) -> None:
        from sqlalchemy import event

        def before(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
            conn.info.setdefault("bench_t0", []).append(time.perf_counter())

        def after(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
            seconds = time.perf_counter() - conn.info["bench_t0"].pop()
            with self._lock:
                entry = self.stats.setdefault(self.shape(statement), [0.0, 0])
                entry[0] += seconds
                entry[1] += 1

        event.listen(engine, "before_cursor_execute", before)
        event.listen(engine, "after_cursor_execute", after)
        self._engines.append(engine)

    def take(self) -> list[tuple[str, float, int]]:
        """(statement, seconds, calls), slowest first; resets the counters."""
        with self._lock:
            stats, self.stats = self.stats, {}
        rows = sorted(((s, v[0], int(v[1])) for s, v in stats.items()), key=lambda r: -r[1])
        return rows
