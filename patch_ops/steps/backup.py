"""Backup: the before-image (every column) of every row an execution may touch, set-based
(``INSERT INTO backup SELECT ...``), kept for the retention period so a commit can be undone."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Integer, literal, select
from sqlalchemy.engine import Connection, Engine

from patch_ops import state
from patch_ops.database import write_transaction
from patch_ops.execution import ROWCOUNT, load_execution, set_execution, utcnow
from patch_ops.state import BACKUP
from patch_ops.target_sets import target_ids
from patch_ops.work_rows import work_rows


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
    with engine.connect() as conn:
        targeted = _targeted_tables(conn, execution_id, decl["tables"])
    backups = {table: work_rows(engine, tables[table], execution_id, BACKUP) for table in targeted}
    for table, backup in backups.items():
        fk = decl.get("related", {}).get(table)
        if fk:  # the transform reads these rows by fk range, one batch of driving ids at a time
            # made before the backup transaction, never in it (DDL commits it on MySQL)
            state.ensure_mirror_index(engine, backup.table, fk)
    counts: dict[str, int] = {}
    with write_transaction(engine) as conn:
        for table, backup in backups.items():
            live = tables[table]
            conn.execute(backup.delete())
            ids = target_ids(conn, execution_id, table)
            cols = [c.name for c in live.columns]
            counts[table] = conn.execute(
                backup.fill(
                    live.c.id,
                    ["dp_source_id", *cols],
                    select(literal(None, type_=Integer), *[live.c[c] for c in cols])
                    .where(live.c.id.in_(ids)),
                ),
                execution_options=ROWCOUNT,
            ).rowcount
        report = dict(ex["report"] or {})
        report["backup"] = counts
        set_execution(conn, execution_id, phase="backed_up", report=report, heartbeat_at=utcnow())
    state.analyze(engine, [b.table for b in backups.values()])  # the targets' at plan, after the freeze
    log.info("backup taken: " + ", ".join(f"{n:,} {t}" for t, n in counts.items()))
    return counts


def _targeted_tables(conn: Connection, execution_id: str, tables: list[str]) -> list[str]:
    """The declared tables with at least one frozen target, by name: one index probe each
    (a DISTINCT over the execution's target rows read all of them)."""
    return [
        table
        for table in sorted(set(tables))
        if conn.execute(
            target_ids(conn, execution_id, table).limit(1)
        ).first() is not None
    ]
