"""The patch engine: plan → backup → transform → validate → commit | rollback → verify.

Each step is a plain function of (engine, execution_id, ...) that reads and writes durable state
in the StockRx database, so it can run in its own process and be re-executed. Dagster ops in
``patch_ops.ops`` are thin wrappers around these functions.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import getpass
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pandas as pd
import pandera.errors as pa_errors
from sqlalchemy import (
    Float,
    Index,
    Integer,
    Numeric,
    and_,
    case,
    cast,
    delete,
    func,
    insert,
    literal,
    not_,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.sql import ColumnElement

from patch_ops import state
from patch_ops.charts import ChangeSpread, change_histogram, histogram_markdown
from patch_ops.frames import copy_text, plain_records, plain_rows
from patch_ops.patch import (
    Changes,
    Invariant,
    Patch,
    PatchConfigError,
    PatchRunConfig,
    PatchSettings,
    RunContext,
    Tables,
)
from patch_ops.state import INSERT, UPDATE, executions, locks, mirror_table, targets
from patch_ops.windows import now_naive as clock_now
from patch_ops.database import check_connection, write_transaction
from resources.memory import MemoryGuard

BACKUP = "B"
SAMPLE_ROWS = 10
SECTION_ROWS = 1000  # rows of each extra report section kept in the JSON report
SECTION_ROWS_MD = 50  # ... and shown in the Markdown report
MAX_REJECTS_STORED = 1000
#: The transform logs its progress line (one Dagster event each) at most this often, and for the
#: first and last batch; the executions row gets every batch's progress regardless.
PROGRESS_LOG_SECONDS = 5.0
#: Phase of an execution whose transform stopped at its deadline (the end of its maintenance
#: window), status 'paused': progress kept, table locks released, continued by a later run.
PAUSED_PHASE = "paused_window_end"


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


def _insert_offset(ex: dict[str, Any], table: str) -> int | None:
    return ((ex.get("report") or {}).get("insert_id_offsets") or {}).get(table)


def inserted_id(st, ex: dict[str, Any], table: str):  # type: ignore[no-untyped-def]
    """The live id of a staged insert of a committed execution: ``dp_seq`` plus the offset its
    commit recorded (ids handed out as one block), else the id the commit wrote to the stage."""
    return _offset_id(st, _insert_offset(ex, table))


def inserted_id_range(conn: Connection, st, ex: dict[str, Any], table: str) -> tuple[int, int] | None:  # type: ignore[no-untyped-def]
    """The lowest and the highest live id a committed execution inserted into ``table`` (None:
    it inserted none). Checks that add ``live.id BETWEEN lo AND hi`` read the inserted rows by
    the live table's key instead of scanning the whole table, all its history included (1M new
    log rows among 3M: a post-verification check 15.4 -> 9.8 s)."""
    offset = _insert_offset(ex, table)
    col = st.c.dp_seq if offset is not None else st.c.id  # min/max of dp_seq: from the index
    lo, hi = conn.execute(
        select(func.min(col), func.max(col)).where(
            st.c.dp_execution_id == ex["execution_id"], st.c.dp_action == INSERT
        )
    ).one()
    if lo is None:
        return None
    return (int(lo) + int(offset or 0), int(hi) + int(offset or 0))


def _offset_id(st, offset: int | None):  # type: ignore[no-untyped-def]
    return st.c.id if offset is None else st.c.dp_seq + int(offset)


def finish_execution(
    engine: Engine,
    execution_id: str,
    status: str,
    error: str | None = None,
    keep_work_tables: bool = True,
    **values: Any,
) -> None:
    """Close an execution: status, completion time, locks released, scratch data dropped."""
    with write_transaction(engine) as conn:
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
            _drop_work_rows(conn, execution_id)


def _drop_work_rows(conn: Connection, execution_id: str) -> None:
    """Backup/stage/target rows of an execution that never reached live tables."""
    ex = load_execution(conn, execution_id)
    decl = ex.get("declaration") or {}
    for table in decl.get("tables", []):
        for kind in ("backup", "stage"):
            name = state.mirror_name(kind, table)
            mirror = _mirror_by_name(conn, name)
            if mirror is not None:
                conn.execute(delete(mirror).where(mirror.c.dp_execution_id == execution_id))
    conn.execute(delete(targets).where(targets.c.execution_id == execution_id))
    # data_patch_rejects stays: it explains why a run failed.


def _mirror_by_name(conn: Connection, name: str):  # type: ignore[no-untyped-def]
    from sqlalchemy import MetaData, inspect

    if not inspect(conn).has_table(name):
        return None
    md = MetaData()
    md.reflect(conn, only=[name])
    return md.tables[name]


# ---------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------


def declaration_of(patch: Patch) -> dict[str, Any]:
    return {
        "driving_table": patch.driving_table,
        "tables": list(patch.tables()),
        "updates": {t: list(c) for t, c in patch.updates.items()},
        "inserts": {t: list(c) for t, c in patch.inserts.items()},
        "related": dict(patch.related),
    }


def _written_tables(decl: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys([*decl["updates"], *decl["inserts"]]))


def check_columns(tables: Tables, patch: Patch) -> None:
    for table, cols in patch.required_columns().items():
        missing = sorted(set(cols) - set(tables[table].c.keys()))
        if missing:
            raise PlanRefused(
                f"column(s) missing in table {table!r}: {', '.join(missing)} "
                f"(patch {patch.name} needs them)"
            )


#: A lock whose holder's process is gone (same host) is stale once the holder's execution has had
#: no heartbeat for this long (the gap between two op processes of a live run is shorter).
LOCK_PID_GRACE_SECONDS = float(os.environ.get("STOCKRX_LOCK_PID_GRACE_SECONDS", "120"))
#: Any lock is stale once its holder's execution has had no heartbeat for this long.
LOCK_STALE_SECONDS = float(os.environ.get("STOCKRX_LOCK_STALE_SECONDS", "1800"))

#: Given a Dagster run id: its status if the run is finished (terminal), else None.
RunFinished = Callable[[str], str | None]


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


def _release_stale(
    conn: Connection, holder: dict[str, Any], reason: str, execution_id: str, log: Any
) -> None:
    """Drop a dead holder's locks; close its execution as failed, saying why (the history)."""
    dead = holder["execution_id"]
    conn.execute(delete(locks).where(locks.c.execution_id == dead))
    note = (
        f"abandoned: its table locks were released as stale by execution {execution_id} "
        f"at {utcnow():%Y-%m-%d %H:%M:%S} UTC because {reason}"
    )
    row = conn.execute(
        select(executions.c.status, executions.c.error_message).where(
            executions.c.execution_id == dead
        )
    ).first()
    if row is not None:
        values: dict[str, Any] = {
            "error_message": "; ".join(m for m in (row.error_message, note) if m)
        }
        if row.status == "running":
            values.update(status="failed", completed_at=utcnow())
        set_execution(conn, dead, **values)
    (log or logging.getLogger(__name__)).warning(
        f"released stale lock of execution {dead} (Dagster run {holder['dagster_run_id']}, "
        f"host {holder['hostname']}, pid {holder['pid']}): {reason}"
    )


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
    with the reason, and this execution takes the lock.
    """
    here = {"dagster_run_id": run_id, "hostname": socket.gethostname(), "pid": os.getpid()}
    for table in tables:
        holder = conn.execute(select(locks).where(locks.c.table_name == table)).mappings().first()
        if holder is not None:
            if holder["execution_id"] == execution_id:
                if any(holder[k] != v for k, v in here.items()):
                    # A later step (own process) or run of the same execution: it holds it now.
                    conn.execute(update(locks).where(locks.c.table_name == table).values(**here))
                continue
            reason = stale_lock_reason(conn, dict(holder), run_finished)
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
                    {"holder": {k: _jsonable(v) for k, v in holder.items()}},
                )
            _release_stale(conn, dict(holder), reason, execution_id, log)
        try:
            with conn.begin_nested():
                conn.execute(
                    insert(locks).values(table_name=table, execution_id=execution_id,
                                         acquired_at=utcnow(), **here)
                )
        except IntegrityError:
            raise PlanRefused(
                f"table {table!r} was locked by another execution a moment ago; try again"
            ) from None


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


def plan_execution(
    engine: Engine,
    patch: Patch,
    settings: PatchSettings,
    config: PatchRunConfig,
    dagster_run_id: str | None = None,
    root_run_id: str | None = None,
    log: logging.Logger | Any = None,
    checks: Sequence[PlanCheck] = (),
    resources: Any = None,
    run_finished: RunFinished | None = None,
) -> str:
    """Create the execution, validate everything, lock the tables, freeze the target set.

    ``checks`` are called twice: ``before_freeze`` (config and tables are valid) and
    ``after_freeze`` (in the freezing transaction, target set in data_patch_targets, execution row
    filled in: target_count, estimated_seconds); raising PlanRefused there refuses the run before
    any write to StockRx tables, recorded in history.

    A paused execution (stopped at the end of a maintenance window) is continued instead of
    planning a new one when ``config.resume_execution_id`` names it or its config is the same
    (``RESUME_IGNORED_CONFIG`` aside): ``checks`` are then called once with stage ``resume`` (in
    the transaction that takes it over); a refusal leaves it paused.
    """
    log = log or logging.getLogger(__name__)
    check_connection(engine)
    state.ensure_framework_tables(engine)

    with write_transaction(engine) as conn:
        if root_run_id:
            existing = conn.execute(
                select(executions.c.execution_id, executions.c.phase).where(
                    executions.c.root_run_id == root_run_id,
                    executions.c.status.in_(["running", "failed"]),
                    executions.c.kind == "patch",
                )
            ).first()
            if existing is not None and existing.phase != "planning":
                # Re-execution of the same Dagster run: carry on with the same execution.
                set_execution(
                    conn,
                    existing.execution_id,
                    status="running",
                    error_message=None,
                    completed_at=None,
                    dagster_run_id=dagster_run_id,
                )
                acquire_locks(
                    conn,
                    patch.tables(),
                    existing.execution_id,
                    dagster_run_id,
                    run_finished,
                    log,
                )
                log.info(f"resuming execution {existing.execution_id}")
                return str(existing.execution_id)

    resumed = _resume_paused(
        engine, patch, settings, config, dagster_run_id, root_run_id, log, checks, resources,
        run_finished,
    )
    if resumed is not None:
        return resumed

    execution_id = str(uuid.uuid4())
    run_at = utcnow().replace(microsecond=0)
    business_date = dt.datetime.now(ZoneInfo(patch.timezone)).date()
    cfg = config.model_dump()
    bd_override = cfg.get("business_date")
    if bd_override:
        try:
            business_date = dt.date.fromisoformat(str(bd_override))
        except ValueError:
            pass  # reported by check_config below
    batch_size = settings.batch_size if config.batch_size is None else config.batch_size
    memory_limit = (
        settings.memory_limit_mb if config.memory_limit_mb is None else config.memory_limit_mb
    )
    with write_transaction(engine) as conn:
        conn.execute(
            insert(executions).values(
                execution_id=execution_id,
                patch_name=patch.name,
                kind="patch",
                status="running",
                phase="planning",
                dry_run=bool(config.dry_run),
                started_at=utcnow(),
                dagster_run_id=dagster_run_id,
                root_run_id=root_run_id or dagster_run_id,
                launched_by=config.launched_by or _default_user(),
                config=cfg,
                declaration=declaration_of(patch),
                run_at=run_at,
                business_date=business_date.isoformat(),
                batch_size=batch_size,
                memory_limit_mb=memory_limit,
                heartbeat_at=utcnow(),
            )
        )
    try:
        if batch_size <= 0:
            raise PatchConfigError(f"batch_size must be positive, got {batch_size}")
        if memory_limit <= 0:
            raise PatchConfigError(f"memory_limit_mb must be positive, got {memory_limit}")
        patch.check_config(config)
        tables = state.reflect_tables(engine, patch.tables())
        check_columns(tables, patch)
        ctx = RunContext(execution_id, run_at, business_date)
        selects = patch.targets(tables, config, ctx)
        unknown = set(selects) - set(patch.updates) - {patch.driving_table}
        if unknown or patch.driving_table not in selects:
            raise PlanRefused(
                f"patch {patch.name} targets() must select ids of {patch.driving_table} and of "
                f"its updated tables only (got {sorted(selects)})"
            )
        info = PlanInfo(execution_id, patch, settings, config, engine, resources)
        with engine.connect() as conn:
            for check in checks:
                check("before_freeze", conn, info)
        for table in patch.tables():
            mirror_table(engine, tables[table], "backup")
            mirror_table(engine, tables[table], "stage")
        with write_transaction(engine) as conn:
            acquire_locks(conn, patch.tables(), execution_id, dagster_run_id, run_finished, log)
            counts = {}
            for table, sel in selects.items():
                ids = sel.subquery()
                id_col = list(ids.c)[0]
                counts[table] = conn.execute(
                    insert(targets).from_select(
                        ["execution_id", "table_name", "row_id"],
                        select(literal(execution_id), literal(table), id_col).distinct(),
                    ),
                    execution_options=ROWCOUNT,
                ).rowcount
            target_count = counts[patch.driving_table]
            set_execution(
                conn,
                execution_id,
                phase="planned",
                target_count=target_count,
                estimated_seconds=estimate_seconds(conn, patch.name, target_count),
                report={"targets": counts},
            )
            for check in checks:
                check("after_freeze", conn, info)
    except Exception as exc:
        finish_execution(engine, execution_id, "failed", error=_describe(exc))
        exc.execution_id = execution_id  # type: ignore[attr-defined]
        raise
    log.info(
        f"planned execution {execution_id} of {patch.name} "
        f"({'DRY RUN' if config.dry_run else 'REAL RUN'}): "
        + ", ".join(f"{n:,} {t}" for t, n in counts.items())
    )
    return execution_id


#: Config fields that say how, when or by whom a run goes, not what it writes: a new run whose
#: config differs from a paused execution's only in these continues it.
RESUME_IGNORED_CONFIG = ("launched_by", "allow_outside_window", "resume_execution_id")


def work_config(config: dict[str, Any] | None) -> dict[str, Any]:
    plain = json.loads(json.dumps(config or {}, default=str))
    return {k: v for k, v in plain.items() if k not in RESUME_IGNORED_CONFIG}


def _resume_paused(
    engine: Engine,
    patch: Patch,
    settings: PatchSettings,
    config: PatchRunConfig,
    dagster_run_id: str | None,
    root_run_id: str | None,
    log: Any,
    checks: Sequence[PlanCheck],
    resources: Any,
    run_finished: RunFinished | None,
) -> str | None:
    """Take over a paused execution of the patch for this run, or None if there is none to."""
    wanted = getattr(config, "resume_execution_id", None)
    mine = work_config(config.model_dump())
    with write_transaction(engine) as conn:
        q = select(executions).where(
            executions.c.patch_name == patch.name, executions.c.kind == "patch"
        )
        if wanted:
            row = conn.execute(q.where(executions.c.execution_id == wanted)).mappings().first()
            if row is None:
                raise PlanRefused(f"no execution {wanted} of patch {patch.name} to resume")
            if row["status"] != "paused":
                raise PlanRefused(
                    f"execution {wanted} is {row['status']} (phase {row['phase']}), not paused: "
                    "nothing to resume"
                )
            theirs = work_config(row["config"])
            if theirs != mine:
                diff = sorted(k for k in {*theirs, *mine} if theirs.get(k) != mine.get(k))
                raise PlanRefused(
                    f"the run config differs from paused execution {wanted}'s in {diff}: a "
                    "resumed execution keeps its config"
                )
        else:
            paused = conn.execute(
                q.where(executions.c.status == "paused").order_by(executions.c.started_at)
            ).mappings()
            row = next((r for r in paused if work_config(r["config"]) == mine), None)
            if row is None:
                return None
        execution_id = str(row["execution_id"])
        info = PlanInfo(execution_id, patch, settings, config, engine, resources)
        for check in checks:
            check("resume", conn, info)
        now = utcnow()
        paused_for = max((now - (row["heartbeat_at"] or now)).total_seconds(), 0.0)
        set_execution(
            conn,
            execution_id,
            status="running",
            phase="transforming" if row["phase"] == PAUSED_PHASE else row["phase"],
            error_message=None,
            completed_at=None,
            dagster_run_id=dagster_run_id,
            root_run_id=root_run_id or dagster_run_id,
            paused_seconds=float(row["paused_seconds"] or 0) + paused_for,
            heartbeat_at=now,
        )
        acquire_locks(conn, patch.tables(), execution_id, dagster_run_id, run_finished, log)
    log.info(
        f"resuming paused execution {execution_id} of {patch.name} at id > {row['cursor']} "
        f"({int(row['processed_records']):,}/{int(row['target_count']):,} rows done, "
        f"{int(row['batches_done'])} batches kept; paused {paused_for:,.0f} s)"
    )
    return execution_id


def _default_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user database in some containers
        return "unknown"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------
# Backup
# ---------------------------------------------------------------------------------------------


def take_backup(engine: Engine, execution_id: str, log: Any = None) -> dict[str, int]:
    """Copy the before-image (every column) of every targeted row, set-based."""
    log = log or logging.getLogger(__name__)
    with write_transaction(engine) as conn:
        ex = load_execution(conn, execution_id)
    decl = ex["declaration"]
    if ex["phase"] not in ("planned",):
        log.info(f"backup already taken for {execution_id} (phase {ex['phase']})")
        return dict(ex["report"].get("backup", {})) if ex["report"] else {}
    tables = state.reflect_tables(engine, decl["tables"])
    counts: dict[str, int] = {}
    with write_transaction(engine) as conn:
        for table in _targeted_tables(conn, execution_id):
            live = tables[table]
            backup = mirror_table(engine, live, "backup")
            conn.execute(delete(backup).where(backup.c.dp_execution_id == execution_id))
            ids = select(targets.c.row_id).where(
                targets.c.execution_id == execution_id, targets.c.table_name == table
            )
            cols = [c.name for c in live.columns]
            counts[table] = conn.execute(
                insert(backup).from_select(
                    ["dp_execution_id", "dp_action", "dp_seq", "dp_source_id", *cols],
                    select(
                        literal(execution_id),
                        literal(BACKUP),
                        live.c.id,
                        literal(None, type_=Integer),
                        *[live.c[c] for c in cols],
                    ).where(live.c.id.in_(ids)),
                ),
                execution_options=ROWCOUNT,
            ).rowcount
            fk = decl.get("related", {}).get(table)
            if fk:  # the transform reads these rows by fk range, one batch of driving ids at a time
                Index(f"ix_{backup.name}_{fk}"[:60], backup.c.dp_execution_id, backup.c[fk]).create(
                    conn, checkfirst=True
                )
        report = dict(ex["report"] or {})
        report["backup"] = counts
        set_execution(conn, execution_id, phase="backed_up", report=report, heartbeat_at=utcnow())
    state.analyze(engine, [targets, *[mirror_table(engine, tables[t], "backup") for t in counts]])
    log.info("backup taken: " + ", ".join(f"{n:,} {t}" for t, n in counts.items()))
    return counts


def _targeted_tables(conn: Connection, execution_id: str) -> list[str]:
    return list(
        conn.execute(
            select(targets.c.table_name)
            .where(targets.c.execution_id == execution_id)
            .distinct()
            .order_by(targets.c.table_name)
        ).scalars()
    )


# ---------------------------------------------------------------------------------------------
# Transform
# ---------------------------------------------------------------------------------------------


def _fractional(col) -> bool:  # type: ignore[no-untyped-def]
    return isinstance(col.type, Numeric) and not isinstance(col.type, Integer)


def _read_columns(mirror, live, columns: list[str]) -> list[Any]:  # type: ignore[no-untyped-def]
    """A mirror's columns for a batch read: decimals come as floats from the database (the
    frames hold them as float64 anyway), not as one Decimal object per value."""
    return [
        cast(mirror.c[c], Float).label(c) if _fractional(live.c[c]) else mirror.c[c]
        for c in columns
    ]


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


def _frame(rows: Sequence[Any], columns: list[str], table) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    df = pd.DataFrame.from_records(rows, columns=columns)
    for col in table.columns:
        if col.name in df.columns and _fractional(col) and df[col.name].dtype != "float64":
            df[col.name] = pd.to_numeric(df[col.name], errors="coerce").astype("float64")
    return df


def bulk_insert(conn: Connection, table: Any, df: pd.DataFrame) -> None:
    """Insert a frame's rows in the connection's transaction: COPY on PostgreSQL (psycopg 3),
    executemany elsewhere. Values travel as data, never as SQL text; column names are checked
    against the table's (reflected) columns first."""
    if df.empty:
        return
    cols = [str(c) for c in df.columns]
    unknown = [c for c in cols if c not in table.c]
    if unknown:
        raise PatchError(f"{table.name} has no columns {unknown}")
    if conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg":
        q = conn.dialect.identifier_preparer
        sql = f"COPY {q.quote(table.name)} ({', '.join(q.quote(c) for c in cols)}) FROM STDIN"
        # the COPY text built column-wise (frames.copy_text); the driver's row-by-row
        # formatting only for the dtypes it does not cover
        data = copy_text(df, {c for c in cols if isinstance(table.c[c].type, Integer)})
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            with cursor.copy(sql) as copy:
                if data is not None:
                    copy.write(data)
                else:
                    for row in plain_rows(df)[1]:
                        copy.write_row(row)
        finally:
            cursor.close()
        return
    conn.execute(insert(table), plain_records(df))


def _config_of(patch: Patch, ex: dict[str, Any]) -> PatchRunConfig:
    return patch.config_class(**(ex["config"] or {}))


def run_transform(
    engine: Engine,
    patch: Patch,
    execution_id: str,
    memory: MemoryGuard,
    log: Any = None,
) -> dict[str, int]:
    """Transform the frozen target set in keyset batches into the stage tables.

    Each batch commits its staged rows together with the cursor, so a crashed run resumes at the
    next batch. Rows whose changes fail the patch's pandera schemas are rejected (recorded with
    the reason) together with every other change of the same source row.
    """
    log = log or logging.getLogger(__name__)
    with write_transaction(engine) as conn:
        ex = load_execution(conn, execution_id)
    if ex["phase"] not in ("backed_up", "transforming"):
        log.info(f"transform already done for {execution_id} (phase {ex['phase']})")
        return _counts(ex)
    config = _config_of(patch, ex)
    ctx = RunContext(execution_id, ex["run_at"], dt.date.fromisoformat(ex["business_date"]))
    tables = state.reflect_tables(engine, patch.tables())
    backups = {t: mirror_table(engine, tables[t], "backup") for t in patch.tables()}
    stages = {t: mirror_table(engine, tables[t], "stage") for t in patch.tables()}
    driving = backups[patch.driving_table]
    live_cols = {t: [c.name for c in tables[t].columns] for t in patch.tables()}

    cursor = ex["cursor"] if ex["cursor"] is not None else -(2**62)
    done = int(ex["processed_records"])
    staged_inserts = int(ex["staged_inserts"])
    batch_no = int(ex["batches_done"])
    total = int(ex["target_count"])
    started = time.monotonic()
    done_at_start = done
    deadline_at, overrun_at = ex.get("deadline_at"), ex.get("overrun_at")
    paused = False
    logged_at = -PROGRESS_LOG_SECONDS
    if done:
        log.info(f"resuming transform at id > {cursor} ({done:,}/{total:,} done)")

    # One writer thread stages batch N (COPY, rejects, progress row: one transaction) while
    # this thread reads and transforms batch N+1: the database's work overlaps the Python work.
    # Writes stay in batch order, and at most one batch waits to be written. While the budget is
    # entered, the objects the step began with are frozen (MemoryBudget.__enter__).
    with (
        memory.budget(ex["memory_limit_mb"], ex["batch_size"]) as budget,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage-writer") as writer,
    ):
        pending: Future[None] | None = None
        while True:
            batch_no += 1
            size = budget.next_batch_size(batch_no)
            with engine.connect() as conn:
                rows = fetch_rows(
                    conn,
                    select(
                        *_read_columns(
                            driving, tables[patch.driving_table], live_cols[patch.driving_table]
                        )
                    )
                    .where(
                        # the whole primary key prefix (dp_action too): an index range scan
                        # from the cursor, not a walk from the execution's first row each batch
                        driving.c.dp_execution_id == execution_id,
                        driving.c.dp_action == BACKUP,
                        driving.c.dp_seq > cursor,
                    )
                    .order_by(driving.c.dp_seq)
                    .limit(size),
                )
                if not rows:
                    break
                if deadline_at is not None or overrun_at is not None:
                    # Between batches: past the window end pauses (progress kept, so this comes
                    # first); over the time budget (3x the estimate) fails.
                    now = clock_now()
                    if deadline_at is not None and now >= deadline_at:
                        paused = True
                        break
                    if overrun_at is not None and now > overrun_at:
                        raise PatchError(
                            f"over 3x its estimate ({ex['estimated_seconds'] or 0:,.0f} s): "
                            f"stopped at a batch boundary after {done:,}/{total:,} rows; nothing "
                            "reached the live tables",
                            {"time_budget": {"overrun_at": str(overrun_at), "processed": done}},
                        )
                frames = {
                    patch.driving_table: _frame(
                        rows, live_cols[patch.driving_table], tables[patch.driving_table]
                    )
                }
                ids = frames[patch.driving_table]["id"]
                lo, hi = int(ids.iat[0]), int(ids.iat[-1])  # in id order (dp_seq = id)
                for rel, fk in patch.related.items():
                    b = backups[rel]
                    rel_rows = fetch_rows(
                        conn,
                        select(*_read_columns(b, tables[rel], live_cols[rel]))
                        .where(b.c.dp_execution_id == execution_id, b.c[fk].between(lo, hi))
                        .order_by(b.c.dp_seq),
                    )
                    frames[rel] = _frame(rel_rows, live_cols[rel], tables[rel])
            changes = patch.transform(frames, config, ctx)
            accepted, reject_rows = _validate_batch(patch, frames, changes)
            staged, n_upd, n_ins = _stage_rows(
                patch, accepted, stages, execution_id, staged_inserts
            )
            staged_inserts += n_ins
            for r in reject_rows:
                r["execution_id"] = execution_id
            cursor = hi
            done += len(rows)
            progress = {
                "phase": "transforming",
                "cursor": cursor,
                "processed_records": done,
                "batches_done": batch_no,
                "staged_updates": executions.c.staged_updates + n_upd,
                "staged_inserts": staged_inserts,
                "failed_records": executions.c.failed_records
                + len({r["source_id"] for r in reject_rows}),
                "peak_rss_mb": budget.peak_rss_mb,
            }
            if pending is not None:
                pending.result()  # the previous batch is staged (or its failure raised here)
            pending = writer.submit(
                _stage_batch, engine, execution_id, staged, reject_rows, progress
            )
            now_s = time.monotonic()
            if now_s - logged_at < PROGRESS_LOG_SECONDS and done < total:
                continue
            logged_at = now_s
            elapsed = now_s - started
            rate = (done - done_at_start) / elapsed if elapsed > 0 else 0.0
            eta = (total - done) / rate if rate > 0 else float("nan")
            log.info(
                f"batch {batch_no}: {done:,}/{total:,} rows ({done / max(total, 1):.0%}), "
                f"batch size {size}, {rate:,.0f} rows/s, ETA {eta:,.1f}s, "
                f"RSS {budget.peak_rss_mb:.0f} MB (step +{budget.peak_used_mb:.0f} MB)"
            )
        if pending is not None:
            pending.result()
    for shrunk_at, new_size, used in budget.shrinks:
        log.warning(
            f"memory guard: batch {shrunk_at} shrunk to {new_size} rows at step memory {used:.0f} MB "
            f"(limit {budget.limit_mb:.0f} MB)"
        )
    if paused:
        ex = pause_execution(engine, execution_id, peak_rss_mb=budget.peak_rss_mb)
        log.warning(
            f"maintenance window ends at {deadline_at:%Y-%m-%d %H:%M:%S} UTC: transform paused "
            f"at a batch boundary after {done:,}/{total:,} rows ({ex['batches_done']} batches "
            f"kept); execution {execution_id} continues in the next window"
        )
        return {**_counts(ex), "paused": 1}
    with write_transaction(engine) as conn:
        set_execution(conn, execution_id, phase="transformed", peak_rss_mb=budget.peak_rss_mb)
        ex = load_execution(conn, execution_id)
    state.analyze(engine, list(stages.values()))
    return _counts(ex)


def _stage_rows(
    patch: Patch,
    accepted: Changes,
    stages: dict[str, Any],
    execution_id: str,
    staged_inserts: int,
) -> tuple[list[tuple[Any, pd.DataFrame]], int, int]:
    """A batch's accepted changes as stage rows: ([(stage table, rows)], updated rows of the
    driving table, inserted rows). Updated rows are keyed by their id; inserted rows number on
    from the ``staged_inserts`` already staged."""
    staged: list[tuple[Any, pd.DataFrame]] = []
    n_upd = n_ins = 0
    for table, df in accepted.updates.items():
        if not df.empty:
            upd = df[["source_id", "id", *patch.updates[table]]]
            upd = upd.rename(columns={"source_id": "dp_source_id"})
            upd = upd.assign(dp_execution_id=execution_id, dp_action=UPDATE, dp_seq=upd["id"])
            staged.append((stages[table], upd))
            if table == patch.driving_table:
                n_upd += len(upd)
    for table, df in accepted.inserts.items():
        if not df.empty:
            ins = df[["source_id", *patch.inserts[table]]]
            ins = ins.rename(columns={"source_id": "dp_source_id"})
            first = staged_inserts + n_ins + 1
            seq = range(first, first + len(ins))
            ins = ins.assign(dp_execution_id=execution_id, dp_action=INSERT, dp_seq=seq)
            n_ins += len(ins)
            staged.append((stages[table], ins))
    return staged, n_upd, n_ins


def _stage_batch(
    engine: Engine,
    execution_id: str,
    staged: list[tuple[Any, pd.DataFrame]],
    reject_rows: list[dict[str, Any]],
    progress: dict[str, Any],
) -> None:
    """One transform batch into the stage: its rows, its rejects and the execution's progress
    (cursor included) in one transaction, so a crashed run resumes after the last batch staged."""
    with write_transaction(engine) as conn:
        for stage, df in staged:
            bulk_insert(conn, stage, df)
        if reject_rows:
            conn.execute(insert(state.rejects), reject_rows[:MAX_REJECTS_STORED])
        conn.execute(
            update(executions)
            .where(executions.c.execution_id == execution_id)
            .values(**progress, heartbeat_at=utcnow())
        )


def pause_execution(engine: Engine, execution_id: str, **values: Any) -> dict[str, Any]:
    """Stop an execution until a later run continues it: progress, backup and staging kept;
    table locks released (a paused execution writes nothing; commit still checks conflicts)."""
    with write_transaction(engine) as conn:
        set_execution(
            conn,
            execution_id,
            status="paused",
            phase=PAUSED_PHASE,
            heartbeat_at=utcnow(),
            deadline_at=None,
            overrun_at=None,
            **values,
        )
        conn.execute(delete(locks).where(locks.c.execution_id == execution_id))
        return load_execution(conn, execution_id)


def _counts(ex: dict[str, Any]) -> dict[str, int]:
    return {
        "processed": int(ex["processed_records"]),
        "staged_updates": int(ex["staged_updates"]),
        "staged_inserts": int(ex["staged_inserts"]),
        "failed": int(ex["failed_records"]),
    }


def _validate_batch(
    patch: Patch, frames: dict[str, pd.DataFrame], changes: Changes
) -> tuple[Changes, list[dict[str, Any]]]:
    """Check a batch's changes with the patch's schemas; drop every change of a bad source."""
    bad_sources: set[int] = set()
    reject_rows: list[dict[str, Any]] = []
    checked: list[tuple[str, pd.DataFrame]] = []
    for table, df in changes.updates.items():
        if table not in patch.updates:
            raise PatchError(f"patch {patch.name} updated undeclared table {table!r}")
        extra = set(df.columns) - {"id", "source_id", *patch.updates[table]}
        if extra:
            raise PatchError(f"patch {patch.name} changed undeclared columns {sorted(extra)} of {table}")
        before = frames.get(table)
        if before is None:
            raise PatchError(f"patch {patch.name} updated {table} without loading its rows")
        outside = ~df["id"].isin(before["id"])
        if outside.any():
            raise PatchError(
                f"patch {patch.name} tried to update {table} rows outside the frozen target set: "
                f"{sorted(df['id'][outside].unique().tolist())[:5]}"
            )
        merged = before.set_index("id")
        after = df.set_index("id")
        full = merged.loc[after.index].copy()
        for col in patch.updates[table]:
            full[col] = after[col]
        full["source_id"] = after["source_id"]
        checked.append((table, full.reset_index()))
    for table, df in changes.inserts.items():
        if table not in patch.inserts:
            raise PatchError(f"patch {patch.name} inserted into undeclared table {table!r}")
        checked.append((table, df.reset_index(drop=True)))
    for table, df in checked:
        if "source_id" not in df.columns:
            raise PatchError(f"patch {patch.name}: {table} changes lack the source_id column")
        schema = patch.schemas.get(table)
        if schema is None or df.empty:
            continue
        try:
            schema.validate(df, lazy=True)
        except pa_errors.SchemaErrors as err:
            cases = err.failure_cases
            if cases["index"].isna().any():
                # A schema-level failure (missing column, wrong dtype) is a bug in the patch.
                raise PatchError(
                    f"patch {patch.name} produced {table} rows that do not fit its schema: "
                    + "; ".join(
                        f"{r.column}: {r.check} ({r.failure_case})"
                        for r in cases[cases["index"].isna()].itertuples()
                    )
                ) from None
            for r in cases.itertuples():
                src = int(df.loc[int(r.index), "source_id"])
                bad_sources.add(src)
                reject_rows.append(
                    {
                        "execution_id": "",
                        "source_id": src,
                        "table_name": table,
                        "column_name": None if pd.isna(r.column) else str(r.column),
                        "check_name": str(r.check),
                        "failure_case": str(r.failure_case),
                    }
                )
    if not bad_sources:
        return changes, []
    kept = Changes(
        updates={t: df[~df["source_id"].isin(bad_sources)] for t, df in changes.updates.items()},
        inserts={t: df[~df["source_id"].isin(bad_sources)] for t, df in changes.inserts.items()},
    )
    return kept, reject_rows


# ---------------------------------------------------------------------------------------------
# The would-be (or committed) result, for invariants and reports
# ---------------------------------------------------------------------------------------------


@dataclass
class ResultView:
    """SQL views of an execution's result, before commit (from staging) or after (live).

    ``updated(t)``: full after-images of the rows the patch updates, plus ``before_<col>`` for
    every column the patch changes; ``inserted(t)``: rows it inserts; ``table(t)``: the whole
    table as it is (committed) or would be (not yet). Every subquery carries ``dp_source_id``.
    """

    engine: Engine
    tables: Tables
    execution_id: str
    committed: bool
    declaration: dict[str, Any]
    execution: dict[str, Any] = field(default_factory=dict)  # its report: ids of inserted rows

    def _stage(self, table: str):  # type: ignore[no-untyped-def]
        return mirror_table(self.engine, self.tables[table], "stage")

    def _backup(self, table: str):  # type: ignore[no-untyped-def]
        return mirror_table(self.engine, self.tables[table], "backup")

    def _cols(self, table: str) -> list[str]:
        return [c.name for c in self.tables[table].columns]

    def updated(self, table: str):  # type: ignore[no-untyped-def]
        st, bk, live = self._stage(table), self._backup(table), self.tables[table]
        changed = self.declaration["updates"].get(table, ())
        on_backup = and_(
            bk.c.dp_execution_id == st.c.dp_execution_id,
            bk.c.dp_seq == st.c.dp_seq,
            bk.c.dp_action == BACKUP,
        )
        if self.committed:
            # Every staged update has its backup row, so a LEFT JOIN is the same join; but on
            # its primary key it lets PostgreSQL drop the backup from a query that reads no
            # before_ column: one join over every updated row less for each such check.
            joined = st.outerjoin(bk, on_backup).join(live, live.c.id == st.c.dp_seq)
            cols = [live.c[c] for c in self._cols(table)]
        else:
            joined = st.join(bk, on_backup)
            # id from the stage's primary key, so joins on it can use the index
            cols = [
                (st.c.dp_seq if c == "id" else st.c[c] if c in changed else bk.c[c]).label(c)
                for c in self._cols(table)
            ]
        q = (
            select(*cols, *[bk.c[c].label(f"before_{c}") for c in changed], st.c.dp_source_id)
            .select_from(joined)
            .where(st.c.dp_execution_id == self.execution_id, st.c.dp_action == UPDATE)
        )
        return q.subquery(f"updated_{table}")

    def inserted(self, table: str):  # type: ignore[no-untyped-def]
        st, live = self._stage(table), self.tables[table]
        cond = and_(st.c.dp_execution_id == self.execution_id, st.c.dp_action == INSERT)
        if self.committed:
            new_id = inserted_id(st, self.execution, table)
            with self.engine.connect() as conn:
                span = inserted_id_range(conn, st, self.execution, table)
            q = select(*live.c, st.c.dp_source_id).join(st, live.c.id == new_id).where(cond)
            if span is not None:
                q = q.where(live.c.id.between(*span))
        else:
            q = select(*[st.c[c] for c in self._cols(table)], st.c.dp_source_id).where(cond)
        return q.subquery(f"inserted_{table}")

    def table(self, table: str):  # type: ignore[no-untyped-def]
        live = self.tables[table]
        if self.committed:
            return select(*live.c, literal(None, type_=Integer).label("dp_source_id")).subquery(
                f"all_{table}"
            )
        st = self._stage(table)
        # NOT EXISTS, not NOT IN: PostgreSQL runs NOT IN (subquery) as a nested loop when the
        # subquery does not fit in work_mem (quadratic at a million rows); an anti-join is linear
        staged = select(st.c.dp_seq).where(
            st.c.dp_execution_id == self.execution_id,
            st.c.dp_action == UPDATE,
            st.c.dp_seq == live.c.id,
        )
        untouched = select(*live.c, literal(None, type_=Integer).label("dp_source_id")).where(
            ~staged.exists()
        )
        upd, ins = self.updated(table), self.inserted(table)
        upd_cols = [upd.c[c] for c in self._cols(table)] + [upd.c.dp_source_id]
        parts = [untouched, select(*upd_cols), select(*ins.c)]
        return union_all(*parts).subquery(f"all_{table}")


def invariant_checks(
    engine: Engine,
    patch: Patch,
    execution_id: str,
    committed: bool,
    timeout_s: float | None,
) -> list[Callable[[], dict[str, Any] | None]]:
    """One call per invariant of ``patch``: it returns the broken invariant with a sample of
    offending rows, or None (run them with ``run_concurrently``).

    On PostgreSQL each query may run ``timeout_s`` at most (``statement_timeout``): one that
    runs longer counts as broken (``timed_out``), so a bad plan fails the validation, or makes
    post-verification restore, instead of holding the maintenance window and the table locks.
    """
    with engine.connect() as conn:
        ex = load_execution(conn, execution_id)
    config = _config_of(patch, ex)
    tables = state.reflect_tables(engine, patch.tables())
    view = ResultView(engine, tables, execution_id, committed, ex["declaration"], ex)
    limit_ms = int(timeout_s * 1000) if timeout_s and engine.dialect.name == "postgresql" else 0

    def check(inv: Invariant) -> dict[str, Any] | None:
        sub = inv.offenders.subquery()
        with engine.connect() as conn:
            if limit_ms:
                conn.execute(select(func.set_config("statement_timeout", str(limit_ms), True)))
            try:
                n = conn.execute(select(func.count()).select_from(sub)).scalar_one()
            except OperationalError as exc:
                if "statement timeout" not in str(exc.orig):
                    raise
                return {"name": inv.name, "description": inv.description, "count": None,
                        "timed_out": timeout_s, "sample": []}
            if not n:
                return None
            sample = [
                {k: _jsonable(v) for k, v in r.items()}
                for r in conn.execute(select(sub).limit(SAMPLE_ROWS)).mappings()
            ]
        return {"name": inv.name, "description": inv.description, "count": n, "sample": sample}

    return [functools.partial(check, inv) for inv in patch.invariants(view, config)]


def run_concurrently(calls: Sequence[Callable[[], Any]], workers: int) -> list[Any]:
    """The results of ``calls`` in their order, up to ``workers`` at a time in threads (each call
    opens its own connection). The first exception is raised once every call has ended."""
    if workers <= 1 or len(calls) <= 1:
        return [call() for call in calls]
    workers = min(workers, len(calls))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="check") as pool:
        futures = [pool.submit(call) for call in calls]
    return [f.result() for f in futures]


def invariant_problem(broken: dict[str, Any], after_commit: bool = False) -> str:
    """One line for a broken invariant (invariant_checks), for the problems list."""
    when = " after commit" if after_commit else ""
    if broken["count"] is None:
        return (
            f"invariant {broken['name']} could not be checked{when}: its query ran longer than "
            f"{broken['timed_out']:g} s (query_timeout_seconds) and was cancelled"
        )
    return f"invariant {broken['name']} broken{when} by {broken['count']:,} row(s): " + (
        broken["description"]
    )


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    return str(v)


# ---------------------------------------------------------------------------------------------
# Validate and report
# ---------------------------------------------------------------------------------------------


def validate_execution(
    engine: Engine,
    patch: Patch,
    settings: PatchSettings,
    execution_id: str,
    log: Any = None,
) -> tuple[bool, dict[str, Any]]:
    """Whole-set checks on the would-be result; build the impact report. Returns (passed, report)."""
    log = log or logging.getLogger(__name__)
    with engine.connect() as conn:
        ex = load_execution(conn, execution_id)
    if ex["phase"] not in ("transformed", "validated"):
        raise PatchError(f"execution {execution_id} is in phase {ex['phase']}, not transformed")
    ratio_allowed = (
        settings.max_failure_ratio
        if settings.max_failure_ratio is not None
        else patch.max_failure_ratio
    )
    total = max(int(ex["target_count"]), 1)
    failed = int(ex["failed_records"])
    problems: list[str] = []
    if failed and failed / total > ratio_allowed:
        problems.append(
            f"{failed:,} of {total:,} rows ({failed / total:.1%}) failed validation "
            f"(allowed: {ratio_allowed:.1%})"
        )
    approver = None if ex["dry_run"] else ex.get("approved_by_execution_id")
    # Its approving dry run passed the trial apply on the same plan (patch code, config, target
    # set), and the commit is one all-or-nothing transaction: a refusal there still changes
    # nothing. Applying everything twice would double the cost of the commit.
    trials = [] if approver else [functools.partial(trial_apply, engine, execution_id)]
    checks = invariant_checks(
        engine, patch, execution_id, committed=False, timeout_s=settings.query_timeout_seconds
    )
    # Read-only queries on their own connections, beside the trial (first: the longest)
    results = run_concurrently(
        [
            *trials,
            *checks,
            functools.partial(build_report, engine, execution_id),
            functools.partial(report_sections, engine, patch, ex),
            functools.partial(_reject_sample, engine, execution_id),
        ],
        settings.check_connections,
    )
    refusal = results.pop(0) if trials else None
    broken = [b for b in results[: len(checks)] if b is not None]
    report, sections, rejects = results[len(checks) :]
    problems += [invariant_problem(b) for b in broken]
    if refusal:
        problems.append(f"the database would refuse the changes: {refusal}")
    if approver:
        trial = f"skipped: approving dry run {approver} passed it on the same plan"
    else:
        trial = "refused" if refusal else "passed"
    report["sections"] = sections
    report["validation"] = {
        "passed": not problems,
        "problems": problems,
        "invariants": broken,
        "database_refusal": refusal,
        "trial_apply": trial,
        "rejects": rejects,
    }
    markdown = render_markdown(ex, report)
    with write_transaction(engine) as conn:
        merged = dict(ex["report"] or {})
        merged.update(report)
        set_execution(
            conn,
            execution_id,
            phase="validated",
            report=merged,
            report_markdown=markdown,
            heartbeat_at=utcnow(),
        )
    return not problems, merged


def report_sections(engine: Engine, patch: Patch, ex: dict[str, Any]) -> dict[str, Any]:
    """The patch's extra report lists (Patch.report_sections): count and first rows of each."""
    ctx = RunContext(ex["execution_id"], ex["run_at"], dt.date.fromisoformat(ex["business_date"]))
    tables = state.reflect_tables(engine, patch.tables())
    out: dict[str, Any] = {}
    with engine.connect() as conn:
        for title, sel in patch.report_sections(tables, _config_of(patch, ex), ctx).items():
            n = conn.execute(
                select(func.count()).select_from(sel.order_by(None).subquery())
            ).scalar_one()
            rows = conn.execute(sel.limit(SECTION_ROWS)).mappings()
            out[title] = {"count": n, "rows": [{k: _jsonable(v) for k, v in r.items()} for r in rows]}
    return out


def trial_apply(engine: Engine, execution_id: str) -> str | None:
    """Apply the staged changes in a transaction that is always rolled back, so the database's
    own rules (CHECK, NOT NULL, unique and foreign keys, triggers: also those of columns and
    constraints the patch does not know) judge them before commit. Returns the refusal or None.

    Inserted rows get ids ``-dp_seq`` here: no sequence value is used up and no id can collide
    with a row the application inserts meanwhile.
    """
    with engine.connect() as conn:
        decl = load_execution(conn, execution_id)["declaration"]
    tables = state.reflect_tables(engine, decl["tables"])
    with engine.connect() as conn:
        conn.execution_options(sqlite_begin="IMMEDIATE")
        trans = conn.begin()
        try:
            _apply_staged(conn, engine, tables, execution_id, decl, trial=True)
            if conn.dialect.name == "postgresql":
                conn.execute(text("SET CONSTRAINTS ALL IMMEDIATE"))  # deferred FKs too
        except DatabaseRefused as exc:
            return str(exc)
        finally:
            trans.rollback()
    return None


def _reject_sample(engine: Engine, execution_id: str) -> list[dict[str, Any]]:
    rj = state.rejects
    with engine.connect() as conn:
        rows = conn.execute(
            select(rj.c.source_id, rj.c.table_name, rj.c.column_name, rj.c.check_name, rj.c.failure_case)
            .where(rj.c.execution_id == execution_id)
            .order_by(rj.c.source_id)
            .limit(SAMPLE_ROWS)
        ).mappings()
        return [dict(r) for r in rows]


def build_report(engine: Engine, execution_id: str) -> dict[str, Any]:
    """Counts, before/after sums and min/max change of every changed numeric column, samples."""
    with engine.connect() as conn:
        ex = load_execution(conn, execution_id)
    decl = ex["declaration"]
    tables = state.reflect_tables(engine, decl["tables"])
    report: dict[str, Any] = {
        "patch": ex["patch_name"],
        "execution_id": execution_id,
        "dry_run": bool(ex["dry_run"]),
        "targets": (ex["report"] or {}).get("targets", {}),
        "processed_records": int(ex["processed_records"]),
        "failed_records": int(ex["failed_records"]),
        "updates": {},
        "inserts": {},
    }
    with engine.connect() as conn:
        for table, cols in decl["updates"].items():
            live = tables[table]
            st, bk = mirror_table(engine, live, "stage"), mirror_table(engine, live, "backup")
            joined = st.join(
                bk, and_(bk.c.dp_execution_id == st.c.dp_execution_id, bk.c.dp_seq == st.c.dp_seq, bk.c.dp_action == BACKUP)
            )
            cond = and_(st.c.dp_execution_id == execution_id, st.c.dp_action == UPDATE)
            numeric = [c for c in cols if _is_numeric(live.c[c])]
            # One pass over the pairs: the count, and per numeric column the sums, the spread of
            # the change and what the histogram needs of it (so it does not pass again for that)
            aggs: list[Any] = [func.count()]
            for c in numeric:
                change = st.c[c] - bk.c[c]
                aggs += [func.sum(bk.c[c]), func.sum(st.c[c]), func.min(change),
                         func.max(change), func.count(change), func.count(case((change == 0, 1)))]
            rows, *vals = conn.execute(select(*aggs).select_from(joined).where(cond)).one()
            stats: dict[str, Any] = {}
            spreads: dict[str, ChangeSpread] = {}
            for i, c in enumerate(numeric if rows else ()):
                s_before, s_after, d_min, d_max, n, unchanged = vals[6 * i : 6 * i + 6]
                stats[c] = {
                    "sum_before": _num(s_before),
                    "sum_after": _num(s_after),
                    "min_change": _num(d_min),
                    "max_change": _num(d_max),
                }
                spreads[c] = ChangeSpread(d_min, d_max, n, unchanged)
            sample = conn.execute(
                select(st.c.dp_seq.label("id"), *[bk.c[c].label(f"{c}_before") for c in cols],
                       *[st.c[c].label(f"{c}_after") for c in cols])
                .select_from(joined)
                .where(cond)
                .order_by(st.c.dp_seq)
                .limit(SAMPLE_ROWS)
            ).mappings()
            report["updates"][table] = {
                "rows": rows,
                "columns": list(cols),
                "stats": stats,
                "sample": [{k: _jsonable(v) for k, v in r.items()} for r in sample],
                # The distribution of each numeric change that is not the same for every row.
                "histograms": {
                    c: change_histogram(conn, st, bk, c, execution_id, spread=spreads[c]).to_json()
                    for c, s in stats.items()
                    if s["min_change"] != s["max_change"]
                },
            }
        for table, cols in decl["inserts"].items():
            st = mirror_table(engine, tables[table], "stage")
            cond = and_(st.c.dp_execution_id == execution_id, st.c.dp_action == INSERT)
            rows = conn.execute(select(func.count()).select_from(st).where(cond)).scalar_one()
            sample = conn.execute(
                select(*[st.c[c] for c in cols]).where(cond).order_by(st.c.dp_seq).limit(SAMPLE_ROWS)
            ).mappings()
            report["inserts"][table] = {
                "rows": rows,
                "sample": [{k: _jsonable(v) for k, v in r.items()} for r in sample],
            }
    return report


def _is_numeric(col) -> bool:  # type: ignore[no-untyped-def]
    try:
        return col.type.python_type in (int, float) or isinstance(col.type, Numeric | Integer)
    except NotImplementedError:
        return False


def _num(v: Any) -> float | int | None:
    if v is None:
        return None
    f = float(v)
    return int(f) if f.is_integer() else round(f, 2)


def render_markdown(ex: dict[str, Any], report: dict[str, Any]) -> str:
    mode = "DRY RUN, nothing committed" if ex["dry_run"] else "REAL RUN"
    lines = [
        f"## {ex['patch_name']}: impact report, {mode}",
        "",
        f"Execution `{ex['execution_id']}`",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    if report.get("targets") is not None and not any(report["targets"].values()):
        lines[2:2] = ["**Nothing to do**: no row matches the patch's selection.", ""]
    for table, n in report.get("targets", {}).items():
        lines.append(f"| {table} rows selected | {n:,} |")
    for table, u in report["updates"].items():
        lines.append(f"| {table} rows changed | {u['rows']:,} |")
        for col, s in u["stats"].items():
            lines.append(f"| sum of {col} before | {_fmt(s['sum_before'])} |")
            lines.append(f"| sum of {col} after | {_fmt(s['sum_after'])} |")
            lines.append(f"| min / max change of {col} | {_fmt(s['min_change'])} / {_fmt(s['max_change'])} |")
    for table, i in report["inserts"].items():
        lines.append(f"| {table} rows inserted | {i['rows']:,} |")
    lines.append(f"| rows rejected by validation | {report.get('failed_records', 0):,} |")
    v = report.get("validation")
    if v is not None:
        lines.append(f"| validation | {'passed' if v['passed'] else 'FAILED'} |")
    for table, u in report["updates"].items():
        if not u["sample"]:
            continue
        cols = u["columns"]
        lines += ["", f"### Sample of changed {table} rows", ""]
        lines.append("| id | " + " | ".join(cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for r in u["sample"]:
            cells = [f"{_fmt(r[f'{c}_before'])} → {_fmt(r[f'{c}_after'])}" for c in cols]
            lines.append(f"| {r['id']} | " + " | ".join(cells) + " |")
    for table, i in report["inserts"].items():
        if i["sample"]:
            lines += ["", f"### Sample of {table} rows to insert", ""]
            cols = list(i["sample"][0])
            lines.append("| " + " | ".join(cols) + " |")
            lines.append("|" + "---|" * len(cols))
            for r in i["sample"]:
                lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    for u in report["updates"].values():
        for col, hist in u.get("histograms", {}).items():
            lines += ["", histogram_markdown(hist, title=f"Distribution of {col} changes").rstrip()]
    if v is not None and v["problems"]:
        lines += ["", "### Validation problems", ""] + [f"- {p}" for p in v["problems"]]
        for b in v.get("invariants", []):
            if b["count"] is not None:
                lines += ["", f"#### Rows breaking {b['name']} (first {len(b['sample'])} of "
                          f"{b['count']:,})", "", *_md_table(b["sample"])]
        if v.get("rejects"):
            lines += ["", "#### Rows rejected by the schemas (first "
                      f"{len(v['rejects'])})", "", *_md_table(v["rejects"])]
    for title, sec in report.get("sections", {}).items():
        lines += ["", f"### {title}: {sec['count']:,}"]
        if sec["rows"]:
            lines += ["", *_md_table(sec["rows"][:SECTION_ROWS_MD])]
        if sec["count"] > SECTION_ROWS_MD:
            lines += ["", f"… and {sec['count'] - SECTION_ROWS_MD:,} more (the JSON report "
                      f"keeps the first {min(sec['count'], SECTION_ROWS):,})"]
    return "\n".join(lines) + "\n"


def _md_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    cols = list(rows[0])
    return [
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
        *["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows],
    ]


def _fmt(v: Any) -> str:
    if v is None:
        return "∅"
    if isinstance(v, float):
        return f"{int(v):,}" if v.is_integer() else f"{v:,.2f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v).replace("|", "\\|")


# ---------------------------------------------------------------------------------------------
# Commit
# ---------------------------------------------------------------------------------------------


def _distinct(a: ColumnElement, b: ColumnElement, col) -> ColumnElement:  # type: ignore[no-untyped-def]
    from sqlalchemy import String, cast
    from sqlalchemy.types import JSON as JSONType

    if isinstance(col.type, JSONType):
        return cast(a, String).is_distinct_from(cast(b, String))
    return a.is_distinct_from(b)


def find_conflicts(
    conn: Connection,
    engine: Engine,
    tables: Tables,
    ex: dict[str, Any],
    against: str,
    limit: int | None = None,
) -> dict[str, list[int]]:
    """Rows the application changed since the engine last saw them.

    ``against="backup"`` (commit): a live row to be updated differs in any column from its
    before-image, or is gone. ``against="stage"`` (restore): a live row differs from what the
    patch wrote (declared columns of updated rows, declared columns of inserted rows), or is gone.
    ``ex``: the execution's row (its declaration; after commit, the ids of its inserted rows).
    """
    execution_id, decl = ex["execution_id"], ex["declaration"]
    found: dict[str, list[int]] = {}
    for table in _written_tables(decl):
        live = tables[table]
        st = mirror_table(engine, live, "stage")
        ids: list[int] = []
        if table in decl["updates"]:
            cond = and_(st.c.dp_execution_id == execution_id, st.c.dp_action == UPDATE)
            if against == "backup":
                bk = mirror_table(engine, live, "backup")
                cols = [c.name for c in live.columns if c.name in bk.c]
                differs = or_(
                    live.c.id.is_(None), *[_distinct(live.c[c], bk.c[c], live.c[c]) for c in cols]
                )
                q = (
                    select(st.c.dp_seq)
                    .select_from(st)
                    .join(bk, and_(bk.c.dp_execution_id == st.c.dp_execution_id, bk.c.dp_seq == st.c.dp_seq, bk.c.dp_action == BACKUP))
                    .outerjoin(live, live.c.id == st.c.dp_seq)
                    .where(cond, differs)
                )
            else:
                cols = decl["updates"][table]
                differs = or_(
                    live.c.id.is_(None), *[_distinct(live.c[c], st.c[c], live.c[c]) for c in cols]
                )
                q = select(st.c.dp_seq).select_from(st).outerjoin(
                    live, live.c.id == st.c.dp_seq
                ).where(cond, differs)
            ids += list(conn.execute(q.order_by(st.c.dp_seq).limit(limit)).scalars())
        if table in decl["inserts"] and against == "stage":
            cols = decl["inserts"][table]
            cond = and_(st.c.dp_execution_id == execution_id, st.c.dp_action == INSERT)
            new_id = inserted_id(st, ex, table)
            on = live.c.id == new_id
            span = inserted_id_range(conn, st, ex, table)
            if span is not None:
                on = and_(on, live.c.id.between(*span))  # the inserted rows, not all the table
            differs = or_(
                live.c.id.is_(None), *[_distinct(live.c[c], st.c[c], live.c[c]) for c in cols]
            )
            q = select(new_id).select_from(st).outerjoin(live, on).where(cond, differs)
            ids += list(conn.execute(q.order_by(st.c.dp_seq).limit(limit)).scalars())
        if ids:
            found[table] = ids
    return found


def _lock_rows(conn: Connection, tables: Tables, execution_id: str, decl: dict[str, Any]) -> None:
    """Row locks on the rows to change (PostgreSQL/MySQL); SQLite holds the write lock already."""
    if conn.dialect.name == "sqlite":
        return
    for table in decl["updates"]:
        live = tables[table]
        ids = select(targets.c.row_id).where(
            targets.c.execution_id == execution_id, targets.c.table_name == table
        )
        locking = select(live.c.id).where(live.c.id.in_(ids)).with_for_update()
        if conn.dialect.name == "postgresql":
            # the server locks every row as it reads it and sends back one count, not the ids
            # (sending 1M ids to the client cost ~8 s of the commit at 1M rows)
            conn.execute(select(func.count()).select_from(locking.subquery()))
            continue
        # streamed and dropped a page at a time: every row gets locked, none is kept in memory
        # (fetching 10M ids at once took the commit step to ~1.8 GB)
        locked = conn.execute(
            locking, execution_options={"stream_results": True, "yield_per": 10_000}
        )
        for _ in locked.partitions():
            pass


def _assign_insert_ids(conn: Connection, live, st, execution_id: str) -> int | None:  # type: ignore[no-untyped-def]
    """Hand out the real ids of the staged inserts of ``live`` before inserting them, so the
    inserted rows are known exactly. Ids ascend in ``dp_seq`` order (the order the patch produced
    the rows: an item's chain of log rows reads right when ordered by id).

    Returns the offset when the ids are ``dp_seq + offset`` (one block of ids: the stage is not
    rewritten), or None when they were written to the stage's ``id`` column.
    """
    cond = and_(st.c.dp_execution_id == execution_id, st.c.dp_action == INSERT)
    n, first, last = conn.execute(
        select(func.count(), func.min(st.c.dp_seq), func.max(st.c.dp_seq)).where(cond)
    ).one()
    if not n:
        return None
    span = int(last) - int(first) + 1
    if conn.dialect.name == "postgresql":
        # The table's own sequence, one value per dp_seq of the span. Other sessions may take
        # values meanwhile: if the values drawn are one unbroken block, id = dp_seq + offset;
        # else the k-th smallest value goes to the k-th row by dp_seq, written to the stage.
        seq = func.nextval(func.pg_get_serial_sequence(literal(live.name), literal("id")))
        fresh = select(seq.label("id")).select_from(func.generate_series(1, span)).subquery()
        low, high = conn.execute(select(func.min(fresh.c.id), func.max(fresh.c.id))).one()
        if high - low + 1 == span:
            return int(low) - int(first)
        fresh = select(seq.label("id")).select_from(func.generate_series(1, n)).subquery()
        ranked_ids = select(
            fresh.c.id, func.row_number().over(order_by=fresh.c.id).label("rn")
        ).subquery()
        ranked_rows = (
            select(st.c.dp_seq, func.row_number().over(order_by=st.c.dp_seq).label("rn"))
            .where(cond)
            .subquery()
        )
        pairs = (
            select(ranked_rows.c.dp_seq, ranked_ids.c.id)
            .join_from(ranked_rows, ranked_ids, ranked_rows.c.rn == ranked_ids.c.rn)
            .subquery()
        )
        conn.execute(update(st).where(cond, st.c.dp_seq == pairs.c.dp_seq).values(id=pairs.c.id))
        return None
    # SQLite (writer lock held) and others: the ids after the current maximum.
    base = conn.execute(select(func.coalesce(func.max(live.c.id), 0))).scalar_one()
    if conn.dialect.name == "sqlite":
        has_seq = conn.execute(
            text("SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_sequence'")
        ).scalar_one()
        if has_seq:
            seq_val = conn.execute(
                text("SELECT seq FROM sqlite_sequence WHERE name = :n"), {"n": live.name}
            ).scalar()
            base = max(base, seq_val or 0)
    return int(base) + 1 - int(first)


@contextlib.contextmanager
def _refusal(table: str, action: str) -> Iterator[None]:
    """Turn the database's refusal of a statement into a DatabaseRefused that says why."""
    try:
        yield
    except DBAPIError as exc:
        if isinstance(exc, OperationalError | InterfaceError):
            raise  # connection trouble or a lock timeout, not a verdict on the data
        lines = [ln.strip() for ln in str(exc.orig or exc).splitlines() if ln.strip()]
        reason = " ".join(lines[:2])[:500]
        raise DatabaseRefused(f"{action} {table}: {reason}", {"table": table}) from None


def _apply_staged(
    conn: Connection,
    engine: Engine,
    tables: Tables,
    execution_id: str,
    decl: dict[str, Any],
    trial: bool = False,
    id_offsets: dict[str, int] | None = None,
) -> dict[str, int]:
    """The staged updates and inserts, applied to the live tables on ``conn`` (commit or trial).

    ``id_offsets`` receives, per table, the offset of inserted ids (``inserted_id``)."""
    counts: dict[str, int] = {}
    for table, cols in decl["updates"].items():
        live = tables[table]
        st = mirror_table(engine, live, "stage")
        expected = conn.execute(
            select(func.count()).select_from(st).where(
                st.c.dp_execution_id == execution_id, st.c.dp_action == UPDATE
            )
        ).scalar_one()
        if not expected:
            counts[f"{table}_updated"] = 0
            continue
        with _refusal(table, "update"):
            res = conn.execute(
                update(live)
                .where(
                    live.c.id == st.c.dp_seq,
                    st.c.dp_execution_id == execution_id,
                    st.c.dp_action == UPDATE,
                )
                .values({c: st.c[c] for c in cols})
            )
        if res.rowcount != expected:
            raise PatchError(
                f"commit updated {res.rowcount} {table} rows but {expected} were staged; "
                "rolled back"
            )
        counts[f"{table}_updated"] = expected
    for table, cols in decl["inserts"].items():
        live = tables[table]
        st = mirror_table(engine, live, "stage")
        cond = and_(st.c.dp_execution_id == execution_id, st.c.dp_action == INSERT)
        if trial:
            # ids -dp_seq, computed in the INSERT: the stage itself is never rewritten
            new_id: Any = (-st.c.dp_seq).label("id")
        else:
            offset = _assign_insert_ids(conn, live, st, execution_id)
            new_id = _offset_id(st, offset).label("id")
            if offset is not None and id_offsets is not None:
                id_offsets[table] = offset
        with _refusal(table, "insert into"):
            res = conn.execute(
                insert(live).from_select(
                    ["id", *cols], select(new_id, *[st.c[c] for c in cols]).where(cond)
                ),
                execution_options=ROWCOUNT,
            )
        counts[f"{table}_inserted"] = res.rowcount
    return counts


def commit_execution(engine: Engine, patch_name: str, execution_id: str, log: Any = None) -> dict[str, int]:
    """Apply the staged changes to the live tables in one transaction, refusing on conflicts."""
    log = log or logging.getLogger(__name__)
    with engine.connect() as conn:
        ex = load_execution(conn, execution_id)
    if ex["dry_run"]:
        raise PatchError("refusing to commit a dry run")  # safety rule 1, belt and braces
    if ex["phase"] in ("committed", "verified"):
        log.info(f"execution {execution_id} already committed")
        return ex["report"].get("committed", {})
    if ex["phase"] != "validated" or not (ex["report"] or {}).get("validation", {}).get("passed"):
        raise PatchError(f"execution {execution_id} has not passed validation; not committing")
    decl = ex["declaration"]
    tables = state.reflect_tables(engine, decl["tables"])
    with write_transaction(engine) as conn:
        _lock_rows(conn, tables, execution_id, decl)
        conflicts = find_conflicts(conn, engine, tables, ex, "backup", limit=1000)
        if conflicts:
            desc = "; ".join(
                f"{t}: {len(ids)}{'+' if len(ids) >= 1000 else ''} row(s), ids {ids[:20]}"
                for t, ids in conflicts.items()
            )
            raise CommitConflict(
                "the application changed rows after the backup; nothing was committed "
                f"(re-run the patch to plan again): {desc}",
                {"conflicts": conflicts},
            )
        offsets: dict[str, int] = {}
        counts = _apply_staged(conn, engine, tables, execution_id, decl, id_offsets=offsets)
        report = dict(ex["report"] or {})
        report["committed"] = counts
        report["insert_id_offsets"] = offsets
        set_execution(conn, execution_id, phase="committed", report=report, heartbeat_at=utcnow())
    log.info("committed: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    return counts


# ---------------------------------------------------------------------------------------------
# Verify
# ---------------------------------------------------------------------------------------------


def verify_execution(
    engine: Engine,
    patch: Patch,
    execution_id: str,
    timeout_s: float | None = None,
    connections: int = 1,
) -> list[str]:
    """Post-execution checks on live data. Returns the problems (empty = verified).

    Up to ``connections`` of its queries run at once, each on its own connection."""
    with engine.connect() as conn:
        ex = load_execution(conn, execution_id)
    tables = state.reflect_tables(engine, ex["declaration"]["tables"])

    def live_differs() -> dict[str, list[int]]:
        with engine.connect() as conn:
            return find_conflicts(conn, engine, tables, ex, "stage", limit=20)

    checks = invariant_checks(engine, patch, execution_id, committed=True, timeout_s=timeout_s)
    mismatched, *broken = run_concurrently([live_differs, *checks], connections)
    problems = [
        f"{table}: live rows differ from what was committed, e.g. ids {ids}"
        for table, ids in mismatched.items()
    ]
    return problems + [invariant_problem(b, after_commit=True) for b in broken if b is not None]


# ---------------------------------------------------------------------------------------------
# Restore (undo) from backup
# ---------------------------------------------------------------------------------------------


@dataclass
class RestorePlan:
    updated: dict[str, int]
    deleted: dict[str, int]
    conflicts: dict[str, list[int]]
    skipped_sources: int


def restore_rows(
    conn: Connection,
    engine: Engine,
    execution_id: str,
    skip_conflicts: bool,
    apply: bool,
) -> RestorePlan:
    """Put back the before-images of a committed execution; delete the rows it inserted.

    Rows the application changed after the patch are conflicts: with ``skip_conflicts`` every
    change of a conflicting source row is left as it is (and reported); otherwise the restore
    refuses. With ``apply=False`` only counts what would be restored.
    """
    ex = load_execution(conn, execution_id)
    decl = ex["declaration"]
    tables = state.reflect_tables(engine, decl["tables"])
    if apply:
        _lock_rows(conn, tables, execution_id, decl)
    conflicts = find_conflicts(conn, engine, tables, ex, "stage")
    if conflicts and not skip_conflicts:
        desc = "; ".join(f"{t}: ids {ids[:20]}" for t, ids in conflicts.items())
        raise RestoreRefused(
            f"the application changed {sum(map(len, conflicts.values()))} row(s) after the patch; "
            f"restore refused (use skip_conflicts to restore the rest): {desc}",
            {"conflicts": conflicts},
        )
    # Conflicting rows → their source rows; every change of such a source is left alone.
    bad_sources: set[int] = set()
    for table, ids in conflicts.items():
        st = mirror_table(engine, tables[table], "stage")
        for chunk in _chunks(ids, 1000):
            # A live id is dp_seq of an updated row but id of an inserted one (a table can be
            # both updated and inserted into: match each action on its own key).
            bad_sources.update(
                s
                for s in conn.execute(
                    select(st.c.dp_source_id).where(
                        st.c.dp_execution_id == execution_id,
                        or_(
                            and_(st.c.dp_action == UPDATE, st.c.dp_seq.in_(chunk)),
                            and_(st.c.dp_action == INSERT, inserted_id(st, ex, table).in_(chunk)),
                        ),
                    )
                ).scalars()
                if s is not None
            )
    keep_out = list(bad_sources)
    updated: dict[str, int] = {}
    deleted: dict[str, int] = {}
    for table, cols in decl["updates"].items():
        live = tables[table]
        st, bk = mirror_table(engine, live, "stage"), mirror_table(engine, live, "backup")
        cond = [bk.c.dp_execution_id == execution_id, bk.c.dp_action == BACKUP, live.c.id == bk.c.dp_seq]
        to_restore = select(st.c.dp_seq).where(
            st.c.dp_execution_id == execution_id,
            st.c.dp_action == UPDATE,
            *([not_(st.c.dp_source_id.in_(keep_out))] if keep_out else []),
        )
        if apply:
            res = conn.execute(
                update(live)
                .where(*cond, bk.c.dp_seq.in_(to_restore))
                .values({c: bk.c[c] for c in cols})
            )
            updated[table] = res.rowcount
        else:
            updated[table] = conn.execute(
                select(func.count()).select_from(to_restore.subquery())
            ).scalar_one()
    for table in reversed(list(decl["inserts"])):  # children before the parents they point to
        live = tables[table]
        st = mirror_table(engine, live, "stage")
        to_delete = select(inserted_id(st, ex, table)).where(
            st.c.dp_execution_id == execution_id,
            st.c.dp_action == INSERT,
            *([not_(st.c.dp_source_id.in_(keep_out))] if keep_out else []),
        )
        if apply:
            deleted[table] = conn.execute(delete(live).where(live.c.id.in_(to_delete))).rowcount
        else:
            deleted[table] = conn.execute(
                select(func.count()).select_from(to_delete.subquery())
            ).scalar_one()
    return RestorePlan(updated, deleted, conflicts, len(bad_sources))


def _chunks(seq: list[int], n: int) -> Iterable[list[int]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


# Helpers kept here so callers need not import SQLAlchemy for the simple cases.
__all__ = [
    "BACKUP",
    "CommitConflict",
    "PatchError",
    "PlanRefused",
    "ResultView",
    "RestoreRefused",
    "VerificationFailed",
    "build_report",
    "commit_execution",
    "finish_execution",
    "invariant_checks",
    "load_execution",
    "plan_execution",
    "render_markdown",
    "restore_rows",
    "run_concurrently",
    "run_transform",
    "take_backup",
    "validate_execution",
    "verify_execution",
]
