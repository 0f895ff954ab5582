"""Transform: keyset batches over the frozen target set into the stage tables.

Each batch is read from the backup, handed to the patch's pure ``transform``, validated with its
pandera schemas (a failing source row is rejected with every change it causes) and staged with
its progress in one transaction, so a crashed run resumes at the next batch. Batches are sized by
duration, bounded by the memory guard; the maintenance window's end pauses the step at a batch
boundary. That is the Python path; ``run_transform`` sends a patch that declares its change in
SQL to the in-database path (patch_ops.steps.transform_sql) unless the run says
``transform_path: python``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection, Engine

from patch_ops import state
from patch_ops.database import write_transaction
from patch_ops.dialects import dialect_of
from patch_ops.execution import (
    PatchError,
    config_of,
    fetch_rows,
    load_execution,
    run_context,
    set_execution,
    step_counts,
    utcnow,
)
from patch_ops.patch import PYTHON_PATH, SQL_PATH, Changes, Patch, PatchRunConfig
from patch_ops.sql_checks import sql_path_problem
from patch_ops.state import BACKUP, INSERT, UPDATE, executions
from patch_ops.steps.batching import (
    MAX_REJECTS_STORED,
    BatchSizer,
    Progress,
    fractional,
    pause_execution,
    read_columns,
    stage_rows,
    unreadable_sources,
    window_stop,
)
from patch_ops.steps.transform_sql import run_sql_transform
from patch_ops.work_rows import Stages, distinct_tables, work_rows
from resources.memory import MemoryGuard

if TYPE_CHECKING:  # pandas is for the op processes: loading the code location skips it
    import pandas as pd

__all__ = ["bulk_insert", "read_columns", "run_transform", "transform_path"]

#: Target seconds per batch when neither the run config nor the caller says.
DEFAULT_BATCH_SECONDS = 2.0


def transform_path(patch: Patch, config: PatchRunConfig, log: Any = None) -> str:
    """The path this run's transform takes: the config's ``transform_path``, else in the
    database when the patch declares its change in SQL and every check compiles, else Python.
    Asked for the database but impossible: PatchError naming why (e.g. the check)."""
    if config.transform_path == PYTHON_PATH:
        return PYTHON_PATH
    problem = sql_path_problem(patch)
    if problem is None:
        return SQL_PATH
    if config.transform_path == SQL_PATH:
        raise PatchError(f"patch {patch.name} cannot take the in-database path: {problem}")
    if log is not None:
        log.info(f"transform in Python: {problem}")
    return PYTHON_PATH


def without_sources(
    patch: Patch, frames: dict[str, pd.DataFrame], bad: set[int]
) -> dict[str, pd.DataFrame]:
    """The batch's frames without the rows of the ``bad`` source rows."""
    keys = {patch.driving_table: "id", **patch.related}
    return {t: df[~df[keys[t]].isin(bad)] for t, df in frames.items()}


def _frame(rows: Sequence[Any], columns: list[str], table) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    import pandas as pd  # op processes only (the fork server preloads it)

    df = pd.DataFrame.from_records(rows, columns=columns)
    for col in table.columns:
        if col.name in df.columns and fractional(col) and df[col.name].dtype != "float64":
            df[col.name] = pd.to_numeric(df[col.name], errors="coerce").astype("float64")
    return df


def bulk_insert(conn: Connection, table: Any, df: pd.DataFrame) -> None:
    """Insert a frame's rows in the connection's transaction, the fastest way the database
    offers (``DatabaseDialect.bulk_insert``: COPY on PostgreSQL). Values travel as data, never as
    SQL text; column names are checked against the table's (reflected) columns first."""
    if df.empty:
        return
    unknown = [c for c in map(str, df.columns) if c not in table.c]
    if unknown:
        raise PatchError(f"{table.name} has no columns {unknown}")
    dialect_of(conn).bulk_insert(conn, table, df)


def run_transform(
    engine: Engine,
    patch: Patch,
    execution_id: str,
    memory: MemoryGuard,
    log: Any = None,
    on_progress: Callable[[int, int, float], None] | None = None,
    batch_seconds: float | None = None,
    connections: int = 1,
) -> dict[str, int]:
    """Transform the frozen target set in keyset batches into the stage tables;
    ``on_progress(done, total, eta_seconds)`` after each batch (the run's progress tag).

    Each batch commits its staged rows together with the cursor, so a crashed run resumes at the
    next batch. Rows whose changes fail the patch's pandera schemas are rejected (recorded with
    the reason) together with every other change of the same source row. In the database
    (patch_ops.steps.transform_sql) where the patch allows it, else in pandas batches; batches
    sized to take ``batch_seconds`` (the run config's, else this, else 2 s) unless the run config
    fixes batch_size or this is 0 (the patch's setting: every batch at its batch_size).
    In the database, up to ``connections`` staging statements of a batch run at once.
    """
    log = log or logging.getLogger(__name__)
    with write_transaction(engine) as conn:
        ex = load_execution(conn, execution_id)
    if ex["phase"] not in ("backed_up", "transforming"):
        log.info(f"transform already done for {execution_id} (phase {ex['phase']})")
        return step_counts(ex)
    config = config_of(patch, ex)
    ctx = run_context(ex)
    sizer = BatchSizer(
        int(ex["batch_size"]),
        config.batch_seconds or batch_seconds or DEFAULT_BATCH_SECONDS,
        # the run config's batch_size, or the patch's batch_seconds: 0, fixes the size
        fixed=config.batch_size is not None or (not config.batch_seconds and batch_seconds == 0),
    )
    if transform_path(patch, config, log) == SQL_PATH:
        return run_sql_transform(engine, patch, ex, sizer, memory, log, on_progress,
                                 connections)
    tables = state.reflect_tables(engine, patch.tables())
    backups = {t: work_rows(engine, tables[t], execution_id, BACKUP) for t in patch.tables()}
    stages = stage_rows(engine, tables, patch, execution_id)
    driving = backups[patch.driving_table]
    live_cols = {t: [c.name for c in tables[t].columns] for t in patch.tables()}

    cursor = ex["cursor"] if ex["cursor"] is not None else -(2**62)
    done = int(ex["processed_records"])
    staged_inserts = int(ex["staged_inserts"])
    batch_no = int(ex["batches_done"])
    total = int(ex["target_count"])
    progress_of = Progress(done, total, sizer, on_progress)
    deadline_at = ex.get("deadline_at")
    paused = False
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
            batch_started = time.monotonic()
            budget.batch_size = sizer.size
            size = budget.next_batch_size(batch_no)
            if size < sizer.size:
                sizer.cap(size)  # the memory guard bounds the duration-sized batches
            with engine.connect() as conn:
                rows = fetch_rows(
                    conn,
                    select(
                        *read_columns(
                            driving, tables[patch.driving_table], live_cols[patch.driving_table]
                        )
                    )
                    .where(
                        # the whole primary key prefix (dp_action too): an index range scan
                        # from the cursor, not a walk from the execution's first row each batch
                        driving.mine,
                        driving.seq > cursor,
                    )
                    .order_by(driving.seq)
                    .limit(size),
                )
                if not rows:
                    break
                if window_stop(ex, done, total):
                    paused = True
                    break
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
                        select(*read_columns(b, tables[rel], live_cols[rel]))
                        .where(b.mine, b.c[fk].between(lo, hi))
                        .order_by(b.seq),
                    )
                    frames[rel] = _frame(rel_rows, live_cols[rel], tables[rel])
                unreadable = unreadable_sources(conn, patch, backups, tables, lo, hi)
            if unreadable:
                frames = without_sources(patch, frames, {r["source_id"] for r in unreadable})
            changes = patch.transform(frames, config, ctx)
            accepted, reject_rows = _validate_batch(patch, frames, changes)
            reject_rows += unreadable
            staged, n_upd, n_ins = _stage_rows(patch, accepted, stages, staged_inserts)
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
            if not progress_of.after_batch(len(rows), batch_started, done, batch_no):
                continue
            log.info(
                f"batch {batch_no}: {done:,}/{total:,} rows ({done / max(total, 1):.0%}), "
                f"batch size {size}, {progress_of.rate:,.0f} rows/s, ETA {progress_of.eta:,.1f}s, "
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
        return {**step_counts(ex), "paused": 1}
    with write_transaction(engine) as conn:
        set_execution(conn, execution_id, phase="transformed", peak_rss_mb=budget.peak_rss_mb)
        ex = load_execution(conn, execution_id)
    state.analyze(engine, distinct_tables(stages.values()))
    return step_counts(ex)


def _stage_rows(
    patch: Patch,
    accepted: Changes,
    stages: Stages,
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
            rows = stages[(UPDATE, table)]
            upd = upd.assign(**rows.values(), dp_seq=upd["id"])
            staged.append((rows.table, upd))
            if table == patch.driving_table:
                n_upd += len(upd)
    for table, df in accepted.inserts.items():
        if not df.empty:
            ins = df[["source_id", *patch.inserts[table]]]
            ins = ins.rename(columns={"source_id": "dp_source_id"})
            first = staged_inserts + n_ins + 1
            seq = range(first, first + len(ins))
            rows = stages[(INSERT, table)]
            ins = ins.assign(**rows.values(), dp_seq=seq)
            n_ins += len(ins)
            staged.append((rows.table, ins))
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


def _validate_batch(
    patch: Patch, frames: dict[str, pd.DataFrame], changes: Changes
) -> tuple[Changes, list[dict[str, Any]]]:
    """Check a batch's changes with the patch's schemas; drop every change of a bad source."""
    import pandas as pd  # op processes only (the fork server preloads them)
    import pandera.errors as pa_errors

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

