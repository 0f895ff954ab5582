"""An execution's work rows of one live table, of one kind, and where they are: its before-images
(``BACKUP``), staged updates (``UPDATE``), staged inserts (``INSERT``) or a failing batch's rows
(``FAILED``, never committed).

Every step reads and writes them through a ``WorkRows``: the table that holds them, the filter
that picks them (``mine``), their sequence (``seq``: a row's id for a before-image or an update,
its order for an insert) and the bookkeeping values a new row carries (``values``). Today they
are in the shared mirrors (``patch_ops.state.mirror_table``), keyed by (execution, action,
sequence); where they are is decided here alone, so that moving them to tables of the
execution's own (the storage plan, benchmarks/README.md sessions 32-34) changes this module,
not the statements.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Delete, Insert, Select, and_, delete, insert, literal, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql import ColumnElement
from sqlalchemy.types import String

from patch_ops.state import (
    BACKUP,
    FAILED,
    INSERT,
    MIRROR_KINDS,
    UPDATE,
    mirror_by_name,
    mirror_name,
    mirror_table,
)

#: Every action of work rows.
WORK_ACTIONS = (BACKUP, UPDATE, INSERT, FAILED)


def kind_of(action: str) -> str:
    """The mirror kind (``patch_ops.state.MIRROR_KINDS``) that holds rows of ``action``."""
    return "backup" if action == BACKUP else "stage"


@dataclass(frozen=True)
class WorkRows:
    """Execution ``execution_id``'s rows of ``action`` in ``table`` (a mirror, or an alias of
    one)."""

    table: Any  # a Table, or an alias of one
    execution_id: str
    action: str

    @property
    def c(self) -> Any:
        return self.table.c

    @property
    def seq(self) -> Any:
        return self.table.c.dp_seq

    @property
    def mine(self) -> ColumnElement[bool]:
        """The filter that picks these rows out of ``table``."""
        return and_(self.c.dp_execution_id == self.execution_id, self.c.dp_action == self.action)

    def alias(self, name: str) -> WorkRows:
        return replace(self, table=self.table.alias(name))

    def at(self, seq: Any) -> ColumnElement[bool]:
        """The join condition that picks the row of sequence ``seq`` (another side's column)."""
        return and_(self.mine, self.seq == seq)

    def select_seq(self) -> Select[Any]:
        """The sequence of every row, as the one statement a step that reads them starts from."""
        return select(self.seq).where(self.mine)

    def first(self) -> Select[Any]:
        """The first row's sequence, if any: whether there is one. In primary-key order: a bare
        LIMIT 1 or count(*) took 0.1 s a batch on PostgreSQL (200k rows; the stage's statistics
        of before its load), this a few ms."""
        return self.select_seq().order_by(*self.table.primary_key.columns).limit(1)

    def delete(self, *where: ColumnElement[bool]) -> Delete:
        return delete(self.table).where(self.mine, *where)

    def values(self) -> dict[str, Any]:
        """The bookkeeping values a new row carries, as plain values (rows written from Python)."""
        return {"dp_execution_id": self.execution_id, "dp_action": self.action}

    def fill(self, columns: list[str], source: Select[Any],
             action: ColumnElement[Any] | None = None) -> Insert:
        """``INSERT INTO table (*columns, bookkeeping) SELECT ...``: ``source`` selects the
        ``columns`` in order, the bookkeeping values are added after them (``action``: an
        expression in place of the action, e.g. one that marks a failing row ``FAILED``)."""
        key = literal(self.execution_id, self.c.dp_execution_id.type)
        marks = [key, literal(self.action, String) if action is None else action]
        return insert(self.table).from_select([*columns, *self.values()],
                                              source.add_columns(*marks))


#: An execution's stage rows by (action, table) (``patch_ops.steps.batching.stage_rows``).
Stages = dict[tuple[str, str], WorkRows]


def work_rows(engine: Engine, live: Any, execution_id: str, action: str) -> WorkRows:
    """Execution ``execution_id``'s rows of ``action`` of live table ``live``, their mirror made
    (or widened) if missing."""
    return WorkRows(mirror_table(engine, live, kind_of(action)), str(execution_id), action)


def existing_rows(conn: Connection, table: str, execution_id: str, action: str) -> WorkRows | None:
    """The same, without the live table: where the mirror exists as it is in the database
    (None: there is none, so there are no such rows)."""
    mirror = mirror_by_name(conn, mirror_name(kind_of(action), table))
    return None if mirror is None else WorkRows(mirror, str(execution_id), action)


def delete_work_rows(conn: Connection, table: str, execution_ids: list[str],
                     page: int = 500) -> None:
    """Delete every work row (of any action) of executions ``execution_ids`` of live table
    ``table``, ``page`` executions a statement: their ids read first and deleted by key (MariaDB
    ran ``dp_execution_id IN (SELECT ...)`` in a DELETE as a dependent subquery, once per kept
    row: 2.4 s over one kept 100k-row fingerprint)."""
    for kind in MIRROR_KINDS if execution_ids else ():
        mirror = mirror_by_name(conn, mirror_name(kind, table))
        if mirror is None:
            continue
        for at in range(0, len(execution_ids), page):
            conn.execute(delete(mirror).where(
                mirror.c.dp_execution_id.in_(execution_ids[at : at + page])))


def distinct_tables(rows: Iterable[WorkRows]) -> list[Any]:
    """The tables that hold ``rows``, each once (to analyze them, to index them)."""
    return list({id(r.table): r.table for r in rows}.values())
