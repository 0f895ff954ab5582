"""Writing staged changes to live tables, shared by the trial apply (validation), the commit and
the restore: row locks, the conflict check against the before-image or what was written, the
live ids of inserted rows, and the database's refusals turned into a message that says why."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ColumnElement

from patch_ops.dialects import StagedInserts, dialect_of
from patch_ops.dialects.functions import values_differ
from patch_ops.execution import (
    ROWCOUNT,
    CommitConflict,
    DatabaseRefused,
    PatchError,
    inserted_id,
    inserted_id_range,
    written_tables,
)
from patch_ops.patch import Tables
from patch_ops.state import BACKUP, INSERT, UPDATE
from patch_ops.target_sets import target_ids
from patch_ops.work_rows import WorkRows, work_rows


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
    for table in written_tables(decl):
        live = tables[table]
        ids: list[int] = []
        if table in decl["updates"]:
            st = work_rows(engine, live, execution_id, UPDATE)
            if against == "backup":
                bk = work_rows(engine, live, execution_id, BACKUP)
                cols = [c.name for c in live.columns if c.name in bk.c]
                differs = or_(
                    live.c.id.is_(None), *[values_differ(live.c[c], bk.c[c], live.c[c]) for c in cols]
                )
                q = (
                    select(st.seq)
                    .select_from(st.table)
                    .join(bk.table, bk.at(st.seq))
                    .outerjoin(live, live.c.id == st.seq)
                    .where(st.mine, differs)
                )
            else:
                cols = decl["updates"][table]
                differs = or_(
                    live.c.id.is_(None), *[values_differ(live.c[c], st.c[c], live.c[c]) for c in cols]
                )
                q = select(st.seq).select_from(st.table).outerjoin(
                    live, live.c.id == st.seq
                ).where(st.mine, differs)
            ids += list(conn.execute(q.order_by(st.seq).limit(limit)).scalars())
        if table in decl["inserts"] and against == "stage":
            cols = decl["inserts"][table]
            ins = work_rows(engine, live, execution_id, INSERT)
            new_id = inserted_id(ins, ex, table)
            on = live.c.id == new_id
            span = inserted_id_range(conn, ins, ex, table)
            if span is not None:
                on = and_(on, live.c.id.between(*span))  # the inserted rows, not all the table
            differs = or_(
                live.c.id.is_(None), *[values_differ(live.c[c], ins.c[c], live.c[c]) for c in cols]
            )
            q = select(new_id).select_from(ins.table).outerjoin(live, on).where(ins.mine, differs)
            ids += list(conn.execute(q.order_by(ins.seq).limit(limit)).scalars())
        if ids:
            found[table] = ids
    return found


def lock_target_rows(
    conn: Connection, tables: Tables, execution_id: str, decl: dict[str, Any]
) -> None:
    """Row locks on the rows an execution changes (``DatabaseDialect.lock_rows``; where the
    database has no row locks, the writing transaction already holds the write lock)."""
    dialect = dialect_of(conn)
    if not dialect.features.row_locks:
        return
    for table in decl["updates"]:
        live = tables[table]
        ids = target_ids(conn, execution_id, table)
        try:
            dialect.lock_rows(conn, live, ids)
        except DBAPIError as exc:
            if not dialect.is_lock_timeout(exc):
                raise
            raise CommitConflict(
                f"could not lock the {table} rows to update: the application held some of them "
                "longer than the database's lock wait timeout; nothing was committed (re-run "
                "the patch when the application is quieter)",
                {"locked": table},
            ) from None


def staged_inserts(conn: Connection, live: Any, ins: WorkRows) -> StagedInserts | None:
    """The rows ``ins`` an execution staged for insertion into ``live`` (None: there are none)."""
    n, first, last = conn.execute(
        select(func.count(), func.min(ins.seq), func.max(ins.seq)).where(ins.mine)
    ).one()
    if not n:
        return None
    span = int(last) - int(first) + 1
    return StagedInserts(live, ins.table, ins.mine, int(first), span, int(n))


def assign_insert_ids(conn: Connection, live: Any, ins: WorkRows) -> int | None:
    """Hand out the real ids of the staged inserts ``ins`` of ``live`` before inserting them, so the
    inserted rows are known exactly. Ids ascend in ``dp_seq`` order (the order the patch produced
    the rows: an item's chain of log rows reads right when ordered by id).

    Returns the offset when the ids are ``dp_seq + offset`` (one block of ids: the stage is not
    rewritten), or None when they were written to the stage's ``id`` column
    (``DatabaseDialect.reserve_insert_ids``). Only where ``features.ids_before_insert``; the
    commit itself calls ``DatabaseDialect.insert_staged``, which works everywhere.
    """
    inserts = staged_inserts(conn, live, ins)
    if inserts is None:
        return None
    return dialect_of(conn).reserve_insert_ids(conn, inserts)


@contextlib.contextmanager
def _refusal(conn: Connection, table: str, action: str) -> Iterator[None]:
    """Turn the database's refusal of a statement into a DatabaseRefused that says why; a lock
    wait that timed out into a PatchError that names the table."""
    dialect = dialect_of(conn)
    try:
        yield
    except DBAPIError as exc:
        if dialect.is_lock_timeout(exc):
            raise PatchError(
                f"{action} {table}: gave up waiting for rows the application holds (lock wait "
                "timeout); nothing was written",
                {"table": table},
            ) from None
        if not dialect.is_data_refusal(exc):
            raise  # connection trouble or a timeout, not a verdict on the data
        lines = [ln.strip() for ln in str(exc.orig or exc).splitlines() if ln.strip()]
        reason = " ".join(lines[:2])[:500]
        raise DatabaseRefused(f"{action} {table}: {reason}", {"table": table}) from None


#: Per (action, table), an inclusive range of ``dp_seq`` (a slice of the stage: ``steps.trial``).
SeqRanges = dict[tuple[str, str], tuple[int, int]]


def _picked(
    st: WorkRows, table: str, sources: tuple[int, int] | None, seqs: SeqRanges | None
) -> list[ColumnElement[bool]] | None:
    """The conditions that pick the stage rows to apply: of driving rows ``sources`` (lo..hi),
    or of the ``seqs`` range of this action and table; None: none of them (all: [])."""
    picked = [st.mine] if sources is None else [st.mine, st.c.dp_source_id.between(*sources)]
    if seqs is not None:
        key = (st.action, table)
        if key not in seqs:
            return None
        picked.append(st.seq.between(*seqs[key]))
    return picked


def apply_staged(
    conn: Connection,
    engine: Engine,
    tables: Tables,
    execution_id: str,
    decl: dict[str, Any],
    trial: bool = False,
    id_offsets: dict[str, int] | None = None,
    sources: tuple[int, int] | None = None,
    seqs: SeqRanges | None = None,
) -> dict[str, int]:
    """The staged updates and inserts, applied to the live tables on ``conn`` (commit or trial).

    ``id_offsets`` receives, per table, the offset of inserted ids (``inserted_id``).
    ``sources`` (trial only): apply only the changes of the driving rows whose ids lie in this
    inclusive range (the search for the rows the database refuses, ``steps.holdback``).
    ``seqs`` (trial only): apply only the stage rows in these ``dp_seq`` ranges (a slice)."""
    if (sources is not None or seqs is not None) and not trial:
        raise PatchError("only a trial apply may apply part of the stage")
    counts: dict[str, int] = {}
    for table, cols in decl["updates"].items():
        live = tables[table]
        st = work_rows(engine, live, execution_id, UPDATE)
        picked = _picked(st, table, sources, seqs)
        if picked is None:
            counts[f"{table}_updated"] = 0
            continue
        expected = conn.execute(
            select(func.count()).select_from(st.table).where(*picked)
        ).scalar_one()
        if not expected:
            counts[f"{table}_updated"] = 0
            continue
        dialect_of(conn).update_joined(conn)
        with _refusal(conn, table, "update"):
            res = conn.execute(
                update(live)
                .where(live.c.id == st.seq, *picked)
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
        ins = work_rows(engine, live, execution_id, INSERT)
        if trial:
            # ids -dp_seq, computed in the INSERT: the stage itself is never rewritten
            picked = _picked(ins, table, sources, seqs)
            if picked is None:
                counts[f"{table}_inserted"] = 0
                continue
            with _refusal(conn, table, "insert into"):
                res = conn.execute(
                    insert(live).from_select(
                        ["id", *cols],
                        select((-ins.seq).label("id"), *[ins.c[c] for c in cols]).where(*picked),
                    ),
                    execution_options=ROWCOUNT,
                )
            counts[f"{table}_inserted"] = res.rowcount
            continue
        inserts = staged_inserts(conn, live, ins)
        if inserts is None:
            counts[f"{table}_inserted"] = 0
            continue
        with _refusal(conn, table, "insert into"):
            n, offset = dialect_of(conn).insert_staged(conn, inserts, cols)
        if offset is not None and id_offsets is not None:
            id_offsets[table] = offset
        counts[f"{table}_inserted"] = n
    return counts
