"""Rows into MySQL/MariaDB tables, fast and with known ids.

**Bulk loads** (stage batches, demo data): ``LOAD DATA LOCAL INFILE`` from a tab-separated file
when the client and the server both allow it (``@@local_infile``; MySQL 8 servers ship with it
off), else multi-row INSERTs (the driver's ``executemany`` packs the rows into statements of up to
~1 MB). With ``LOCAL`` the server cannot stop the client mid-file, so it turns data errors into
warnings even in strict mode (a 'too long' string would be cut, an out-of-range number clipped):
a load that leaves any warning (notes, such as rounding 2.005 to 2.01, are what INSERT does too)
is rolled back to its savepoint and the rows go in by INSERT, where strict mode refuses them.

**Staged inserts at commit**: the ids of the rows the commit inserts must be known exactly, with
no DDL on the application's tables. InnoDB hands AUTO_INCREMENT values out during the insert:
under ``innodb_autoinc_lock_mode=2`` (MySQL 8's default) an ``INSERT ... SELECT`` (a "bulk
insert": row count unknown in advance) takes them a few at a time, interleaved with concurrent
inserts of the application; a multi-row ``INSERT ... VALUES`` (a "simple insert": row count
known) reserves all its values at once, so its rows get ``first, first + step, ...`` in the
order written, ``first`` being the statement's ``LAST_INSERT_ID()`` (the driver's
``lastrowid``) and ``step`` ``@@auto_increment_increment``. So the staged rows are read in
``dp_seq`` order and written back in chunks of multi-row INSERTs (values travel as the driver
read them: no type conversion in between).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import pandas as pd
from sqlalchemy import Integer, Table, bindparam, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from patch_ops.dialects.base import StagedInserts
from patch_ops.frames import copy_text, plain_rows

#: Drivers whose connections can send a local file (their ``local_infile`` connect argument).
LOCAL_INFILE_DRIVERS = ("pymysql", "mysqldb")
#: The client flag CLIENT.LOCAL_FILES.
_CLIENT_LOCAL_FILES = 128
#: LOAD DATA LOCAL refused: not allowed (1148), disabled on MySQL 8 (3948) or MariaDB (4166).
LOCAL_INFILE_REFUSED = frozenset({1148, 3948, 4166})
_READY = "stockrx_local_infile"  # per DBAPI connection: can it LOAD DATA LOCAL?
ROWCOUNT = {"preserve_rowcount": True}
#: Staged inserts: rows read per chunk, and the most bytes of values in one INSERT.
CHUNK_ROWS = 2_000
CHUNK_BYTES = 2 << 20


def error_code(exc: DBAPIError) -> int | None:
    """The server's error number of a PyMySQL / mysqlclient error."""
    args = getattr(exc.orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


# -- bulk loads ----------------------------------------------------------------------------------
def bulk_insert(conn: Connection, table: Table, df: pd.DataFrame) -> None:
    """A frame's rows into ``table`` in ``conn``'s transaction, as fast as the server allows."""
    if df.empty:
        return
    if not load_data(conn, table, df):
        insert_rows(conn, table, df)


def insert_rows(conn: Connection, table: Table, df: pd.DataFrame) -> None:
    """Multi-row INSERTs (``executemany`` of plain tuples; the driver packs them)."""
    cols, rows = plain_rows(df)
    q = conn.dialect.identifier_preparer
    names = ", ".join(q.quote(c) for c in cols).replace("%", "%%")
    marks = ", ".join(["%s"] * len(cols))
    sql = f"INSERT INTO {q.format_table(table).replace('%', '%%')} ({names}) VALUES ({marks})"
    conn.exec_driver_sql(sql, rows)  # type: ignore[arg-type]


def local_infile_ready(conn: Connection) -> bool:
    """Both ends allow LOAD DATA LOCAL (asked once per connection)."""
    if conn.dialect.driver not in LOCAL_INFILE_DRIVERS:
        return False
    info = conn.connection.info
    if _READY not in info:
        client = getattr(conn.connection.dbapi_connection, "client_flag", _CLIENT_LOCAL_FILES)
        server = conn.exec_driver_sql("SELECT @@local_infile").scalar()
        info[_READY] = bool(client & _CLIENT_LOCAL_FILES) and bool(int(server or 0))
    return bool(info[_READY])


def tsv_text(table: Table, df: pd.DataFrame) -> str | None:
    """The frame as LOAD DATA's default text format (the same escapes as PostgreSQL's COPY
    text; booleans as 1/0), or None when a column holds something that format does not cover."""
    df = df.copy(deep=False)
    for c in df.columns:
        if pd.api.types.is_bool_dtype(df[c].dtype):
            df[c] = df[c].astype("Int8")
    integers = {str(c) for c in df.columns if isinstance(table.c[str(c)].type, Integer)}
    return copy_text(df, integers)


def load_data(conn: Connection, table: Table, df: pd.DataFrame) -> bool:
    """LOAD DATA LOCAL INFILE the frame; False (nothing loaded) when it cannot be used or when the
    server warned about a value (the caller then INSERTs, and strict mode says what is wrong)."""
    if not local_infile_ready(conn):
        return False
    text = tsv_text(table, df)
    if text is None:
        return False
    q = conn.dialect.identifier_preparer
    cols = ", ".join(q.quote(str(c)) for c in df.columns)
    rest = (
        f" INTO TABLE {q.format_table(table)} CHARACTER SET utf8mb4"
        r" FIELDS TERMINATED BY '\t' ESCAPED BY '\\' LINES TERMINATED BY '\n'"
        f" ({cols})"
    )
    fd, path = tempfile.mkstemp(prefix="stockrx-", suffix=".tsv")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        savepoint = conn.begin_nested()
        try:
            res = conn.exec_driver_sql(
                "LOAD DATA LOCAL INFILE %s" + rest.replace("%", "%%"), (path,),
                execution_options=ROWCOUNT,
            )
        except DBAPIError as exc:
            savepoint.rollback()
            if error_code(exc) in LOCAL_INFILE_REFUSED:
                conn.connection.info[_READY] = False
                return False
            raise
        if res.rowcount == len(df) and only_notes(conn):
            savepoint.commit()
            return True
        savepoint.rollback()
        return False
    finally:
        os.unlink(path)


def only_notes(conn: Connection) -> bool:
    """The last statement left no warning or error (notes aside)."""
    count = int(conn.exec_driver_sql("SELECT @@warning_count").scalar() or 0)
    if not count:
        return True
    shown = conn.exec_driver_sql("SHOW WARNINGS").all()
    return len(shown) == count and all(str(r[0]) == "Note" for r in shown)


# -- staged inserts ------------------------------------------------------------------------------
def insert_staged(
    conn: Connection, ins: StagedInserts, columns: Sequence[str]
) -> tuple[int, int | None]:
    """The staged rows ``ins`` into the live table by multi-row INSERT ... VALUES in ``dp_seq``
    order; their ids from each statement's first id. Returns (rows, offset | None) as
    ``DatabaseDialect.insert_staged``."""
    st, live = ins.stage, ins.live
    step = int(conn.exec_driver_sql("SELECT @@auto_increment_increment").scalar() or 1)
    q = conn.dialect.identifier_preparer
    names = ", ".join(q.quote(c) for c in columns)
    head = f"INSERT INTO {q.format_table(live)} ({names}) VALUES ".replace("%", "%%")
    one = "(" + ", ".join(["%s"] * len(columns)) + ")"
    picked = select(st.c.dp_seq, *[st.c[c] for c in columns]).order_by(st.c.dp_seq)
    blocks: list[tuple[list[int], int]] = []  # (dp_seq of the rows, id of the first)
    after, total = ins.first - 1, 0
    while True:
        chunk = picked.where(ins.where, st.c.dp_seq > after).limit(CHUNK_ROWS)
        sql = str(chunk.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
        rows = conn.exec_driver_sql(sql).all()  # the driver's values, unconverted
        if not rows:
            break
        for part in by_size(rows):
            values = tuple(v for row in part for v in row[1:])
            res = conn.exec_driver_sql(
                head + ", ".join([one] * len(part)), values, execution_options=ROWCOUNT
            )
            if res.rowcount != len(part) or not res.lastrowid:
                raise RuntimeError(
                    f"inserting {len(part)} staged rows into {live.name} inserted "
                    f"{res.rowcount} (first id {res.lastrowid})"
                )
            blocks.append(([int(r[0]) for r in part], int(res.lastrowid)))
            total += len(part)
        after = rows[-1][0]
    return total, record_ids(conn, ins, blocks, step)


def by_size(rows: Sequence[Any]) -> list[Sequence[Any]]:
    """Rows in parts whose values hold at most ~CHUNK_BYTES (one statement each)."""
    parts, start, size = [], 0, 0
    for i, row in enumerate(rows):
        n = sum(len(v) if isinstance(v, str | bytes) else 8 for v in row)
        if size and size + n > CHUNK_BYTES:
            parts.append(rows[start:i])
            start, size = i, 0
        size += n
    parts.append(rows[start:])
    return parts


def record_ids(
    conn: Connection, ins: StagedInserts, blocks: list[tuple[list[int], int]], step: int
) -> int | None:
    """The offset when every inserted row's id is ``dp_seq + offset``; else write each row's id
    to the stage's ``id`` column and return None."""
    unbroken = [step == 1 and seqs[-1] - seqs[0] + 1 == len(seqs) for seqs, _ in blocks]
    offsets = {first - seqs[0] for seqs, first in blocks}
    if blocks and all(unbroken) and len(offsets) == 1:
        return offsets.pop()
    st = ins.stage
    for (seqs, first), plain in zip(blocks, unbroken, strict=True):
        if plain:
            conn.execute(
                update(st)
                .where(ins.where, st.c.dp_seq.between(seqs[0], seqs[-1]))
                .values(id=st.c.dp_seq + (first - seqs[0]))
            )
        else:
            conn.execute(
                update(st)
                .where(ins.where, st.c.dp_seq == bindparam("seq"))
                .values(id=bindparam("new_id")),
                [{"seq": s, "new_id": first + k * step} for k, s in enumerate(seqs)],
            )
    return None
