"""The would-be (or committed) result of an execution as SQL, and the patch's invariants on it.

``ResultView`` gives a patch's invariants the rows it updates and inserts and whole tables as they
would be after commit (from the stage) or are (live, after commit); ``invariant_checks`` runs
each invariant as one count query with a sample of offenders, bounded by the statement timeout.
Validation and post-verification share them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Integer, and_, func, literal, select, union_all
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from patch_ops import state
from patch_ops.dialects import dialect_of
from patch_ops.execution import config_of, inserted_id, inserted_id_range, jsonable, load_execution
from patch_ops.patch import Invariant, Patch, Tables
from patch_ops.state import BACKUP, INSERT, UPDATE, mirror_table

SAMPLE_ROWS = 10


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

    Where the database can limit a statement's time, each query may run ``timeout_s`` at most: one that
    runs longer counts as broken (``timed_out``), so a bad plan fails the validation, or makes
    post-verification restore, instead of holding the maintenance window and the table locks.
    """
    with engine.connect() as conn:
        ex = load_execution(conn, execution_id)
    config = config_of(patch, ex)
    tables = state.reflect_tables(engine, patch.tables())
    view = ResultView(engine, tables, execution_id, committed, ex["declaration"], ex)
    dialect = dialect_of(engine)
    limit_s = timeout_s if timeout_s and dialect.features.statement_timeout else 0

    def check(inv: Invariant) -> dict[str, Any] | None:
        sub = inv.offenders.subquery()
        with engine.connect() as conn:
            if limit_s:
                dialect.set_statement_timeout(conn, limit_s)
            try:
                n = conn.execute(select(func.count()).select_from(sub)).scalar_one()
            except OperationalError as exc:
                if not dialect.is_statement_timeout(exc):
                    raise
                return {"name": inv.name, "description": inv.description, "count": None,
                        "timed_out": timeout_s, "sample": []}
            if not n:
                return None
            sample = [
                {k: jsonable(v) for k, v in r.items()}
                for r in conn.execute(select(sub).limit(SAMPLE_ROWS)).mappings()
            ]
        return {"name": inv.name, "description": inv.description, "count": n, "sample": sample}

    return [functools.partial(check, inv) for inv in patch.invariants(view, config)]


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

