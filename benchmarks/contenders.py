"""Contenders as measured from outside (shared by the patch benchmarks): the project code they
run (the working tree, a snapshot of it, or a commit), their ``Outcome``, the executors a job
can be run with, and patch jobs run through ``dagster job execute`` with the execution row they
leave.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from benchmarks.common import REPO_ROOT, ProcessResult, run_monitored
from benchmarks.dagster_timings import (
    RunTimings,
    dagster_cli,
    dagster_run_timings,
    new_dagster_home,
)
from benchmarks.digests import Digest


def code_version() -> str:
    """The commit measured, and whether the engine/patch code had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "patch_ops", "stockrx_patches", "resources"],
            cwd=REPO_ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes in patch_ops/stockrx_patches/resources" if dirty else "")


@dataclass
class Code:
    """The project code a benchmark measures: the working tree, or a commit exported with
    ``git archive`` (other developers edit the working tree while benchmarks run)."""

    dir: Path
    label: str

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """Environment for a child that must import the measured code (and ``benchmarks``)."""
        paths = [str(self.dir)] + ([str(REPO_ROOT)] if self.dir != REPO_ROOT else [])
        old = base.get("PYTHONPATH")
        return dict(base, PYTHONPATH=os.pathsep.join(paths + ([old] if old else [])))


def measured_code(rev: str | None, workdir: Path) -> Code:
    """``None``: the live working tree; ``"snapshot"``: a copy of the working tree as it is now
    (tracked and untracked files, not ignored ones); else a commit, via ``git archive``.
    ``benchmarks/`` itself always comes from this working tree (see ``Code.env``)."""
    if not rev:
        return Code(REPO_ROOT, f"working tree at {code_version()}")
    git = ["git", "-C", str(REPO_ROOT)]
    if rev == "snapshot":
        target = workdir / "code-snapshot"
        files = subprocess.run([*git, "ls-files", "-z", "--cached", "--others",
                                "--exclude-standard"], capture_output=True, check=True).stdout
        for name in filter(None, files.decode().split("\0")):
            src = REPO_ROOT / name
            if src.is_file() and not name.startswith("benchmarks/"):
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target / name)
        diff = subprocess.run([*git, "diff", "HEAD"], capture_output=True, check=True).stdout
        return Code(target, f"snapshot of the working tree at {code_version()} "
                    f"(git diff HEAD sha256 {hashlib.sha256(diff).hexdigest()[:12]}, "
                    f"taken {time.strftime('%H:%M:%S')})")
    sha = subprocess.run([*git, "rev-parse", "--short", rev], capture_output=True, text=True,
                         check=True).stdout.strip()
    target = workdir / f"code-{sha}"
    target.mkdir(parents=True)
    archive = subprocess.run([*git, "archive", sha], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    shutil.rmtree(target / "benchmarks", ignore_errors=True)  # the harness is always this one
    return Code(target, f"commit {sha} (git archive)")


@dataclass
class Outcome:
    name: str
    rows: int  # driving rows processed (measured)
    process: ProcessResult
    work_s: float | None = None  # time doing the work, without process start-up
    rows_changed: int | None = None
    scale: float = 1.0  # measured on a subset: times are multiplied by this in the table
    timings: RunTimings | None = None
    execution: dict[str, Any] | None = None
    check: str = ""
    digest: Digest | None = None
    #: the digest with the run's own instant hashed as one token (``--against``: two job runs)
    untimed_digest: Digest | None = None
    server_cpu_s: float | None = None  # CPU of the local database server during the run
    cpu_s: float | None = None  # client CPU as reported (scaled like the times); None: measured
    notes: list[str] = field(default_factory=list)
    steps: list[tuple[str, float]] = field(default_factory=list)  # a baseline's own step times
    writer: Any = None  # the application stand-in's samples meanwhile (benchmarks.app_writer)

    @property
    def ok(self) -> bool:
        return self.process.returncode == 0


#: Run config of the executors the benchmarks can compare. "default" adds none: the jobs' own
#: executor (patch_ops.jobs.patch_executor: one process per op, forked from a fork server that
#: preloads the framework and the code location); "spawn" is Dagster's stock multiprocess.
EXECUTORS: dict[str, dict[str, Any]] = {
    "default": {},
    "spawn": {"multiprocess": {"start_method": {"spawn": {}}}},
    "in_process": {"in_process": {}},
}


def read_execution(url: str, kind: str = "patch") -> dict[str, Any] | None:
    """The newest execution row of a kind (patch, restore) in a database, if the framework
    tables exist."""
    from sqlalchemy import DateTime

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT execution_id, status, phase, dry_run, run_at, target_count, "
                    "staged_updates, staged_inserts, batches_done, peak_rss_mb, started_at, "
                    "completed_at, error_message FROM data_patch_executions "
                    "WHERE kind = :kind ORDER BY started_at DESC LIMIT 1"
                ).columns(run_at=DateTime(), started_at=DateTime(), completed_at=DateTime()),
                {"kind": kind},
            ).mappings().first()
    except Exception:  # noqa: BLE001 - no framework tables: the run never got that far
        return None
    finally:
        engine.dispose()
    return dict(row) if row else None


def job_env(url: str, home: Path, code: Code, audit_key: str) -> dict[str, str]:
    """A job's environment: this database, this DAGSTER_HOME, a throwaway audit key (real runs
    refuse without one), and no Slack/SMTP settings, so a benchmark never notifies anyone."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("STOCKRX_SLACK_", "STOCKRX_SMTP_", "STOCKRX_AUDIT_"))
    }
    env.update(STOCKRX_DATABASE_URL=url, DAGSTER_HOME=str(home), STOCKRX_AUDIT_KEYS=audit_key)
    return code.env(env)


def run_dagster_job(job: str, name: str, url: str, configs: Sequence[Path], code: Code,
                    workdir: Path, timeout: float, audit_key: str,
                    kind: str = "patch") -> Outcome:
    """``dagster job execute -m stockrx_patches.definitions -j JOB -c ...`` in a fresh
    DAGSTER_HOME, measured; step timings from its event log, its execution row (``kind``)."""
    home = new_dagster_home(workdir, name.replace(" ", "_").replace(",", ""), code.dir)
    args = ["-m", "stockrx_patches.definitions", "-j", job]
    for c in configs:
        args += ["-c", str(c)]
    return execute_dagster_job(name, args, job_env(url, home, code, audit_key), code.dir, home,
                               timeout, url, kind)


def execute_dagster_job(name: str, args: Sequence[str], env: dict[str, str], cwd: Path,
                        home: Path, timeout: float, url: str | None = None,
                        kind: str = "patch") -> Outcome:
    """``dagster job execute ARGS`` with ``env`` (its DAGSTER_HOME: ``home``), measured; step
    timings from its event log; with ``url``, the execution row (``kind``) it left there."""
    proc = run_monitored([*dagster_cli(), "job", "execute", *args], env=env, cwd=cwd,
                         timeout=timeout)
    out = Outcome(name, 0, proc)
    out.timings = dagster_run_timings(home)
    out.execution = read_execution(url, kind) if url else None
    if out.timings is not None and out.timings.run_s == out.timings.run_s:
        out.work_s = out.timings.run_s
    if out.execution:
        out.rows = int(out.execution["target_count"] or 0)
        out.rows_changed = int(out.execution["staged_updates"] or 0)
    if proc.timed_out:
        out.notes.append(f"killed after {timeout:.0f} s")
        if out.execution:
            out.notes.append(
                f"reached phase {out.execution['phase']}, "
                f"{out.execution['batches_done']} batches"
            )
    elif not out.ok:
        failed = [s for s in (out.timings.steps if out.timings else []) if s.error]
        if failed:
            out.notes += [f"{s.step} failed: {s.error}" for s in failed]
        else:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            out.notes.append("failed: " + " / ".join(tail))
    return out
