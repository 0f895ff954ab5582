"""Executions as earlier versions stored them (``data_patch_executions.storage``): NULL, the
frozen ids in the shared ``data_patch_targets`` and the work rows in the shared mirrors; 1
(``OWN_TARGETS``), the target sets in tables of their own and the work rows in the shared
mirrors. ``as_stored_by`` moves an execution this version made to where such a version kept
it, rows and all, so a test can run this version on it."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import insert, literal, select, update
from sqlalchemy.engine import Engine

from patch_ops import state
from patch_ops.execution import load_execution
from patch_ops.state import executions, targets
from patch_ops.steps.purge import purge_backups
from patch_ops.target_sets import OWN_TARGETS, existing_tables, own_table_name, target_table_name
from patch_ops.work_rows import OWN_KINDS, existing_rows, forget_storage, kind_of


def as_stored_by(engine: Engine, execution_id: str, storage: int | None) -> None:
    """Move execution ``execution_id``'s work rows to the shared mirrors and, for ``storage``
    NULL, its frozen ids to the shared table; record ``storage``; drop the tables it left."""
    assert storage in (None, OWN_TARGETS)
    with engine.connect() as conn:
        decl = load_execution(conn, execution_id)["declaration"]
    tables = decl["tables"]
    live = state.reflect_tables(engine, tables)
    mirrors = {(t, a): state.mirror_table(engine, live[t], kind_of(a))  # DDL: before the move
               for t in tables for a in OWN_KINDS}
    with engine.begin() as conn:
        for table in tables:
            for action in OWN_KINDS:
                own = existing_rows(conn, table, execution_id, action)
                if own is None:
                    continue
                mirror = mirrors[(table, action)]
                cols = [c.name for c in own.table.columns]
                conn.execute(insert(mirror).from_select(
                    [*cols, "dp_execution_id", "dp_action"],
                    select(*own.table.c, literal(execution_id, mirror.c.dp_execution_id.type),
                           literal(action)),
                ))
        if storage is None:
            for t in existing_tables(conn, execution_id, tables):
                table = next(n for n in tables if target_table_name(execution_id, n) == t.name)
                conn.execute(insert(targets).from_select(
                    ["execution_id", "table_name", "row_id"],
                    select(literal(execution_id, targets.c.execution_id.type), literal(table),
                           t.c.row_id),
                ))
        conn.execute(update(executions).where(executions.c.execution_id == execution_id)
                     .values(storage=storage))
    forget_storage()
    names = [own_table_name(kind, execution_id, t) for t in tables for kind in OWN_KINDS.values()]
    if storage is None:
        names += [target_table_name(execution_id, t) for t in tables]
    for name in names:
        state.drop_work_table(engine, name)


def purge_as_expired(engine: Engine, *execution_ids: str) -> None:
    """Date executions 100 days back and run the purge (90 days' retention): their work rows,
    target sets and tables of their own go."""
    long_ago = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(days=100)
    with engine.begin() as conn:
        conn.execute(update(executions).where(executions.c.execution_id.in_(execution_ids))
                     .values(started_at=long_ago, completed_at=long_ago))
    purge_backups(engine, 90, dry_run=False)
