"""Per-table locks in the StockRx database (``data_patch_locks``): one execution per table at a
time, whoever starts it (the run queue's tag limits only cover runs of one Dagster instance).
A lock whose holder is dead (process gone, Dagster run finished, no heartbeat) is released as
stale and its execution closed with the reason: failed and abandoned, or, when its Dagster run was
terminated on request (CANCELED) while no step was there to record the stop (patch_ops.stopping),
cancelled and continued by the next run of the same config.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from patch_ops.execution import (
    CANCELLED,
    UNVERIFIED,
    PlanRefused,
    RunFinished,
    drop_work_rows,
    jsonable,
    set_execution,
    utcnow,
)
from patch_ops.state import executions, locks

#: The phase of an execution abandoned before its commit (its locks released as stale): its work
#: rows are dropped and it is never carried on.
ABANDONED = "abandoned"

#: A lock whose holder's process is gone (same host) is stale once the holder's execution has had
#: no heartbeat for this long (the gap between two op processes of a live run is shorter).
LOCK_PID_GRACE_SECONDS = float(os.environ.get("STOCKRX_LOCK_PID_GRACE_SECONDS", "120"))
#: Any lock is stale once its holder's execution has had no heartbeat for this long.
LOCK_STALE_SECONDS = float(os.environ.get("STOCKRX_LOCK_STALE_SECONDS", "1800"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def stale_lock_reason(
    conn: Connection, holder: dict[str, Any], run_finished: RunFinished | None = None
) -> str | None:
    """Why the holder of a lock is dead (so the lock may be released), or None if it may live."""
    ex = conn.execute(
        select(executions.c.status, executions.c.heartbeat_at).where(
            executions.c.execution_id == holder["execution_id"]
        )
    ).first()
    if ex is None:
        return "its execution does not exist"
    if ex.status != "running":
        return f"its execution is {ex.status}"
    if run_finished is not None and holder["dagster_run_id"]:
        status = run_finished(holder["dagster_run_id"])
        if status:
            return f"its Dagster run {holder['dagster_run_id']} is {status}"
    age = (utcnow() - (ex.heartbeat_at or holder["acquired_at"])).total_seconds()
    if (
        holder["hostname"] == socket.gethostname()
        and holder["pid"]
        and not _pid_alive(int(holder["pid"]))
        and age > LOCK_PID_GRACE_SECONDS
    ):
        return (
            f"its process (pid {holder['pid']}) is gone from this host and its last heartbeat "
            f"was {age:,.0f} s ago"
        )
    if age > LOCK_STALE_SECONDS:
        return f"its last heartbeat was {age:,.0f} s ago (limit {LOCK_STALE_SECONDS:,.0f} s)"
    return None


#: The status of a Dagster run terminated on request (the UI's Terminate, terminateRun).
RUN_CANCELED = "CANCELED"


def _release_stale(
    conn: Connection, holder: dict[str, Any], reason: str, by: str, log: Any,
    run_finished: RunFinished | None = None,
) -> None:
    """Drop a dead holder's locks; close its execution as failed (``UNVERIFIED`` if it had
    committed: its data changed), saying why (the history). A holder whose Dagster run was
    terminated on request (CANCELED) between two steps is ``CANCELLED`` instead: it was stopped,
    not lost, so its progress is kept for the next run of the same config."""
    dead = holder["execution_id"]
    stopped = bool(
        run_finished is not None and holder["dagster_run_id"]
        and run_finished(holder["dagster_run_id"]) == RUN_CANCELED
    )
    conn.execute(delete(locks).where(locks.c.execution_id == dead))
    note = (
        f"abandoned: its table locks were released as stale by {by} "
        f"at {utcnow():%Y-%m-%d %H:%M:%S} UTC because {reason}"
    )
    row = conn.execute(
        select(executions.c.status, executions.c.phase, executions.c.error_message).where(
            executions.c.execution_id == dead
        )
    ).first()
    if row is not None:
        if row.phase == "committed":  # the data changed: verified by the next run, not failed
            note += "; its changes are committed and not yet verified"
        values: dict[str, Any] = {
            "error_message": "; ".join(m for m in (row.error_message, note) if m)
        }
        if row.status == "running":
            closed = UNVERIFIED if row.phase == "committed" else "failed"
            values.update(status=closed, completed_at=utcnow())
            if stopped and row.phase not in ("committed", "verified", "planning"):
                values["status"] = CANCELLED
                values["error_message"] = (
                    "cancelled: its Dagster run was terminated on request while no step was "
                    f"running to record it; {note.removeprefix('abandoned: ')}; nothing "
                    "reached the live tables; the next run with the same config continues it"
                )
            elif row.phase not in ("committed", "verified"):
                # Nothing reached the live tables: its backup and stage rows serve no one (a
                # re-execution of its run plans afresh: phase ABANDONED is never carried on).
                values["phase"] = ABANDONED
                drop_work_rows(conn, dead)
        set_execution(conn, dead, **values)
    (log or logging.getLogger(__name__)).warning(
        f"released stale lock of execution {dead} (Dagster run {holder['dagster_run_id']}, "
        f"host {holder['hostname']}, pid {holder['pid']}): {reason}"
    )


def holders_of(conn: Connection, tables: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The lock rows of ``tables`` (table → row; a free table is absent), in one query."""
    rows = conn.execute(select(locks).where(locks.c.table_name.in_(list(tables)))).mappings()
    return {row["table_name"]: dict(row) for row in rows}


def release_stale_locks(
    conn: Connection, tables: Iterable[str], by: str, run_finished: RunFinished | None = None,
    log: Any = None,
) -> None:
    """Release the locks of dead holders of ``tables`` (``stale_lock_reason``) now, before a
    new run looks at the history: a holder that died after its commit is then ``UNVERIFIED``,
    and that run verifies it first instead of taking it for a run still at work."""
    tables = list(dict.fromkeys(tables))
    holders, released = holders_of(conn, tables), set()
    for table in tables:
        holder = holders.get(table)
        if holder is not None and holder["execution_id"] not in released:
            reason = stale_lock_reason(conn, holder, run_finished)
            if reason is not None:
                _release_stale(conn, holder, reason, by, log, run_finished)
                released.add(holder["execution_id"])


def acquire_locks(
    conn: Connection,
    tables: Iterable[str],
    execution_id: str,
    run_id: str | None,
    run_finished: RunFinished | None = None,
    log: Any = None,
) -> None:
    """Take the per-table locks of an execution (re-entrant for the same execution).

    A lock held by another execution refuses at once, naming the holder, unless the holder is
    dead (``stale_lock_reason``): then its locks are released and its execution closed as failed
    with the reason, and this execution takes the lock. One query reads every table's holder,
    one statement moves the locks this execution holds to this process (a later step, or run),
    one takes the free ones.
    """
    here = {"dagster_run_id": run_id, "hostname": socket.gethostname(), "pid": os.getpid()}
    tables = list(dict.fromkeys(tables))
    holders, released = holders_of(conn, tables), set()
    moved, free = [], []
    for table in tables:
        holder = holders.get(table)
        if holder is None or holder["execution_id"] in released:
            free.append(table)
        elif holder["execution_id"] == execution_id:
            if any(holder[k] != v for k, v in here.items()):
                moved.append(table)
        else:
            reason = stale_lock_reason(conn, holder, run_finished)
            if reason is None:
                patch_name = conn.execute(
                    select(executions.c.patch_name).where(
                        executions.c.execution_id == holder["execution_id"]
                    )
                ).scalar()
                raise PlanRefused(
                    f"table {table!r} is locked by {patch_name or 'execution'} execution "
                    f"{holder['execution_id']} (Dagster run {holder['dagster_run_id']}, host "
                    f"{holder['hostname']}, pid {holder['pid']}, since "
                    f"{holder['acquired_at']:%Y-%m-%d %H:%M:%S} UTC); one patch per table at a "
                    "time: try again when it has finished",
                    {"holder": {k: jsonable(v) for k, v in holder.items()}},
                )
            _release_stale(conn, holder, reason, f"execution {execution_id}", log, run_finished)
            released.add(holder["execution_id"])
            free.append(table)
    if moved:
        # A later step (own process) or run of the same execution: it holds them now.
        conn.execute(update(locks).where(locks.c.table_name.in_(moved)).values(**here))
    if free:
        try:
            with conn.begin_nested():
                conn.execute(insert(locks), [
                    {"table_name": t, "execution_id": execution_id, "acquired_at": utcnow(), **here}
                    for t in free
                ])
        except IntegrityError:
            taken = set(holders_of(conn, free))
            table = next((t for t in free if t in taken), free[0])
            raise PlanRefused(
                f"table {table!r} was locked by another execution a moment ago; try again"
            ) from None
