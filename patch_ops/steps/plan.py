"""Plan: validate the config, lock the tables, freeze the target set, open the execution.

A plan refuses early (unknown table or column, bad config, an in-database transform asked of a
patch that cannot take it, a plan check: window, approval, audit key) before any write to StockRx
tables, recorded in the history. A re-executed Dagster run or a paused execution (stopped at its
window's end) is taken over instead of planned anew.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Sequence
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Column, Select, Table, insert, select
from sqlalchemy.engine import Engine

from patch_ops import state
from patch_ops.database import check_connection, write_transaction
from patch_ops.execution import (
    CANCELLED,
    PAUSED_PHASE,
    ROWCOUNT,
    PlanCheck,
    PlanInfo,
    PlanRefused,
    RunFinished,
    declaration_of,
    default_user,
    describe,
    estimate_seconds,
    finish_execution,
    new_execution_id,
    set_execution,
    utcnow,
)
from patch_ops.patch import (
    SQL_PATH,
    Patch,
    PatchConfigError,
    PatchRunConfig,
    PatchSettings,
    RunContext,
    Tables,
)
from patch_ops.sql_checks import sql_path_problem
from patch_ops.state import executions
from patch_ops.steps.locks import ABANDONED, acquire_locks
from patch_ops.target_sets import create_target_tables
from patch_ops.work_rows import OWN_WORK_ROWS, create_work_tables


def check_columns(tables: Tables, patch: Patch) -> None:
    for table, cols in patch.required_columns().items():
        missing = sorted(set(cols) - set(tables[table].c.keys()))
        if missing:
            raise PlanRefused(
                f"column(s) missing in table {table!r}: {', '.join(missing)} "
                f"(patch {patch.name} needs them)"
            )


def frozen_ids(sel: Select[Any]) -> Select[Any]:
    """The target ids of ``sel`` (a patch's id select), in id order: they then go into their
    table's key one after the other, at its right end. Distinct, by a DISTINCT pass unless
    ``sel`` reads a table's own one-column primary key from that table alone (no join: its ids
    are distinct already)."""
    ids = sel.subquery()
    id_col = list(ids.c)[0]
    rows = select(id_col)
    return (rows if reads_primary_key(sel) else rows.distinct()).order_by(id_col)


def reads_primary_key(sel: Select[Any]) -> bool:
    """Whether ``sel`` selects one column that is the whole primary key of the one table it
    reads, from that table alone (whatever its WHERE, GROUP BY or LIMIT, each id comes once)."""
    if not isinstance(sel, Select) or len(sel.selected_columns) != 1:
        return False
    froms = sel.get_final_froms()
    col = sel.selected_columns[0]
    return (
        len(froms) == 1 and isinstance(froms[0], Table) and isinstance(col, Column)
        and col.table is froms[0] and list(froms[0].primary_key.columns) == [col]
    )


def refuse_impossible_path(patch: Patch, config: PatchRunConfig) -> None:
    """A run that asks for the in-database transform (``transform_path: sql``) of a patch that
    cannot take it (no SQL change, or a check with no SQL form) is refused at plan, naming why,
    not at transform after the backup. Unasked, the transform chooses (and says why)."""
    if config.transform_path != SQL_PATH:
        return
    problem = sql_path_problem(patch)
    if problem is not None:
        raise PlanRefused(
            f"patch {patch.name} cannot take the in-database path (transform_path: sql): "
            f"{problem}; leave transform_path unset to run it in Python"
        )


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
    ``after_freeze`` (in the freezing transaction, target set frozen (``target_sets``), execution row
    filled in: target_count, estimated_seconds); raising PlanRefused there refuses the run before
    any write to StockRx tables, recorded in history.

    A paused execution (stopped at the end of a maintenance window) is continued instead of
    planning a new one when ``config.resume_execution_id`` names it or its config is the same
    (``RESUME_IGNORED_CONFIG`` aside): ``checks`` are then called once with stage ``resume`` (in
    the transaction that takes it over); a refusal leaves it paused.
    """
    log = log or logging.getLogger(__name__)
    problem = config.value_problem()
    if problem:  # before anything is written, the history included
        raise PatchConfigError(problem)
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
            if existing is not None and existing.phase not in ("planning", ABANDONED):
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

    execution_id = new_execution_id()
    run_at = utcnow().replace(microsecond=0)
    business_date = patch.business_date(config, dt.datetime.now(ZoneInfo(patch.timezone)).date())
    cfg = config.model_dump()
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
                launched_by=config.launched_by or default_user(),
                config=cfg,
                declaration=declaration_of(patch),
                run_at=run_at,
                business_date=business_date.isoformat(),
                batch_size=batch_size,
                memory_limit_mb=memory_limit,
                heartbeat_at=utcnow(),
                storage=OWN_WORK_ROWS,
            )
        )
    try:
        if batch_size <= 0:
            raise PatchConfigError(f"batch_size must be positive, got {batch_size}")
        if memory_limit <= 0:
            raise PatchConfigError(f"memory_limit_mb must be positive, got {memory_limit}")
        patch.check_config(config)
        refuse_impossible_path(patch, config)
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
        work_tables = create_work_tables(engine, tables, execution_id, declaration_of(patch))
        frozen = create_target_tables(engine, execution_id, patch.tables())
        with write_transaction(engine) as conn:
            acquire_locks(conn, patch.tables(), execution_id, dagster_run_id, run_finished, log)
            counts = {}
            for table, sel in selects.items():
                counts[table] = conn.execute(
                    insert(frozen[table]).from_select(["row_id"], frozen_ids(sel)),
                    execution_options=ROWCOUNT,
                ).rowcount
            target_count = counts[patch.driving_table]
            set_execution(
                conn,
                execution_id,
                phase="planned",
                target_count=target_count,
                estimated_seconds=estimate_seconds(conn, patch.name, target_count),
                report={"targets": counts, "work_tables": work_tables},
            )
            for check in checks:
                check("after_freeze", conn, info)
    except Exception as exc:
        # A refusal may leave its findings in the history (drift since approval: the rows)
        found = (getattr(exc, "details", None) or {}).get("report")
        extra: dict[str, Any] = {"report": found} if isinstance(found, dict) else {}
        finish_execution(engine, execution_id, "failed", error=describe(exc), **extra)
        exc.execution_id = execution_id  # type: ignore[attr-defined]
        raise
    # Fresh statistics for the backup's and the transform's joins on the frozen ids (stale, the
    # planner takes them for a handful: a nested loop over every target, twice as slow)
    state.analyze(engine, [frozen[t] for t in selects])
    log.info(
        f"planned execution {execution_id} of {patch.name} "
        f"({'DRY RUN' if config.dry_run else 'REAL RUN'}): "
        + ", ".join(f"{n:,} {t}" for t, n in counts.items())
    )
    return execution_id


#: Config fields that say how, when or by whom a run goes, not what it writes: a new run whose
#: config differs from a paused execution's only in these continues it.
RESUME_IGNORED_CONFIG = (
    "launched_by", "allow_outside_window", "resume_execution_id", "allow_repeat", "release"
)


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
    """Take over a paused execution of the patch for this run, or None if there is none to. A
    cancelled one (its run stopped on request, patch_ops.stopping) is continued the same way,
    unless it was stopped while planning (nothing frozen to continue)."""
    wanted = getattr(config, "resume_execution_id", None)
    resumable = ("paused", CANCELLED)
    mine = work_config(config.model_dump())
    with write_transaction(engine) as conn:
        q = select(executions).where(
            executions.c.patch_name == patch.name, executions.c.kind == "patch"
        )
        if wanted:
            row = conn.execute(q.where(executions.c.execution_id == wanted)).mappings().first()
            if row is None:
                raise PlanRefused(f"no execution {wanted} of patch {patch.name} to resume")
            if row["status"] not in resumable or row["phase"] in ("planning", ABANDONED):
                raise PlanRefused(
                    f"execution {wanted} is {row['status']} (phase {row['phase']}), not paused "
                    "or cancelled: nothing to resume"
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
                q.where(executions.c.status.in_(resumable),
                        executions.c.phase.not_in(["planning", ABANDONED]))
                .order_by(executions.c.started_at)
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
        f"resuming {row['status']} execution {execution_id} of {patch.name} at id > {row['cursor']} "
        f"({int(row['processed_records']):,}/{int(row['target_count']):,} rows done, "
        f"{int(row['batches_done'])} batches kept; paused {paused_for:,.0f} s)"
    )
    return execution_id

