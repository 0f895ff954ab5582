"""MySQL 8 (8.0.16+) and MariaDB (10.2+), InnoDB, through PyMySQL (or mysqlclient).

What differs here, and why:

- **Sessions** as the Rails app's: utf8mb4, ``sql_mode='TRADITIONAL'`` (a value the application
  would have refused is refused here too, instead of being cut or clipped with a warning) and
  ``time_zone='+00:00'`` (naive UTC datetimes, as Rails writes them, whatever the server's zone);
  bounded lock waits (``innodb_lock_wait_timeout``, metadata ``lock_wait_timeout``) so a commit
  that cannot get its rows fails with a message instead of hanging. All set by the connection's
  ``init_command``, before SQLAlchemy reads the session's sql_mode.
- **READ COMMITTED** by default: under InnoDB's REPEATABLE READ an ``INSERT ... SELECT`` from a
  live table (the backup) takes shared locks on every row it reads and keeps them until commit,
  blocking the application's updates of those rows; under READ COMMITTED it reads a snapshot and
  locks nothing. Reads that need one snapshot ask for REPEATABLE READ (``snapshot``).
- **DDL commits implicitly** (CREATE/ALTER/DROP/TRUNCATE/ANALYZE): the framework issues it only
  on connections of its own, outside the transactions whose atomicity matters (state.py,
  backup.py); ``ANALYZE TABLE`` runs in autocommit.
- **Refusals** by error number: a CHECK violation is an OperationalError (4025 MariaDB, 3819
  MySQL), strict-mode data errors DataError or OperationalError.
- **Row locks** by ``SELECT COUNT(*) ... FOR UPDATE`` (the server locks the rows, sends one
  number); a lock wait that times out (1205) is told apart so the commit can name the table.
- **Grouped joins** (the invariants' shared pass) and **UPDATEs joined to the stage** (the
  commit, a trial apply) keep their internal temporary tables in memory up to
  ``GROUP_MEMORY``, not the default 16 MiB (``group_once``, ``update_joined``); on MariaDB
  the grouped rows are grouped once, not again per outer row (``split_materialized=off``).
- **Statement limits** by a client-side watchdog (``mysql_timeouts``); **ids** of inserted rows
  from one INSERT ... SELECT under AUTO_INCREMENT lock mode 2 (MySQL 8's default), else from
  multi-row INSERTs; **bulk rows** by LOAD DATA LOCAL or multi-row INSERTs (``mysql_rows``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Select, Table, delete, event, func, literal_column, select
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ColumnElement
from sqlalchemy.types import TypeEngine

from patch_ops.dialects import mysql_rows, mysql_tls
from patch_ops.dialects.base import (
    ID_PAGE,
    DatabaseDialect,
    Features,
    StagedInserts,
    UnsupportedServer,
)
from patch_ops.dialects.mysql_rows import error_code
from patch_ops.dialects.mysql_timeouts import TIMEOUT_CODES, StatementWatchdog, kill_query
from patch_ops.dialects.names import table_sql

if TYPE_CHECKING:  # pandas is for the op processes: loading the code location skips it
    import pandas as pd

#: Seconds a statement waits for a row lock (InnoDB's default is 50) or a metadata lock (the
#: server's default is a year) before failing.
LOCK_WAIT_SECONDS = 60
METADATA_LOCK_WAIT_SECONDS = 600
SESSION_SETUP = (
    "SET SESSION sql_mode = 'TRADITIONAL', time_zone = '+00:00', "
    f"innodb_lock_wait_timeout = {LOCK_WAIT_SECONDS}, "
    f"lock_wait_timeout = {METADATA_LOCK_WAIT_SECONDS}, max_error_count = 65535"
)
#: Bytes an in-memory temporary table of a grouped join or a joined UPDATE may take before the
#: server moves it to disk; both servers' defaults are 16 MiB. A million groups of the price
#: patch's log check need 64-96 MiB on MariaDB, so this keeps ~3 million in memory.
GROUP_MEMORY = 256 << 20
#: The session's own values of the variables a pass changed, put back when the connection
#: returns to the pool (``None``: left as it was).
_SESSION_RESTORE = "stockrx_session_restore"
#: Session variables -> their value for a statement whose internal temporary tables must stay
#: in memory, from their current value (``group_once``, ``update_joined``).
_IN_MEMORY: dict[str, Callable[[Any], Any]] = {
    name: lambda size: max(int(size), GROUP_MEMORY)
    for name in ("tmp_table_size", "max_heap_table_size")
}
#: The first versions that enforce CHECK constraints (earlier ones parse and ignore them).
MIN_MYSQL = (8, 0, 16)
MIN_MARIADB = (10, 2, 1)

#: Access denied to a database (1044), a command on a table (1142) or column (1143), a
#: privilege needed (1227).
PRIVILEGE_ERRORS = frozenset({1044, 1142, 1143, 1227})
ER_LOCK_WAIT_TIMEOUT = 1205
ER_LOCK_DEADLOCK = 1213
#: Error numbers that are the server refusing a statement's data: NOT NULL (1048, 1364), unique
#: (1062, 1169, 1586), foreign keys (1216, 1217, 1451, 1452, 1557, 1761, 1762), out of range
#: (1264, 1690), truncated / wrong values (1265, 1292, 1366, 1367, 1411, 1406), division by zero
#: (1365), datetime overflow (1441), a trigger's SIGNAL (1644), invalid JSON (3140), CHECK (3819
#: MySQL, 4025 MariaDB).
DATA_REFUSALS = frozenset({
    1048, 1062, 1169, 1216, 1217, 1264, 1265, 1292, 1364, 1365, 1366, 1367, 1406, 1411, 1441,
    1451, 1452, 1557, 1586, 1644, 1690, 1761, 1762, 3140, 3819, 4025,
})
#: Lock waits, deadlocks, cancelled statements, lost connections, read-only servers: not a
#: verdict on the data.
NOT_DATA = frozenset({
    1040, 1053, 1205, 1213, 1290, 1792, 1927, 2003, 2006, 2013, 2055, *TIMEOUT_CODES,
})


def _set_session(values: dict[str, Any]) -> str:
    """``SET SESSION`` of the variables ``values`` names, their values as parameters."""
    return "SET SESSION " + ", ".join(f"{name} = %s" for name in values)


class MySQLDialect(DatabaseDialect):
    name = "mysql"
    features = Features(statement_timeout=True, ids_before_insert=False)

    # -- connections ---------------------------------------------------------------------------

    def delete_ids(self, conn: Connection, table: Table, ids: Select[Any]) -> int:
        """A multi-table DELETE joined to the ids: MariaDB runs ``id IN (SELECT expression
        ...)`` as a dependent subquery, scanning the ids once per row of the table (a restore of
        2,000 of 20,000 log rows: 32 s against 0.01 s joined)."""
        wanted = ids.subquery("wanted")
        return int(
            conn.execute(delete(table).where(table.c.id == list(wanted.c)[0])).rowcount
        )
    def engine_options(self) -> dict[str, Any]:
        return {
            **super().engine_options(),
            "pool_recycle": 3600,  # under the server's wait_timeout (8 h by default)
            "isolation_level": "READ COMMITTED",
        }

    def configure(self, engine: Engine) -> None:
        # The session is set up by the connection's init_command, before SQLAlchemy's first
        # look at it (its sql_mode decides how SQLAlchemy quotes); a URL that brings its own
        # init_command gets the set-up right after connecting instead.
        @event.listens_for(engine, "do_connect")
        def on_do_connect(dialect, record, cargs, cparams):  # type: ignore[no-untyped-def]
            cparams.setdefault("charset", "utf8mb4")
            if dialect.driver in mysql_rows.LOCAL_INFILE_DRIVERS:
                cparams.setdefault("local_infile", True)
            record.info["stockrx_session_set"] = "init_command" not in cparams
            cparams.setdefault("init_command", SESSION_SETUP)
            if dialect.driver == "pymysql":  # its TLS context made once per process
                return mysql_tls.connection_class()(*cargs, **cparams)
            return None

        @event.listens_for(engine, "connect")
        def on_connect(dbapi_conn, record):  # type: ignore[no-untyped-def]
            if not record.info.get("stockrx_session_set"):
                cursor = dbapi_conn.cursor()
                cursor.execute(SESSION_SETUP)
                cursor.close()

        @event.listens_for(engine, "checkin")
        def on_checkin(dbapi_conn, record):  # type: ignore[no-untyped-def]
            restore = record.info.pop(_SESSION_RESTORE, None) if record is not None else None
            changed = {name: v for name, v in (restore or {}).items() if v is not None}
            if changed and dbapi_conn is not None:
                try:
                    cursor = dbapi_conn.cursor()
                    cursor.execute(_set_session(changed), tuple(changed.values()))
                    cursor.close()
                except Exception:  # noqa: BLE001 - a broken connection: the pool drops it at its next use
                    record.invalidate()

    def check_server(self, conn: Connection) -> None:
        sa_dialect = conn.dialect
        version = tuple(sa_dialect.server_version_info or ())
        shown = ".".join(str(v) for v in version)
        if getattr(sa_dialect, "is_mariadb", False):
            if version < MIN_MARIADB:
                raise UnsupportedServer(
                    f"MariaDB {shown} is not supported: it does not enforce CHECK constraints "
                    "(10.2.1 and later do); upgrade the server"
                )
        elif version < MIN_MYSQL:
            raise UnsupportedServer(
                f"MySQL {shown} is not supported: it does not enforce CHECK constraints "
                "(8.0.16 and later do); upgrade the server"
            )

    def log_position(self, conn: Connection) -> str | None:
        """The executed GTID set (readable without privileges; SHOW BINARY LOG STATUS would need
        one). MariaDB: ``gtid_binlog_pos``; MySQL: ``gtid_executed`` (empty with gtid_mode OFF,
        MySQL 8's default: then None)."""
        name = "gtid_binlog_pos" if getattr(conn.dialect, "is_mariadb", False) else "gtid_executed"
        value = conn.exec_driver_sql(f"SELECT @@GLOBAL.{name}").scalar()
        return f"{name} {value}" if value else None

    def is_busy(self, exc: DBAPIError) -> bool:
        # a deadlock victim's transaction was rolled back whole: running it again may succeed
        return error_code(exc) == ER_LOCK_DEADLOCK

    def is_privilege_error(self, exc: DBAPIError) -> bool:
        return error_code(exc) in PRIVILEGE_ERRORS

    def is_data_refusal(self, exc: DBAPIError) -> bool:
        code = error_code(exc)
        if code in DATA_REFUSALS:
            return True
        if code in NOT_DATA:
            return False
        return super().is_data_refusal(exc)

    def is_lock_timeout(self, exc: DBAPIError) -> bool:
        return error_code(exc) == ER_LOCK_WAIT_TIMEOUT

    # -- bulk work -----------------------------------------------------------------------------
    def bulk_insert(self, conn: Connection, table: Table, df: pd.DataFrame) -> None:
        mysql_rows.bulk_insert(conn, table, df)

    def analyze(self, engine: Engine, tables: Sequence[Table]) -> None:
        """``ANALYZE TABLE`` (InnoDB samples a few pages: fast) in autocommit: it commits."""
        if not tables:
            return
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql(
                "ANALYZE TABLE " + ", ".join(table_sql(conn, t) for t in tables)
            ).all()

    def ids_sha256(self, conn: Connection, ids: Select[Any], prefix: bytes) -> tuple[int, str] | None:
        """The session's GROUP_CONCAT made long enough for a page first (a page cut short is
        refused, never hashed)."""
        conn.exec_driver_sql(
            f"SET SESSION group_concat_max_len = GREATEST(@@group_concat_max_len, {ID_PAGE * 8})"
        )
        return super().ids_sha256(conn, ids, prefix)

    def pack_ids(self, conn: Connection, ids: ColumnElement[Any]) -> ColumnElement[Any] | None:
        # HEX of a negative BIGINT is its 64-bit two's complement, as struct.pack(">q")
        i = str(ids.compile(dialect=conn.dialect))
        return literal_column(f"GROUP_CONCAT(UNHEX(LPAD(HEX({i}), 16, '0')) ORDER BY {i} SEPARATOR '')")

    # -- locks and limits ----------------------------------------------------------------------
    def lock_rows(self, conn: Connection, live: Table, ids: Select[Any]) -> None:
        # The server locks the rows it reads and sends one number.
        conn.execute(self.locking_join(live, ids))

    def locking_join(self, live: Table, ids: Select[Any]) -> Select[Any]:
        """``SELECT STRAIGHT_JOIN COUNT(*) FROM (ids) t JOIN live ON live.id = t.id FOR
        UPDATE``: the ids drive, each live row found by its primary key. Given ``id IN (ids)``
        over a target set as large as the table, the optimizer scanned ``live`` by its smallest
        index (a secondary one, ``name``) and locked each row there and in the primary key:
        1.9x the time (1M rows: 2.8 s against 1.4 s; benchmarks/README.md, session 33)."""
        t = ids.subquery("t")
        return (
            select(func.count())
            .select_from(t.join(live, live.c.id == list(t.c)[0]))
            .prefix_with("STRAIGHT_JOIN")
            .with_for_update()
        )

    def set_statement_timeout(self, conn: Connection, seconds: float) -> None:
        if seconds <= 0:
            return
        connection_id = conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar_one()
        dbapi_error = conn.dialect.loaded_dbapi.OperationalError
        StatementWatchdog(conn.engine, connection_id, seconds, dbapi_error).watch(conn)

    def is_statement_timeout(self, exc: DBAPIError) -> bool:
        return error_code(exc) in TIMEOUT_CODES

    def interrupt(self, conn: Connection) -> None:
        # the server's id of the connection, as its handshake gave it (no statement: in use)
        kill_query(conn.engine, conn.connection.driver_connection.thread_id())  # type: ignore[union-attr]

    def group_once(self, conn: Connection) -> None:
        # The grouped rows are an internal temporary table: on disk (a million groups) the
        # join's key lookups make the pass 6x as slow. MariaDB may instead group them again for
        # every outer row ("split materialized"): it chose that for verification's pass at a
        # million items, 10-12 s against 7 s (31 s once, right after the commit's bulk insert).
        wanted = dict(_IN_MEMORY)
        if getattr(conn.dialect, "is_mariadb", False):
            wanted["optimizer_switch"] = lambda _: "split_materialized=off"
        self._session_settings(conn, wanted)

    def update_joined(self, conn: Connection) -> None:
        # A multi-table UPDATE changes only the first table of its join order as it goes; with
        # the stage read first, the live rows' positions and new values wait in an internal
        # temporary table, on disk beyond 16 MiB (a million items: twice as slow).
        self._session_settings(conn, _IN_MEMORY)

    def _session_settings(self, conn: Connection, wanted: dict[str, Callable[[Any], Any]]) -> None:
        """Sets each session variable ``name`` of ``wanted`` (ours, never user input) on
        ``conn`` to ``wanted[name](its current value)``, once per checkout, in one read and one
        write; the session's own values return with the connection to the pool (the engine's
        checkin event, ``configure``)."""
        restore = conn.connection.info.setdefault(_SESSION_RESTORE, {})
        names = [name for name in wanted if name not in restore]
        if not names:
            return
        now = dict(zip(names, conn.exec_driver_sql(
            "SELECT " + ", ".join(f"@@session.{name}" for name in names)).one(), strict=True))
        changed = {name: v for name in names if (v := wanted[name](now[name])) != now[name]}
        if changed:
            conn.exec_driver_sql(_set_session(changed), tuple(changed.values()))
        restore.update({name: now[name] if name in changed else None for name in names})

    # -- ids -----------------------------------------------------------------------------------
    def reserve_insert_ids(self, conn: Connection, ins: StagedInserts) -> int | None:
        raise NotImplementedError(
            "MySQL hands out AUTO_INCREMENT ids only while inserting: use insert_staged"
        )

    def insert_staged(
        self, conn: Connection, ins: StagedInserts, columns: Sequence[str]
    ) -> tuple[int, int | None]:
        return mysql_rows.insert_staged(conn, ins, columns)

    # -- types ---------------------------------------------------------------------------------
    def utc_datetime_type(self) -> TypeEngine[Any]:
        return mysql.DATETIME(fsp=6)


class MariaDBDialect(MySQLDialect):
    """The same implementation under SQLAlchemy's name for ``mariadb+...`` URLs."""

    name = "mariadb"
