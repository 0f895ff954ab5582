"""SQLite: one writer at a time (no row locks), WAL, no planner statistics to refresh."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, event, func, select, text
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ColumnElement

from patch_ops.dialects.base import DatabaseDialect, Features, StagedInserts
from patch_ops.dialects.names import table_sql

if TYPE_CHECKING:  # pandas is for the op processes: loading the code location skips it
    import pandas as pd


class SQLiteDialect(DatabaseDialect):
    name = "sqlite"
    features = Features(row_locks=False, snapshot_isolation=False, schemas=False)

    def engine_options(self) -> dict[str, Any]:
        return {}

    def not_a_number(self, column: ColumnElement[Any]) -> ColumnElement[bool] | None:
        return func.typeof(column).notin_(["integer", "real", "null"])

    def missing_database(self, url: URL) -> str | None:
        """Connecting creates a missing file: a mistyped path would get an empty database."""
        path = url.database or ""
        if not path or path == ":memory:" or path.startswith("file:") or Path(path).exists():
            return None
        return (
            f"the SQLite file {path} does not exist (a mistyped path? "
            "`stockrx-patches seed-demo` creates a demo database)"
        )

    def configure(self, engine: Engine) -> None:
        # pysqlite's own transaction handling is replaced by explicit BEGINs. Reads use a
        # deferred BEGIN (WAL: readers never block). Write transactions
        # (patch_ops.database.write_transaction) take the write lock up front with BEGIN
        # IMMEDIATE and wait for it, instead of failing at once with "database is locked" when a
        # read lock cannot be upgraded.
        @event.listens_for(engine, "connect")
        def on_connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys = ON")
            cur.execute("PRAGMA busy_timeout = 60000")
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def on_begin(conn):  # type: ignore[no-untyped-def]
            mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
            conn.exec_driver_sql(f"BEGIN {'IMMEDIATE' if mode == 'IMMEDIATE' else 'DEFERRED'}")

    def is_busy(self, exc: DBAPIError) -> bool:
        reason = str(exc.orig).lower()
        return "database is locked" in reason or "database is busy" in reason

    def load_frame(self, engine: Engine, table: Table, df: pd.DataFrame) -> None:
        """executemany of plain tuples in SQLAlchemy's SQLite storage formats (datetimes as
        ``YYYY-MM-DD HH:MM:SS.ffffff``, dates as ISO text): no per-value type processing."""
        import numpy as np
        import pandas as pd

        df = df.copy()
        for col in df.columns:
            if pd.api.types.is_datetime64_any_dtype(df[col]):
                iso = np.datetime_as_string(df[col].to_numpy(dtype="datetime64[us]"), unit="us")
                df[col] = pd.Series(iso, index=df.index).str.replace("T", " ", regex=False)
            elif df[col].dtype == object:
                df[col] = [v.isoformat() if hasattr(v, "isoformat") else v for v in df[col]]
        df = df.astype(object).where(df.notna(), None)
        q = engine.dialect.identifier_preparer
        cols = [str(c) for c in df.columns]
        marks = ", ".join("?" * len(cols))
        with engine.begin() as conn:
            conn.exec_driver_sql(
                f"INSERT INTO {table_sql(engine, table)} ({', '.join(q.quote(c) for c in cols)}) "
                f"VALUES ({marks})",
                list(df.itertuples(index=False, name=None)),
            )

    def reserve_insert_ids(self, conn: Connection, ins: StagedInserts) -> int | None:
        # The writer lock is held: the ids after the largest in the table and, for an
        # AUTOINCREMENT table, after the largest it ever handed out (sqlite_sequence).
        base = conn.execute(select(func.coalesce(func.max(ins.live.c.id), 0))).scalar_one()
        has_seq = conn.execute(
            text("SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_sequence'")
        ).scalar_one()
        if has_seq:
            seq_val = conn.execute(
                text("SELECT seq FROM sqlite_sequence WHERE name = :n"), {"n": ins.live.name}
            ).scalar()
            base = max(base, seq_val or 0)
        return int(base) + 1 - ins.first
