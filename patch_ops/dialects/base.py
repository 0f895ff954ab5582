"""What every database does the same way, and the one interface for what differs.

The steps never ask which database they are on: they call a method of the
:class:`DatabaseDialect` that ``patch_ops.dialects.dialect_of`` returns, or test one of its
:class:`Features` flags (a capability, not a name), as Alembic's ``ddl/impl.py`` and Django's
``db/backends/*/operations.py`` + ``features.py`` do. This class is the portable default; one
subclass per database overrides only what differs there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import DateTime, Select, Table, delete, func, insert, select
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.sql import ColumnElement
from sqlalchemy.types import TypeEngine

from patch_ops.frames import plain_records

if TYPE_CHECKING:  # pandas is for the op processes: loading the code location skips it
    import pandas as pd

#: Ids per statement of ``ids_sha256`` (8 bytes each: 80 kB packed per page)
ID_PAGE = 10_000


@dataclass(frozen=True)
class Features:
    """Capability flags: callers branch on these, never on the database's name."""

    #: ``SELECT ... FOR UPDATE`` locks single rows. False: a writing transaction holds the whole
    #: database's write lock from its first statement instead (SQLite).
    row_locks: bool = True
    #: A statement time limit can be set for one transaction (``set_statement_timeout``).
    statement_timeout: bool = False
    #: Timestamps keep their UTC offset (PostgreSQL ``timestamptz``); else they are stored as
    #: naive UTC.
    stores_utc_offset: bool = False
    #: ``REPEATABLE READ`` gives a read transaction one consistent snapshot.
    snapshot_isolation: bool = True
    #: ``reserve_insert_ids`` can hand out live ids before the rows are inserted. False: the
    #: database gives ids only while inserting (MySQL's AUTO_INCREMENT): ``insert_staged`` learns
    #: them from the inserts themselves.
    ids_before_insert: bool = True
    #: Tables can live in another schema (PostgreSQL) or database (MySQL) of the same server,
    #: reachable from one connection: the framework's tables may (``framework_schema``).
    schemas: bool = True


class UnsupportedServer(Exception):
    """The database server lacks something the framework relies on (``check_server``)."""


class MissingPrivilege(Exception):
    """The database user may not do what the framework must (create its tables, read or write a
    StockRx table): a refusal before any write, never a verdict on the data."""


@dataclass(frozen=True)
class StagedInserts:
    """The rows an execution stages for insertion into one live table: ``where`` selects them
    in ``stage``; their ``dp_seq`` run from ``first`` over ``span`` values, ``count`` rows."""

    live: Table
    stage: Table
    where: ColumnElement[bool]
    first: int
    span: int
    count: int


def locking_select(live: Table, ids: Select[Any]) -> Select[Any]:
    """``SELECT id FROM live WHERE id IN (ids) FOR UPDATE``: the portable row-lock statement."""
    return select(live.c.id).where(live.c.id.in_(ids)).with_for_update()


class DatabaseDialect:
    """The portable way; subclasses override what their database does differently."""

    name = "default"
    features = Features()

    # -- connections ---------------------------------------------------------------------------
    def engine_options(self) -> dict[str, Any]:
        """Keyword arguments for ``create_engine``."""
        return {"pool_pre_ping": True, "pool_size": 5, "max_overflow": 5}

    def configure(self, engine: Engine) -> None:
        """Connection set-up (event listeners) right after the engine is created."""

    def not_a_number(self, column: ColumnElement[Any]) -> ColumnElement[bool] | None:
        """True where a numeric column holds something that is not a number; None where the
        database's types make that impossible (all but SQLite, whose columns take any value)."""
        return None

    def log_position(self, conn: Connection) -> str | None:
        """The database's current position in its transaction log (for point-in-time recovery:
        PostgreSQL's WAL LSN, MySQL's executed GTID set), or None where there is none."""
        return None

    def missing_database(self, url: URL) -> str | None:
        """Why the database at ``url`` plainly does not exist (so connecting would create it),
        or None; asked before the first connection."""
        return None

    def snapshot(self, conn: Connection) -> Connection:
        """``conn`` set up so that its next transaction reads one consistent snapshot."""
        if self.features.snapshot_isolation:
            return conn.execution_options(isolation_level="REPEATABLE READ")
        return conn

    def check_server(self, conn: Connection) -> None:
        """Raise ``UnsupportedServer`` (one line) when the server cannot run patches safely,
        e.g. a version that accepts CHECK constraints without enforcing them."""

    def is_busy(self, exc: DBAPIError) -> bool:
        """The database was busy (another writer): the same statement may succeed if retried."""
        return False

    def is_data_refusal(self, exc: DBAPIError) -> bool:
        """``exc`` is the database refusing the data of a statement (a constraint, a type, a
        trigger), as opposed to trouble with the connection, a lock wait, a timeout or a missing
        privilege."""
        return not isinstance(exc, OperationalError | InterfaceError) and not (
            self.is_privilege_error(exc)
        )

    def is_privilege_error(self, exc: DBAPIError) -> bool:
        """``exc`` is the user lacking a privilege (SQLSTATE 42501, insufficient_privilege)."""
        return getattr(exc.orig, "sqlstate", None) == "42501"

    def is_lock_timeout(self, exc: DBAPIError) -> bool:
        """``exc`` is a statement that gave up waiting for a row lock another session holds."""
        return False

    # -- bulk work -----------------------------------------------------------------------------
    def bulk_insert(self, conn: Connection, table: Table, df: pd.DataFrame) -> None:
        """Insert a frame's rows in ``conn``'s transaction (columns already checked)."""
        conn.execute(insert(table), plain_records(df))

    def load_frame(self, engine: Engine, table: Table, df: pd.DataFrame) -> None:
        """Load a frame into a table in a transaction of its own, as fast as the database
        allows (seeding demo and benchmark data)."""
        with engine.begin() as conn:
            self.bulk_insert(conn, table, df)

    def reset_id_sequences(self, conn: Connection, tables: Iterable[Table]) -> None:
        """After rows were loaded with explicit ids: the next generated id follows the largest."""

    def analyze(self, engine: Engine, tables: Sequence[Table]) -> None:
        """Fresh planner statistics after a bulk load, where the planner needs them."""

    def ids_sha256(self, conn: Connection, ids: Select[Any], prefix: bytes) -> tuple[int, str] | None:
        """(count, SHA-256 hex) of ``prefix`` followed by every id of ``ids`` (a one-column
        SELECT of BIGINT) as 8-byte big-endian two's complement, ascending; None where the
        database cannot pack them (``pack_ids``): the caller reads the ids in pages.

        In pages of ``ID_PAGE`` ids, each packed into one binary string by the database and
        hashed here: 10,000 one-id rows through the driver cost more than the rest of the read
        (PyMySQL), and the server holds one page at a time (one statement hashing them all held
        8 bytes per id in a PostgreSQL backend: 800 MB at 100M ids)."""
        sub = ids.subquery()
        col = list(sub.c)[0]
        h, count, last = hashlib.sha256(prefix), 0, None
        while True:
            page = select(col.label("i")).order_by(col).limit(ID_PAGE)
            if last is not None:
                page = page.where(col > last)
            p = page.subquery("page")
            packed_ids = self.pack_ids(conn, p.c.i)
            if packed_ids is None:
                return None
            n, high, packed = conn.execute(
                select(func.count(), func.max(p.c.i), packed_ids)
            ).one()
            if not n:
                return count, h.hexdigest()
            packed = bytes(packed)
            if len(packed) != 8 * n:  # e.g. cut short by a server limit: never hashed
                raise RuntimeError(f"{n} ids packed into {len(packed)} bytes, not {8 * n}")
            h.update(packed)
            count, last = count + int(n), int(high)

    def pack_ids(self, conn: Connection, ids: ColumnElement[Any]) -> ColumnElement[Any] | None:
        """An aggregate joining ``ids`` (one page of ``ids_sha256``) into one binary string,
        each as 8-byte big-endian two's complement, ascending; None: this database cannot."""
        return None

    # -- locks and limits ----------------------------------------------------------------------
    def lock_rows(self, conn: Connection, live: Table, ids: Select[Any]) -> None:
        """Take the row locks of the rows of ``live`` whose ``id`` the one-column ``ids``
        selects (an execution's target set), without keeping the rows: streamed and dropped a
        page at a time (fetching 10M ids at once took the commit step to ~1.8 GB)."""
        if not self.features.row_locks:
            return
        streamed = {"stream_results": True, "yield_per": 10_000}
        locked = conn.execute(locking_select(live, ids), execution_options=streamed)
        for _ in locked.partitions():
            pass

    def set_statement_timeout(self, conn: Connection, seconds: float) -> None:
        """Limit every statement of ``conn``'s current transaction to ``seconds`` (when
        ``features.statement_timeout``; a no-op otherwise)."""

    def is_statement_timeout(self, exc: DBAPIError) -> bool:
        """``exc`` is a statement cancelled by ``set_statement_timeout``'s limit."""
        return False

    def interrupt(self, conn: Connection) -> None:
        """Cancel the statement ``conn`` runs in another thread, if any: that thread gets the
        driver's error (a no-op where the database cannot: the statement runs to its end)."""

    def one_process(self, conn: Connection) -> None:
        """Run the rest of ``conn``'s transaction in one server process (a no-op where the
        database has no parallel workers): for a pass that runs beside other passes on their
        own connections, whose workers would take the CPUs the passes beside it need."""

    def group_once(self, conn: Connection) -> None:
        """Plan the rest of ``conn``'s transaction so that a grouped subquery joined to other
        rows is computed once and cheaply (a no-op where the database needs no telling)."""

    def update_joined(self, conn: Connection) -> None:
        """Plan the rest of ``conn``'s transaction for an UPDATE of many rows joined to the
        stage's rows (a no-op where the database needs no telling)."""

    def narrow_key(self, conn: Connection, table: Table, column: str) -> None:
        """Convert ``table``'s ``column``, execution ids as text (an earlier version's), to this
        database's ``types.EXECUTION_KEY``, its rows kept, in ``conn``'s transaction. Called
        only where that key is not text (so a no-op here)."""

    def check_deferred_constraints(self, conn: Connection) -> None:
        """Check now the constraints the schema defers to commit (a trial apply never commits)."""

    # -- ids -----------------------------------------------------------------------------------
    def reserve_insert_ids(self, conn: Connection, ins: StagedInserts) -> int | None:
        """Hand out the live ids of the staged inserts ``ins``, ascending in ``dp_seq`` order.

        Returns the offset when the ids are ``dp_seq + offset`` (one block), or None when they
        were written to the stage's ``id`` column. Portable way: the ids after the live table's
        largest, which needs the table's write lock (the commit's)."""
        base = conn.execute(select(func.coalesce(func.max(ins.live.c.id), 0))).scalar_one()
        return int(base) + 1 - ins.first

    def insert_staged(
        self, conn: Connection, ins: StagedInserts, columns: Sequence[str]
    ) -> tuple[int, int | None]:
        """Insert the staged rows ``ins`` (their ``columns``) into the live table with live ids
        ascending in ``dp_seq`` order, the ids known exactly. Returns (rows inserted, offset):
        the offset when the ids are ``dp_seq + offset``, None when they are in the stage's ``id``
        column. Portable way: ``reserve_insert_ids``, then one ``INSERT ... SELECT``."""
        st = ins.stage
        offset = self.reserve_insert_ids(conn, ins)
        new_id = st.c.id if offset is None else st.c.dp_seq + offset
        res = conn.execute(
            insert(ins.live).from_select(
                ["id", *columns],
                select(new_id.label("id"), *[st.c[c] for c in columns]).where(ins.where),
            ),
            execution_options={"preserve_rowcount": True},
        )
        return res.rowcount, offset

    def delete_ids(self, conn: Connection, table: Table, ids: Select[Any]) -> int:
        """Delete the rows of ``table`` whose ``id`` is among ``ids`` (a one-column SELECT);
        returns how many were deleted."""
        return int(conn.execute(delete(table).where(table.c.id.in_(ids))).rowcount)

    # -- types ---------------------------------------------------------------------------------
    def utc_datetime_type(self) -> TypeEngine[Any]:
        """The column type of a UTC timestamp with microseconds."""
        return DateTime(timezone=True)
