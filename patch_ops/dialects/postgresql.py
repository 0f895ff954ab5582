"""PostgreSQL (psycopg 3): COPY for bulk rows, the table's own sequence for new ids,
transaction-local statement timeouts, ANALYZE after bulk loads."""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Integer,
    LargeBinary,
    Select,
    Table,
    cast,
    func,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import OID, REGCLASS, aggregate_order_by
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ColumnElement

from patch_ops.dialects.base import DatabaseDialect, Features, StagedInserts, locking_select
from patch_ops.dialects.names import table_sql
from patch_ops.frames import copy_text, plain_rows

if TYPE_CHECKING:  # pandas is for the op processes: loading the code location skips it
    import pandas as pd


class PostgreSQLDialect(DatabaseDialect):
    name = "postgresql"
    features = Features(statement_timeout=True, stores_utc_offset=True)

    def bulk_insert(self, conn: Connection, table: Table, df: pd.DataFrame) -> None:
        """COPY on psycopg 3 (the COPY text built column-wise by frames.copy_text; the
        driver's row-by-row formatting only for the dtypes it does not cover); executemany on
        other drivers."""
        if conn.dialect.driver != "psycopg":
            super().bulk_insert(conn, table, df)
            return
        q = conn.dialect.identifier_preparer
        cols = [str(c) for c in df.columns]
        sql = f"COPY {table_sql(conn, table)} ({', '.join(q.quote(c) for c in cols)}) FROM STDIN"
        data = copy_text(df, {c for c in cols if isinstance(table.c[c].type, Integer)})
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            with cursor.copy(sql) as copy:
                if data is not None:
                    copy.write(data)
                else:
                    for row in plain_rows(df)[1]:
                        copy.write_row(row)
        finally:
            cursor.close()

    def load_frame(self, engine: Engine, table: Table, df: pd.DataFrame) -> None:
        """COPY in CSV-like text written by pandas, 1 MB at a time, committed on its own."""
        if engine.dialect.driver != "psycopg":
            super().load_frame(engine, table, df)
            return
        buf = io.StringIO()
        df.to_csv(buf, index=False, header=False, na_rep="\\N", sep="\t",
                  date_format="%Y-%m-%d %H:%M:%S")
        buf.seek(0)
        q = engine.dialect.identifier_preparer
        cols = ", ".join(q.quote(str(c)) for c in df.columns)
        raw = engine.raw_connection()
        try:
            with raw.cursor() as cur:  # type: ignore[attr-defined]  # psycopg 3 cursor
                sql = f"COPY {table_sql(engine, table)} ({cols}) FROM STDIN WITH (FORMAT text)"
                with cur.copy(sql) as cp:
                    while chunk := buf.read(1 << 20):
                        cp.write(chunk)
            raw.commit()
        finally:
            raw.close()

    def reset_id_sequences(self, conn: Connection, tables: Iterable[Table]) -> None:
        for t in tables:
            conn.execute(
                select(
                    func.setval(
                        func.pg_get_serial_sequence(literal(t.name), literal("id")),
                        select(func.coalesce(func.max(t.c.id), 1)).scalar_subquery(),
                    )
                )
            )

    def analyze(self, engine: Engine, tables: Sequence[Table]) -> None:
        """Without fresh statistics the planner takes new mirror rows for a handful and joins
        them with nested loops (quadratic)."""
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            for t in tables:
                conn.exec_driver_sql(f"ANALYZE {table_sql(conn, t)}")

    def pack_ids(self, conn: Connection, ids: ColumnElement[Any]) -> ColumnElement[Any] | None:
        # int8send: the 8-byte big-endian form
        empty = cast(literal(b""), LargeBinary)
        return func.string_agg(func.int8send(ids), aggregate_order_by(empty, ids))

    def log_position(self, conn: Connection) -> str | None:
        # the insert position (not the write position, which moves a page at a time)
        return str(conn.execute(select(func.pg_current_wal_insert_lsn())).scalar_one())

    def lock_rows(self, conn: Connection, live: Table, ids: Select[Any]) -> None:
        # The server locks every row as it reads it and sends back one count, not the ids
        # (sending 1M ids to the client cost ~8 s of the commit at 1M rows).
        conn.execute(select(func.count()).select_from(locking_select(live, ids).subquery()))

    def set_statement_timeout(self, conn: Connection, seconds: float) -> None:
        ms = int(seconds * 1000)
        if ms > 0:
            conn.execute(select(func.set_config("statement_timeout", str(ms), True)))

    def is_statement_timeout(self, exc: DBAPIError) -> bool:
        return "statement timeout" in str(exc.orig)

    def interrupt(self, conn: Connection) -> None:
        conn.connection.driver_connection.cancel_safe()  # type: ignore[union-attr]

    def group_once(self, conn: Connection) -> None:
        # No parallel workers: under a parallel join every worker computes the grouped side
        # again in full (a join of 200k rows onto 200k grouped log rows: the HashAggregate 3
        # times, each spilling at work_mem), for the same wall time as one process
        self.one_process(conn)

    def one_process(self, conn: Connection) -> None:
        conn.execute(select(func.set_config("max_parallel_workers_per_gather", "0", True)))

    def narrow_key(self, conn: Connection, table: Table, column: str) -> None:
        # Locked first, then looked at: another process may have converted it meanwhile. The
        # rewrite rebuilds the table's indexes; the application's tables are not touched.
        name, q = table_sql(conn, table), conn.dialect.identifier_preparer.quote(column)
        conn.exec_driver_sql(f"LOCK TABLE {name} IN ACCESS EXCLUSIVE MODE")
        now = conn.execute(
            text("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                 "WHERE attrelid = CAST(:t AS REGCLASS) AND attname = :c"),
            {"t": name, "c": column},
        ).scalar_one()
        if now != "uuid":
            conn.exec_driver_sql(f"ALTER TABLE {name} ALTER COLUMN {q} TYPE uuid USING {q}::uuid")

    def check_deferred_constraints(self, conn: Connection) -> None:
        conn.execute(text("SET CONSTRAINTS ALL IMMEDIATE"))

    def _id_sequence(self, conn: Connection, live: Table) -> ColumnElement[Any]:
        """The sequence of ``live``'s ``id`` as a constant (its OID, looked up once): given
        ``pg_get_serial_sequence(...)``, ``nextval`` looks the sequence up again for every
        value it draws, 9x the time of the draw itself (benchmarks/README.md, session 29)."""
        found = cast(func.pg_get_serial_sequence(literal(live.name), literal("id")), REGCLASS)
        oid = conn.execute(select(cast(found, OID))).scalar_one()
        if oid is None:
            raise ValueError(f"{live.name}.id has no sequence to draw new ids from: make it a "
                             "serial or identity column")
        return cast(literal(oid, OID), REGCLASS)

    def reserve_insert_ids(self, conn: Connection, ins: StagedInserts) -> int | None:
        # The table's own sequence, one value per dp_seq of the span. Other sessions may take
        # values meanwhile: if the values drawn are one unbroken block, id = dp_seq + offset;
        # else the k-th smallest value goes to the k-th row by dp_seq, written to the stage.
        st = ins.stage
        seq = func.nextval(self._id_sequence(conn, ins.live))
        fresh = select(seq.label("id")).select_from(func.generate_series(1, ins.span)).subquery()
        low, high = conn.execute(select(func.min(fresh.c.id), func.max(fresh.c.id))).one()
        if high - low + 1 == ins.span:
            return int(low) - ins.first
        fresh = select(seq.label("id")).select_from(func.generate_series(1, ins.count)).subquery()
        ranked_ids = select(
            fresh.c.id, func.row_number().over(order_by=fresh.c.id).label("rn")
        ).subquery()
        ranked_rows = (
            select(st.c.dp_seq, func.row_number().over(order_by=st.c.dp_seq).label("rn"))
            .where(ins.where)
            .subquery()
        )
        pairs = (
            select(ranked_rows.c.dp_seq, ranked_ids.c.id)
            .join_from(ranked_rows, ranked_ids, ranked_rows.c.rn == ranked_ids.c.rn)
            .subquery()
        )
        conn.execute(
            update(st).where(ins.where, st.c.dp_seq == pairs.c.dp_seq).values(id=pairs.c.id)
        )
        return None
