"""An execution's work rows of one live table, of one kind, and where they are: its before-images
(``BACKUP``), staged updates (``UPDATE``) and staged inserts (``INSERT``).

Every step reads and writes them through a ``WorkRows``: the table that holds them, the filter
that picks them (``mine``), their sequence (``seq``: a row's id for a before-image or an update,
its order for an insert) and the bookkeeping values a new row carries (``values``).

Where they are is decided here alone, by the execution's ``storage``:
- ``OWN_WORK_ROWS`` (executions planned by this version): each kind of each table in a table of
  the execution's own (``data_patch_<backup|update|insert>_<digest>``, named like its target
  sets), keyed by ``dp_seq`` alone. Writing the 36-byte execution id and the action into every
  row of the shared mirrors cost MariaDB 1M ~8 s of a real run (benchmarks/README.md, sessions
  32 and 34). The plan makes them (DDL commits on MySQL); closing the execution drops them after
  its transaction, but the kept ones: a committed run's (restore, verification) and an approving
  dry run's backup and updates (its fingerprint, ``steps.drift``).
- otherwise (an earlier version's execution): the shared mirrors (``state.mirror_table``), keyed
  by (execution, action, sequence), read there until purged.

A batch the in-database transform stages in one pass marks its failing rows (``fill``'s
``failing``): action ``FAILED`` in a shared mirror, a negated sequence in a table of its own;
the pass is then rolled back (a savepoint), so no such row is ever committed.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterable
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import (
    Delete,
    Insert,
    Select,
    and_,
    case,
    delete,
    insert,
    inspect,
    literal,
    select,
    true,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql import ColumnElement
from sqlalchemy.types import String

from patch_ops.dialects.names import framework_schema
from patch_ops.patch import Tables
from patch_ops.state import (
    BACKUP,
    FAILED,
    INSERT,
    MIRROR_KINDS,
    UPDATE,
    drop_work_table,
    executions,
    mirror_by_name,
    mirror_name,
    mirror_table,
    work_table,
)
from patch_ops.target_sets import own_table_name, target_table_name

#: ``data_patch_executions.storage`` of an execution whose target sets and work rows are tables
#: of its own (``patch_ops.target_sets.OWN_TARGETS``: its target sets only).
OWN_WORK_ROWS = 2
#: Every action of work rows in the shared mirrors.
WORK_ACTIONS = (BACKUP, UPDATE, INSERT, FAILED)
#: The kind in the name of an execution's own table of each action.
OWN_KINDS = {BACKUP: "backup", UPDATE: "update", INSERT: "insert"}

_storage: dict[tuple[str, str], bool] = {}  # (database, execution) -> work rows of its own
_storage_lock = threading.Lock()


def kind_of(action: str) -> str:
    """The mirror kind (``patch_ops.state.MIRROR_KINDS``) that holds rows of ``action``."""
    return "backup" if action == BACKUP else "stage"


@dataclass(frozen=True)
class WorkRows:
    """Execution ``execution_id``'s rows of ``action`` in ``table`` (a Table or an alias of one):
    a ``shared`` mirror, or a table of these rows alone."""

    table: Any
    execution_id: str
    action: str
    shared: bool = True

    @property
    def c(self) -> Any:
        return self.table.c

    @property
    def seq(self) -> Any:
        return self.table.c.dp_seq

    @property
    def mine(self) -> ColumnElement[bool]:
        """The filter that picks these rows out of ``table``."""
        if not self.shared:
            return true()
        return and_(self.c.dp_execution_id == self.execution_id, self.c.dp_action == self.action)

    def alias(self, name: str) -> WorkRows:
        return replace(self, table=self.table.alias(name))

    def at(self, seq: Any) -> ColumnElement[bool]:
        """The join condition that picks the row of sequence ``seq`` (another side's column)."""
        return and_(self.mine, self.seq == seq)

    def select_seq(self) -> Select[Any]:
        """The sequence of every row, as the one statement a step that reads them starts from."""
        return select(self.seq).where(self.mine)

    def first_failed(self) -> Select[Any]:
        """The sequence of a row ``fill`` marked failing, if any. In primary-key order: a bare
        LIMIT 1 or count(*) took 0.1 s a batch on PostgreSQL (200k rows; the stage's statistics
        of before its load), this a few ms."""
        if not self.shared:
            return select(self.seq).where(self.seq < 0).order_by(self.seq).limit(1)
        failed = and_(self.c.dp_execution_id == self.execution_id, self.c.dp_action == FAILED)
        return (select(self.seq).where(failed)
                .order_by(*self.table.primary_key.columns).limit(1))

    def delete(self, *where: ColumnElement[bool]) -> Delete:
        return delete(self.table).where(self.mine, *where)

    def values(self) -> dict[str, Any]:
        """The bookkeeping values a new row carries, as plain values (rows written from Python)."""
        return {"dp_execution_id": self.execution_id, "dp_action": self.action} if self.shared else {}

    def fill(self, seq: Any, columns: list[str], source: Select[Any],
             failing: ColumnElement[bool] | None = None) -> Insert:
        """``INSERT INTO table (*columns, dp_seq, bookkeeping) SELECT ...``: ``source`` selects
        the ``columns`` in order, ``seq`` (an expression over its rows) numbers them. A row for
        which ``failing`` holds is marked (``first_failed`` finds it)."""
        names, marks = ["dp_seq"], [seq]
        if not self.shared:
            if failing is not None:
                marks = [case((failing, -seq), else_=seq)]
        else:
            action: Any = literal(self.action, String)
            if failing is not None:
                action = case((failing, literal(FAILED, String)), else_=action)
            names += ["dp_execution_id", "dp_action"]
            marks += [literal(self.execution_id, self.c.dp_execution_id.type), action]
        return insert(self.table).from_select([*columns, *names], source.add_columns(*marks))


#: An execution's stage rows by (action, table) (``patch_ops.steps.batching.stage_rows``).
Stages = dict[tuple[str, str], WorkRows]


def own_rows(bind: Engine | Connection, execution_id: str) -> bool:
    """Whether an execution's work rows are tables of its own (``OWN_WORK_ROWS``): read once
    per process and database (it never changes once planned)."""
    key = (str(bind.engine.url), str(execution_id))
    with _storage_lock:
        known = _storage.get(key)
    if known is not None:
        return known
    query = select(executions.c.storage).where(executions.c.execution_id == str(execution_id))
    if isinstance(bind, Connection):
        row = bind.execute(query).first()
    else:
        with bind.connect() as conn:
            row = conn.execute(query).first()
    own = row is not None and (row[0] or 0) >= OWN_WORK_ROWS
    if row is not None:
        with _storage_lock:
            _storage[key] = own
    return own


def forget_storage() -> None:
    """Drop this process's record of executions' storage (a fresh op process has none)."""
    with _storage_lock:
        _storage.clear()


def work_rows(engine: Engine, live: Any, execution_id: str, action: str) -> WorkRows:
    """Execution ``execution_id``'s rows of ``action`` of live table ``live``, their table made
    (or widened) if missing."""
    execution_id = str(execution_id)
    if own_rows(engine, execution_id):
        name = own_table_name(OWN_KINDS[action], execution_id, live.name)
        return WorkRows(work_table(engine, live, name, shared=False), execution_id, action, False)
    return WorkRows(mirror_table(engine, live, kind_of(action)), execution_id, action)


def create_work_tables(engine: Engine, tables: Tables, execution_id: str,
                       decl: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Before the plan's transaction (DDL commits on MySQL): the tables a new execution's work
    rows go to, each on a connection of its own. Returns their names, by live table and kind
    (for the report: where to look for them by hand)."""
    made: dict[str, dict[str, str]] = {}
    for table in decl["tables"]:
        actions = [BACKUP, *[a for a, written in ((UPDATE, decl["updates"]),
                                                  (INSERT, decl["inserts"])) if table in written]]
        for action in actions:
            rows = work_rows(engine, tables[table], execution_id, action)
            made.setdefault(table, {})[OWN_KINDS[action]] = rows.table.name
    return made


def existing_rows(conn: Connection, table: str, execution_id: str, action: str) -> WorkRows | None:
    """The same, without the live table: where the table that holds them exists as it is in the
    database (None: there is none, so there are no such rows)."""
    execution_id = str(execution_id)
    if own_rows(conn, execution_id):
        if action not in OWN_KINDS:
            return None  # failing rows are never committed to a table of its own
        found = mirror_by_name(conn, own_table_name(OWN_KINDS[action], execution_id, table))
        return None if found is None else WorkRows(found, execution_id, action, False)
    mirror = mirror_by_name(conn, mirror_name(kind_of(action), table))
    return None if mirror is None else WorkRows(mirror, execution_id, action)


def delete_work_rows(conn: Connection, table: str, execution_ids: list[str],
                     page: int = 500) -> None:
    """Delete every work row (of any action) of executions ``execution_ids`` of live table
    ``table`` from the shared mirrors, ``page`` executions a statement: their ids read first
    and deleted by key (MariaDB ran ``dp_execution_id IN (SELECT ...)`` in a DELETE as a
    dependent subquery, once per kept row: 2.4 s over one kept 100k-row fingerprint). Tables of
    their own are dropped after the caller's transaction (``drop_own_tables``)."""
    for kind in MIRROR_KINDS if execution_ids else ():
        mirror = mirror_by_name(conn, mirror_name(kind, table))
        if mirror is None:
            continue
        for at in range(0, len(execution_ids), page):
            conn.execute(delete(mirror).where(
                mirror.c.dp_execution_id.in_(execution_ids[at : at + page])))


def drop_own_tables(engine: Engine, execution_ids: Collection[str], tables: Collection[str],
                    fingerprint: Collection[str] = ()) -> None:
    """After the transaction that closed executions (DDL commits on MySQL): drop their tables of
    their own of live ``tables`` (target sets, work rows) that exist, each on a connection of
    its own; of the tables in ``fingerprint``, the backup and updates stay (an approving dry
    run's). A crash before leaves them to the purge, which finds them by name: no step reads the
    work rows of a closed execution that it did not keep."""
    if not execution_ids:
        return
    schema = framework_schema(engine)
    standing = set(inspect(engine).get_table_names(schema=schema))  # one catalog query
    for execution_id in execution_ids:
        for table in tables:
            kinds = [kind for action, kind in OWN_KINDS.items()
                     if not (table in fingerprint and action in (BACKUP, UPDATE))]
            for name in [target_table_name(str(execution_id), table),
                         *[own_table_name(kind, str(execution_id), table) for kind in kinds]]:
                if name in standing:
                    drop_work_table(engine, name)


def distinct_tables(rows: Iterable[WorkRows]) -> list[Any]:
    """The tables that hold ``rows``, each once (to analyze them, to index them)."""
    return list({id(r.table): r.table for r in rows}.values())
