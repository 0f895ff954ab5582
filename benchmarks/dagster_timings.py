"""Dagster runs seen from outside: the ``dagster`` command, a fresh DAGSTER_HOME with its
storage created, and the step timings of its run from the event log.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, handle_interrupts


@dataclass
class StepTiming:
    step: str
    status: str  # success | failure | skipped
    launch_s: float  # worker process start → STEP_START (process spawn, imports, code load)
    duration_s: float  # STEP_START → STEP_SUCCESS/FAILURE
    error: str | None = None  # first line of the failure, if the step failed
    pid: int | None = None  # the op's process (from its STEP_START event)
    started_at: float | None = None  # STEP_START, epoch seconds (None: never started)


@dataclass
class RunTimings:
    run_id: str
    status: str
    run_s: float  # RUN_START → RUN_SUCCESS/FAILURE
    steps: list[StepTiming]


def dagster_run_timings(dagster_home: Path) -> RunTimings | None:
    """Timings of the (only) run recorded in a DAGSTER_HOME, from its event log."""
    from dagster import DagsterEventType, DagsterInstance

    handle_interrupts()
    instance = DagsterInstance.from_config(str(dagster_home))
    try:
        runs = instance.get_runs()
        if not runs:
            return None
        run = runs[0]
        t: dict[tuple[str, str | None], float] = {}
        steps: list[str] = []
        errors: dict[str, str] = {}
        pids: dict[str, int] = {}
        for entry in instance.all_logs(run.run_id):
            ev = entry.dagster_event
            if ev is None:
                continue
            if ev.event_type_value == DagsterEventType.STEP_START.value and ev.step_key and ev.pid:
                pids[ev.step_key] = ev.pid
            if ev.event_type_value == DagsterEventType.STEP_FAILURE.value and ev.step_key:
                errors[ev.step_key] = _failure_text(ev)
            key = (ev.event_type_value, ev.step_key)
            t.setdefault(key, entry.timestamp)
            if ev.step_key and ev.step_key not in steps:
                steps.append(ev.step_key)
        run_end = t.get((DagsterEventType.RUN_SUCCESS.value, None)) or t.get(
            (DagsterEventType.RUN_FAILURE.value, None)
        )
        run_start = t.get((DagsterEventType.RUN_START.value, None))
        timings = []
        for s in steps:
            start = t.get((DagsterEventType.STEP_START.value, s))
            worker = t.get((DagsterEventType.STEP_WORKER_STARTING.value, s))
            end, status = None, "skipped"
            for ev_type, name in (
                (DagsterEventType.STEP_SUCCESS, "success"),
                (DagsterEventType.STEP_FAILURE, "failure"),
            ):
                if (ev_type.value, s) in t:
                    end, status = t[(ev_type.value, s)], name
            if start is not None and end is None:
                status = "unfinished"  # started, never ended (the run was killed)
            if start is None or end is None:
                timings.append(StepTiming(s, status, 0.0, 0.0, errors.get(s), pids.get(s)))
                continue
            launch = start - worker if worker is not None else 0.0
            timings.append(StepTiming(s, status, launch, end - start, errors.get(s), pids.get(s),
                                      start))
        return RunTimings(
            run.run_id,
            run.status.value,
            (run_end - run_start) if run_end and run_start else float("nan"),
            timings,
        )
    finally:
        instance.dispose()


def _failure_text(ev: Any) -> str:
    data = ev.step_failure_data
    parts = []
    user = getattr(data, "user_failure_data", None)
    if user is not None and user.description:
        parts.append(user.description)
    err = getattr(data, "error", None)
    while err is not None:
        parts.append(err.message.strip().splitlines()[0] if err.message.strip() else "")
        err = err.cause
    return " ← ".join(p for p in parts if p)[:600]


def dagster_cli() -> list[str]:
    """The `dagster` command of this interpreter's environment."""
    script = Path(sys.executable).parent / "dagster"
    return [str(script)] if script.exists() else [sys.executable, "-m", "dagster"]


def new_dagster_home(parent: Path, label: str, code_dir: Path = REPO_ROOT) -> Path:
    """A fresh DAGSTER_HOME holding the measured code's dagster.yaml, its storage already
    created, as a production instance's is: creating the SQLite storages costs a run 1.4-1.9 s
    of CPU, and every contender (the empty job and the patch job) starts from the same state."""
    from dagster import DagsterInstance

    home = parent / f"dagster_home_{label}"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    if (code_dir / "dagster.yaml").is_file():
        shutil.copy(code_dir / "dagster.yaml", home / "dagster.yaml")
    DagsterInstance.from_config(str(home)).dispose()
    return home
