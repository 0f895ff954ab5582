"""The bottom of the engine: execution rows, errors, plan value types and small helpers that
every step shares. Steps import this module; it imports no step.

An execution is one row of ``data_patch_executions``: the durable state every op reads and moves
forward (phase, cursor, counts, report), so an op can run in its own process, be killed at any
instant and be re-executed.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Connection, Engine

from patch_ops.database import write_transaction
from patch_ops.patch import Patch, PatchRunConfig, PatchSettings, RunContext
from patch_ops.state import FAILED, INSERT, executions, locks
from patch_ops.target_sets import delete_shared_targets
from patch_ops.work_rows import WORK_ACTIONS, WorkRows, drop_own_tables, existing_rows

#: Phase of an execution whose transform stopped at its deadline (the end of its maintenance
#: window), status 'paused': progress kept, table locks released, continued by a later run.
PAUSED_PHASE = "paused_window_end"


#: Status of an execution whose data are committed but whose post-verification never finished
#: (its process died, or its step failed after the commit): never "failed", which would hide
#: that the data changed; the next run of the patch verifies it first (patch_ops.jobs).
UNVERIFIED = "unverified"


#: Status of an execution whose run was stopped on request (Ctrl-C/SIGINT, SIGTERM, Terminate in
#: the Dagster UI) before its commit committed: its open transaction rolled back, its progress
#: kept, its table locks released; the next run of the same config continues it
#: (patch_ops.steps.plan), as it does a paused one.
CANCELLED = "cancelled"


#: ``check_name`` in ``data_patch_rejects`` of a driving row held back because the database
#: would refuse its changes (``patch_ops.steps.holdback``), apart from the pandera rejects.
HELD_BACK = "database_refusal"


#: Execution options of an INSERT ... SELECT whose rowcount is read (else -1 on psycopg).
ROWCOUNT = {"preserve_rowcount": True}


class PatchError(Exception):
    """A patch step refused or failed; the message is meant for the release engineer."""

    def __init__(self, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.details = details or {}


class PlanRefused(PatchError):
    pass


class CommitConflict(PatchError):
    pass


class VerificationFailed(PatchError):
    pass


class RestoreRefused(PatchError):
    pass


class DatabaseRefused(PatchError):
    """The database rejected a change (constraint, trigger, type): nothing was written."""


@dataclass(frozen=True)
class PlanInfo:
    """What a plan check sees: the new execution and everything it was asked to do."""

    execution_id: str
    patch: Patch
    settings: PatchSettings
    config: PatchRunConfig
    engine: Engine
    resources: Any  # the op's Dagster resources (None outside Dagster)


#: A plan check: (stage, connection, info) → None, or raise PlanRefused.
PlanCheck = Callable[[str, Connection, PlanInfo], None]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def new_execution_id() -> str:
    """A new execution id: a time-ordered UUID (version 7: 48 bits of Unix milliseconds, then
    74 random bits), so each execution's rows go in at the right end of the shared keys that
    lead with it (targets, mirrors): appended, not split into the middle of other executions'
    (a random id: half-full pages, ~25 % more WAL and ~2.4x the buffer visits a row). The
    order is for speed only: nothing relies on it (a clock set back costs speed, not safety)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & (2**48 - 1)) << 80 | 0x7 << 76 | (rand >> 68) << 64 | 0b10 << 62 | (
        rand & (2**62 - 1))
    return str(uuid.UUID(int=value))


#: Given a Dagster run id: its status if the run is finished (terminal), else None.
RunFinished = Callable[[str], str | None]


# ---------------------------------------------------------------------------------------------
# Execution rows
# ---------------------------------------------------------------------------------------------


def load_execution(conn: Connection, execution_id: str) -> dict[str, Any]:
    row = conn.execute(
        select(executions).where(executions.c.execution_id == execution_id)
    ).mappings().first()
    if row is None:
        raise PatchError(f"unknown execution {execution_id}")
    return dict(row)


def set_execution(conn: Connection, execution_id: str, **values: Any) -> None:
    conn.execute(
        update(executions).where(executions.c.execution_id == execution_id).values(**values)
    )


def inserted_offset(ex: dict[str, Any], table: str) -> int | None:
    """The offset a committed execution's inserted ids have from their ``dp_seq`` when its
    commit handed them out as one block, to it alone (``DatabaseDialect.insert_staged``);
    None when the ids were written to the stage."""
    return ((ex.get("report") or {}).get("insert_id_offsets") or {}).get(table)


def inserted_id(ins: WorkRows, ex: dict[str, Any], table: str) -> Any:
    """The live id of a staged insert (``ins``: the stage's INSERT rows) of a committed
    execution: ``dp_seq`` plus the offset its commit recorded (ids handed out as one block),
    else the id the commit wrote to the stage."""
    offset = inserted_offset(ex, table)
    return ins.c.id if offset is None else ins.seq + int(offset)


def inserted_id_range(conn: Connection, ins: WorkRows, ex: dict[str, Any],
                      table: str) -> tuple[int, int] | None:
    """The lowest and the highest live id a committed execution inserted into ``table`` (None:
    it inserted none). Checks that add ``live.id BETWEEN lo AND hi`` read the inserted rows by
    the live table's key instead of scanning the whole table, all its history included (1M new
    log rows among 3M: a post-verification check 15.4 -> 9.8 s)."""
    offset = inserted_offset(ex, table)
    col = ins.seq if offset is not None else ins.c.id  # min/max of dp_seq: from the index
    lo, hi = conn.execute(select(func.min(col), func.max(col)).where(ins.mine)).one()
    if lo is None:
        return None
    return (int(lo) + int(offset or 0), int(hi) + int(offset or 0))



def finish_execution(
    engine: Engine,
    execution_id: str,
    status: str,
    error: str | None = None,
    keep_work_tables: bool = True,
    fingerprint: Collection[str] = (),
    **values: Any,
) -> None:
    """Close an execution: status, completion time, locks released, scratch data dropped (but
    the ``fingerprint`` of an approving dry run: ``drop_work_rows``), then its tables of its
    own. A committed execution closed as failed (not restored) is ``UNVERIFIED``: its data
    changed."""
    dropped: list[str] = []
    with write_transaction(engine) as conn:
        if status == "failed" and values.get("phase", "committed") == "committed":
            if load_execution(conn, execution_id)["phase"] == "committed":
                status = UNVERIFIED
        set_execution(
            conn,
            execution_id,
            status=status,
            completed_at=utcnow(),
            error_message=error,
            **values,
        )
        conn.execute(delete(locks).where(locks.c.execution_id == execution_id))
        if not keep_work_tables:
            dropped = drop_work_rows(conn, execution_id, fingerprint)
    # after that commit (DDL commits on MySQL)
    drop_own_tables(engine, [execution_id], dropped, fingerprint)


def stop_execution(engine: Engine, execution_id: str, stop: dict[str, Any]) -> dict[str, Any]:
    """Close the execution of a stopped run at once and say so: who stopped it, why, in which
    step and how far it had got (``stop``: by, reason, step, at). Before its commit committed it
    is ``CANCELLED`` (progress and work rows kept for the next run); after, ``UNVERIFIED`` (its
    data changed: the next run verifies it first). Its table locks are released. Returns the
    closed row."""
    with write_transaction(engine) as conn:
        ex = load_execution(conn, execution_id)
        committed = ex["phase"] == "committed"
        done, total = int(ex["processed_records"]), int(ex["target_count"])
        progress = {"phase": ex["phase"], "processed": done, "target_count": total,
                    "batches_done": int(ex["batches_done"]), "cursor": ex["cursor"]}
        report = dict(ex["report"] or {})
        report["stops"] = [*report.get("stops", []), {**stop, **progress}]
        if committed:
            after = ("its changes are committed (the commit finished before the stop) and not "
                     "yet verified: the next run of the patch verifies them first")
        elif ex["kind"] != "patch" or ex["phase"] == "planning":
            after = "nothing reached the live tables; nothing to continue: run it again"
        else:
            after = (f"nothing reached the live tables; {done:,}/{total:,} rows transformed "
                     f"({progress['batches_done']} batches kept); the next run with the same "
                     "config continues it")
        note = (f"cancelled: {stop['reason']} in step {stop['step']} by {stop['by']} at "
                f"{stop['at']} UTC (launched by {ex['launched_by']}); {after}")
        now = utcnow()
        set_execution(
            conn, execution_id, status=UNVERIFIED if committed else CANCELLED, completed_at=now,
            heartbeat_at=now, error_message=note, report=report,
        )
        conn.execute(delete(locks).where(locks.c.execution_id == execution_id))
        return load_execution(conn, execution_id)


def running_executions(engine: Engine, dagster_run_id: str) -> list[str]:
    """The executions a Dagster run has open (status running), oldest first."""
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(executions.c.execution_id)
                .where(executions.c.dagster_run_id == dagster_run_id,
                       executions.c.status == "running")
                .order_by(executions.c.started_at)
            ).scalars()
        )


def drop_work_rows(
    conn: Connection, execution_id: str, fingerprint: Collection[str] = ()
) -> list[str]:
    """Backup/stage/target rows of an execution that never reached live tables. Of the tables
    in ``fingerprint`` its backup rows and staged updates stay: an approving dry run's record of
    what it read and would write (``steps.drift``), dropped when it can approve nothing.
    Returns its declared tables: the caller drops its tables of its own of them after its
    commit (``work_rows.drop_own_tables``)."""
    ex = load_execution(conn, execution_id)
    decl = ex.get("declaration") or {}
    for table in decl.get("tables", []):
        # a fingerprint's backup rows stay, and its staged updates
        for action in (INSERT, FAILED) if table in fingerprint else WORK_ACTIONS:
            rows = existing_rows(conn, table, execution_id, action)
            if rows is not None and rows.shared:  # tables of its own are dropped after
                conn.execute(rows.delete())
    delete_shared_targets(conn, execution_id)
    # data_patch_rejects stays: it explains why a run failed.
    return list(decl.get("tables", []))


def declaration_of(patch: Patch) -> dict[str, Any]:
    return {
        "driving_table": patch.driving_table,
        "tables": list(patch.tables()),
        "updates": {t: list(c) for t, c in patch.updates.items()},
        "inserts": {t: list(c) for t, c in patch.inserts.items()},
        "related": dict(patch.related),
    }


def written_tables(decl: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys([*decl["updates"], *decl["inserts"]]))


def default_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user database in some containers
        return "unknown"


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def config_of(patch: Patch, ex: dict[str, Any]) -> PatchRunConfig:
    return patch.config_class(**(ex["config"] or {}))


def run_context(ex: dict[str, Any]) -> RunContext:
    """The facts an execution fixed at plan time (run time, business date)."""
    return RunContext(ex["execution_id"], ex["run_at"], dt.date.fromisoformat(ex["business_date"]))


def step_counts(ex: dict[str, Any]) -> dict[str, int]:
    return {
        "processed": int(ex["processed_records"]),
        "staged_updates": int(ex["staged_updates"]),
        "staged_inserts": int(ex["staged_inserts"]),
        "failed": int(ex["failed_records"]),
    }


def fetch_rows(conn: Connection, query: Any) -> Sequence[Any]:
    """Every row of ``query``. When SQLAlchemy has nothing to convert in them (no result
    processors, as on PostgreSQL for these column types), straight from the driver's cursor as
    plain tuples: building SQLAlchemy's Row objects doubled the cost of reading a batch (160
    against 70 ms for 20,000 items). Otherwise through SQLAlchemy (SQLite: it parses the
    datetimes that the driver returns as text)."""
    result = conn.execute(query)
    try:
        if getattr(result._metadata, "_effective_processors", True) is None:
            return result.cursor.fetchall()  # type: ignore[no-any-return]
        return result.all()
    finally:
        result.close()


def run_concurrently(calls: Sequence[Callable[[], Any]], workers: int) -> list[Any]:
    """The results of ``calls`` in their order, up to ``workers`` at a time in threads (each call
    opens its own connection). The first exception is raised once every call has ended."""
    if workers <= 1 or len(calls) <= 1:
        return [call() for call in calls]
    workers = min(workers, len(calls))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="check") as pool:
        futures = [pool.submit(call) for call in calls]
    return [f.result() for f in futures]


def jsonable(v: Any) -> Any:
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    return str(v)


def estimate_seconds(conn: Connection, patch_name: str, records: int) -> float | None:
    """From the throughput of this patch's past successful runs, if there are any."""
    rows = conn.execute(
        select(
            executions.c.processed_records,
            executions.c.started_at,
            executions.c.completed_at,
            executions.c.paused_seconds,
        )
        .where(
            executions.c.patch_name == patch_name,
            executions.c.status == "completed",
            executions.c.kind == "patch",
            executions.c.processed_records > 0,
        )
        .order_by(executions.c.started_at.desc())
        .limit(5)
    ).all()
    rates = [
        r.processed_records
        / max((r.completed_at - r.started_at).total_seconds() - (r.paused_seconds or 0), 0.001)
        for r in rows
        if r.completed_at is not None
    ]
    if not rates:
        return None
    return records / (sum(rates) / len(rates))

