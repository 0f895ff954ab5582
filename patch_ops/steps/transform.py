"""Transform: keyset batches over the frozen target set into the stage tables.

Each batch is read from the backup, handed to the patch's pure ``transform``, validated with its
pandera schemas (a failing source row is rejected with every change it causes) and staged with
its progress in one transaction, so a crashed run resumes at the next batch. The memory guard
sizes the batches; the maintenance window's end pauses the step at a batch boundary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pandas as pd
import pandera.errors as pa_errors
from sqlalchemy import (
    Float,
    Integer,
    Numeric,
    Text,
    cast,
    delete,
    insert,
    or_,
    select,
    type_coerce,
    update,
)
from sqlalchemy.engine import Connection, Engine

from patch_ops import state
from patch_ops.database import write_transaction
from patch_ops.dialects import dialect_of
from patch_ops.execution import (
    PAUSED_PHASE,
    PatchError,
    config_of,
    fetch_rows,
    load_execution,
    run_context,
    set_execution,
    step_counts,
    utcnow,
)
from patch_ops.failpoints import failpoint
from patch_ops.patch import Changes, Patch
from patch_ops.state import BACKUP, INSERT, UPDATE, executions, locks, mirror_table
from patch_ops.windows import now_naive as clock_now
from resources.memory import MemoryGuard

MAX_REJECTS_STORED = 1000
#: The transform logs its progress line (one Dagster event each) at most this often, and for the
#: first and last batch; the executions row gets every batch's progress regardless.
PROGRESS_LOG_SECONDS = 5.0


def _fractional(col) -> bool:  # type: ignore[no-untyped-def]
    return isinstance(col.type, Numeric) and not isinstance(col.type, Integer)


def read_columns(mirror, live, columns: list[str]) -> list[Any]:  # type: ignore[no-untyped-def]
    """A mirror's columns for a batch read: decimals come as floats from the database (the
    frames hold them as float64 anyway), not as one Decimal object per value."""
    return [
        cast(mirror.c[c], Float).label(c) if _fractional(live.c[c]) else mirror.c[c]
        for c in columns
    ]


def unreadable_sources(
    conn: Connection, patch: Patch, backups: dict[str, Any], tables: Any, execution_id: str,
    lo: int, hi: int,
) -> list[dict[str, Any]]:
    """Reject rows for the batch's source rows (driving ids ``lo``..``hi``) whose numeric
    columns hold something that is not a number (SQLite stores any value in any column): the
    patch cannot read such a row, so it is rejected with its reason instead of being read as 0
    or NaN and silently skipped or mis-changed, whatever the patch does with it."""
    dialect = dialect_of(conn)
    found: list[dict[str, Any]] = []
    for name, key in [(patch.driving_table, "id"), *patch.related.items()]:
        b = backups[name]
        tests = {
            c.name: test for c in tables[name].columns
            if isinstance(c.type, Numeric | Integer)
            and (test := dialect.not_a_number(b.c[c.name])) is not None
        }
        if not tests:
            continue
        # the driving table's dp_seq is its id: the primary key's range, as the batch read
        ranged = b.c.dp_seq if name == patch.driving_table else b.c[key]
        rows = conn.execute(
            select(b.c[key].label("src"),
                   *[type_coerce(b.c[c], Text).label(f"value_{c}") for c in tests],
                   *[t.label(f"bad_{c}") for c, t in tests.items()])
            .where(b.c.dp_execution_id == execution_id, ranged.between(lo, hi),
                   or_(*tests.values()))
        ).mappings().all()
        found += [
            {"execution_id": execution_id, "source_id": int(r["src"]), "table_name": name,
             "column_name": c, "check_name": "a number (the column's type)",
             "failure_case": str(r[f"value_{c}"])}
            for r in rows for c in tests if r[f"bad_{c}"]
        ]
    return found


def without_sources(
    patch: Patch, frames: dict[str, pd.DataFrame], bad: set[int]
) -> dict[str, pd.DataFrame]:
    """The batch's frames without the rows of the ``bad`` source rows."""
    keys = {patch.driving_table: "id", **patch.related}
    return {t: df[~df[keys[t]].isin(bad)] for t, df in frames.items()}


def _frame(rows: Sequence[Any], columns: list[str], table) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    df = pd.DataFrame.from_records(rows, columns=columns)
    for col in table.columns:
        if col.name in df.columns and _fractional(col) and df[col.name].dtype != "float64":
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
) -> dict[str, int]:
    """Transform the frozen target set in keyset batches into the stage tables;
    ``on_progress(done, total, eta_seconds)`` after each batch (the run's progress tag).

    Each batch commits its staged rows together with the cursor, so a crashed run resumes at the
    next batch. Rows whose changes fail the patch's pandera schemas are rejected (recorded with
    the reason) together with every other change of the same source row.
    """
    log = log or logging.getLogger(__name__)
    with write_transaction(engine) as conn:
        ex = load_execution(conn, execution_id)
    if ex["phase"] not in ("backed_up", "transforming"):
        log.info(f"transform already done for {execution_id} (phase {ex['phase']})")
        return step_counts(ex)
    config = config_of(patch, ex)
    ctx = run_context(ex)
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
                        *read_columns(
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
                        select(*read_columns(b, tables[rel], live_cols[rel]))
                        .where(b.c.dp_execution_id == execution_id, b.c[fk].between(lo, hi))
                        .order_by(b.c.dp_seq),
                    )
                    frames[rel] = _frame(rel_rows, live_cols[rel], tables[rel])
                unreadable = unreadable_sources(
                    conn, patch, backups, tables, execution_id, lo, hi
                )
            if unreadable:
                frames = without_sources(patch, frames, {r["source_id"] for r in unreadable})
            changes = patch.transform(frames, config, ctx)
            accepted, reject_rows = _validate_batch(patch, frames, changes)
            reject_rows += unreadable
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
            elapsed = now_s - started
            rate = (done - done_at_start) / elapsed if elapsed > 0 else 0.0
            eta = (total - done) / rate if rate > 0 else float("nan")
            if on_progress is not None:
                on_progress(done, total, eta)
            failpoint(f"transform:batch:{batch_no}")
            if now_s - logged_at < PROGRESS_LOG_SECONDS and done < total:
                continue
            logged_at = now_s
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
        return {**step_counts(ex), "paused": 1}
    with write_transaction(engine) as conn:
        set_execution(conn, execution_id, phase="transformed", peak_rss_mb=budget.peak_rss_mb)
        ex = load_execution(conn, execution_id)
    state.analyze(engine, list(stages.values()))
    return step_counts(ex)


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

