"""Where an execution's frozen target set lives, and the statements that read, shrink and drop it.

Each (execution, table) target set is a table of its own, ``data_patch_targets_<digest>`` (the
digest of the execution id and the table name: a re-executed op finds it without a registry),
keyed by the row id alone and made by the plan before the transaction that fills it (DDL commits
on MySQL). In the shared ``data_patch_targets`` every row carried the 36-byte execution id and
the table name in its key: writing 1M ids cost 1.7x, and each join on them 1.3x
(benchmarks/README.md, sessions 32-33). Purge drops the tables.

An execution planned by an earlier version (``data_patch_executions.storage`` NULL) keeps its set
in the shared table and is read there (a restore, an approval by a pre-upgrade dry run, a run
resumed across the upgrade) until purged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    MetaData,
    Select,
    Table,
    and_,
    delete,
    func,
    select,
    true,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.elements import ColumnElement

from patch_ops.database import catalog, write_transaction
from patch_ops.dialects.names import framework_schema
from patch_ops.dialects.types import TABLE_OPTIONS, framework_ddl
from patch_ops.state import executions, targets

#: ``data_patch_executions.storage`` of an execution whose target sets are tables of their own
#: (NULL: the shared ``data_patch_targets``, as earlier versions wrote them).
OWN_TARGETS = 1


@dataclass(frozen=True)
class TargetSet:
    """The rows of ``table`` (column ``row_id``) that ``mine`` picks: one execution's ids of one
    live table."""

    table: Table
    mine: ColumnElement[bool]

    @property
    def row_id(self) -> Any:
        return self.table.c.row_id

    def ids(self) -> Select[tuple[int]]:
        """The ids, as the one statement every step that reads the target set starts from."""
        return select(self.row_id).where(self.mine)


def own_table_name(kind: str, execution_id: str, table: str) -> str:
    """``data_patch_<kind>_`` and 32 hex digits (51 characters for ``targets``: within MySQL's
    64, PostgreSQL's 63), the same for the same execution and table in every process."""
    digest = hashlib.sha256(f"{execution_id}\0{table}".encode()).hexdigest()[:32]
    return f"data_patch_{kind}_{digest}"


def target_table_name(execution_id: str, table: str) -> str:
    return own_table_name("targets", execution_id, table)


def own_table(bind: Engine | Connection, execution_id: str, table: str) -> Table:
    return Table(
        target_table_name(execution_id, table),
        MetaData(),
        Column("row_id", BigInteger, primary_key=True, autoincrement=False),
        schema=framework_schema(bind),
        **TABLE_OPTIONS,
    )


def create_target_tables(engine: Engine, execution_id: str, tables: Iterable[str]) -> dict[str, Table]:
    """The target set tables of a new execution, made if missing, each on a connection of its
    own: outside the transaction that fills them (DDL commits on MySQL)."""
    made = {}
    with framework_ddl(engine):
        for name in tables:
            made[name] = own_table(engine, execution_id, name)
            # a write transaction: see ``patch_ops.database.create_tables``
            with write_transaction(engine) as conn:
                made[name].create(conn, checkfirst=True)
    return made


def own_storage(conn: Connection, execution_id: str) -> bool:
    """Whether an execution's target sets are tables of their own (False: the shared table, an
    earlier version's execution; or no execution row at all)."""
    storage = conn.execute(
        select(executions.c.storage).where(executions.c.execution_id == execution_id)
    ).scalar()
    return storage is not None and storage >= OWN_TARGETS


def target_set(conn: Connection, execution_id: str, table: str) -> TargetSet:
    """Where an execution's frozen ids of ``table`` are."""
    return target_sets(conn, execution_id, [table])[table]


def target_sets(conn: Connection, execution_id: str, tables: Iterable[str]) -> dict[str, TargetSet]:
    """Where an execution's frozen ids of each of ``tables`` are (its storage read once)."""
    if own_storage(conn, execution_id):
        return {t: TargetSet(own_table(conn, execution_id, t), true()) for t in tables}
    return {
        t: TargetSet(targets, and_(targets.c.execution_id == execution_id,
                                   targets.c.table_name == t))
        for t in tables
    }


def target_ids(conn: Connection, execution_id: str, table: str) -> Select[tuple[int]]:
    """The row ids of ``table`` in an execution's frozen target set."""
    return target_set(conn, execution_id, table).ids()


def delete_shared_targets(conn: Connection, execution_id: str) -> None:
    """Delete an earlier version's execution's ids from the shared table, in ``conn``'s
    transaction. An execution's own tables are not emptied row by row: they are dropped after
    the transaction that closes it (``work_rows.drop_own_tables``; a DROP would commit that
    transaction on MySQL), and a crash in between leaves them to the purge, which finds them by name. No
    step reads the target set of another execution than its own, so rows left there are inert."""
    if not own_storage(conn, execution_id):
        conn.execute(delete(targets).where(targets.c.execution_id == execution_id))


def existing_tables(conn: Connection, execution_id: str, tables: Iterable[str]) -> list[Table]:
    """The target set tables of an execution that exist (a plan refused early made none)."""
    schema = framework_schema(conn)
    known = catalog(conn)
    found = [own_table(conn, execution_id, t) for t in tables]
    return [t for t in found if known.has_table(t.name, schema, conn)]


def target_counts(conn: Connection, execution_id: str, tables: Iterable[str]) -> dict[str, int]:
    """The frozen ids an execution still has, by the table that holds them: every target set
    table of its own that exists, empty ones too (the purge drops them); the shared table's
    rows of an earlier version's execution, if any."""
    if not own_storage(conn, execution_id):
        n = conn.execute(
            select(func.count()).where(targets.c.execution_id == execution_id)
        ).scalar_one()
        return {targets.name: int(n)} if n else {}
    return {
        t.name: int(conn.execute(select(func.count()).select_from(t)).scalar_one())
        for t in existing_tables(conn, execution_id, tables)
    }

