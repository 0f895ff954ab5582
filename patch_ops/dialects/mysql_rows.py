"""Rows into MySQL/MariaDB tables, fast and with known ids.

**Bulk loads** (stage batches, demo data): ``LOAD DATA LOCAL INFILE`` from a tab-separated file
when the client and the server both allow it (``@@local_infile``; MySQL 8 servers ship with it
off), else multi-row INSERTs (the driver's ``executemany`` packs the rows into statements of up to
~1 MB). With ``LOCAL`` the server cannot stop the client mid-file, so it turns data errors into
warnings even in strict mode (a 'too long' string would be cut, an out-of-range number clipped):
a load that leaves any warning (notes, such as rounding 2.005 to 2.01, are what INSERT does too)
is rolled back to its savepoint and the rows go in by INSERT, where strict mode refuses them.

**Staged inserts at commit**: the ids of the rows the commit inserts must be known exactly, with
no DDL on the application's tables. InnoDB hands AUTO_INCREMENT values out during the insert,
ascending within a statement in the order it writes the rows (``ORDER BY``).

- Under ``innodb_autoinc_lock_mode=2`` (MySQL 8's default, "interleaved") an ``INSERT ... SELECT``
  holds no table lock: its ids interleave with the application's concurrent inserts. So the rows
  go in by one ``INSERT ... SELECT ... ORDER BY dp_seq`` and their ids are found afterwards: from
  the statement's first id (``LAST_INSERT_ID()``) on, the rows this transaction sees (its own,
  uncommitted, and what others committed) that another connection, which cannot see ours, does
  not (``insert_selected``).
- Under lock modes 0 and 1 (MariaDB's default) an ``INSERT ... SELECT`` would hold the table's
  AUTO-INC lock, stopping the application's inserts, for the whole statement; a multi-row
  ``INSERT ... VALUES`` (a "simple insert": row count known) reserves its values at once and
  briefly, ``first, first + step, ...`` in the order written, ``first`` being the statement's
  ``LAST_INSERT_ID()`` and ``step`` ``@@auto_increment_increment``. So the staged rows are read
  in ``dp_seq`` order, each as the SQL text of its values made by the server, and sent back in
  chunks of multi-row INSERTs (``insert_values``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Integer,
    LargeBinary,
    Table,
    func,
    insert,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from patch_ops.dialects.base import StagedInserts
from patch_ops.dialects.names import table_sql
from patch_ops.frames import copy_text, plain_rows

if TYPE_CHECKING:  # pandas is for the op processes: loading the code location skips it
    import pandas as pd

#: Drivers whose connections can send a local file (their ``local_infile`` connect argument).
LOCAL_INFILE_DRIVERS = ("pymysql", "mysqldb")
#: The client flag CLIENT.LOCAL_FILES.
_CLIENT_LOCAL_FILES = 128
#: LOAD DATA LOCAL refused: not allowed (1148), disabled on MySQL 8 (3948) or MariaDB (4166).
LOCAL_INFILE_REFUSED = frozenset({1148, 3948, 4166})
_READY = "stockrx_local_infile"  # per DBAPI connection: can it LOAD DATA LOCAL?
_LOCK_MODE = "stockrx_autoinc_lock_mode"  # per DBAPI connection: the server's lock mode
ROWCOUNT = {"preserve_rowcount": True}
#: Staged inserts: rows per INSERT statement (fewer when they do not fit in a packet).
CHUNK_ROWS = 5_000
#: Staged inserts under lock mode 2: how many times the application's rows among ours are looked
#: for before giving up (each look finds the rows it committed since the last one).
APP_ROW_LOOKS = 20


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
    sql = f"INSERT INTO {table_sql(conn, table).replace('%', '%%')} ({names}) VALUES ({marks})"
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
    import pandas as pd  # op processes only

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
        f" INTO TABLE {table_sql(conn, table)} CHARACTER SET utf8mb4"
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
def row_literal(conn: Connection, stage: Table, columns: Sequence[str]) -> str:
    """SQL that makes, server-side, each stage row's values as the text of one VALUES tuple:
    ``('a', '1.50', NULL)``. ``QUOTE()`` writes a safe literal of any value in the session's
    sql_mode (ours: backslash escapes on); binary values go as ``X'..'`` hex, BIT as numbers;
    every literal converted to utf8mb4 so columns of other character sets concatenate."""
    q = conn.dialect.identifier_preparer
    parts = []
    for name in columns:
        col, type_ = q.format_column(stage.c[name]), stage.c[name].type
        if isinstance(type_, mysql.BIT):
            parts.append(f"IFNULL(CAST({col} AS UNSIGNED), 'NULL')")
        elif isinstance(type_, LargeBinary | mysql.BINARY | mysql.VARBINARY):
            parts.append(f"IF({col} IS NULL, 'NULL', CONCAT('X''', HEX({col}), ''''))")
        else:
            parts.append(f"IFNULL(CONVERT(QUOTE({col}) USING utf8mb4), 'NULL')")
    return "CONCAT('(', " + ", ',', ".join(parts) + ", ')')"


def run_text(conn: Connection, sql: str) -> tuple[Any, int, int]:
    """Run SQL text holding literal values (no parameters) in ``conn``'s transaction, through
    SQLAlchemy so the connection's events see it (the statement watchdog of
    ``mysql_timeouts``). The driver formats every statement with ``%``, parameters or none:
    each ``%`` of the text is doubled. Returns (first row, rowcount, lastrowid); an error shows
    the statement's first 300 characters, not megabytes of values."""
    try:
        result = conn.exec_driver_sql(sql.replace("%", "%%"), execution_options=ROWCOUNT)
    except DBAPIError as exc:
        exc.statement = (exc.statement or "")[:300]
        raise
    row = result.fetchone() if result.returns_rows else None
    return row, result.rowcount, result.lastrowid


def insert_staged(
    conn: Connection, ins: StagedInserts, columns: Sequence[str]
) -> tuple[int, int | None]:
    """The staged rows ``ins`` into the live table, their ids known exactly; returns (rows,
    offset | None) as ``DatabaseDialect.insert_staged``. One ``INSERT ... SELECT`` under lock
    mode 2, multi-row ``INSERT ... VALUES`` under modes 0 and 1 (see the module's docstring)."""
    if autoinc_lock_mode(conn) == 2:
        return insert_selected(conn, ins, columns)
    return insert_values(conn, ins, columns)


def autoinc_lock_mode(conn: Connection) -> int:
    """The server's ``innodb_autoinc_lock_mode`` (asked once per connection)."""
    info = conn.connection.info
    if _LOCK_MODE not in info:
        info[_LOCK_MODE] = int(conn.exec_driver_sql("SELECT @@innodb_autoinc_lock_mode").scalar_one())
    return int(info[_LOCK_MODE])


def insert_selected(
    conn: Connection, ins: StagedInserts, columns: Sequence[str]
) -> tuple[int, int | None]:
    """The staged rows ``ins`` by one ``INSERT ... SELECT ... ORDER BY dp_seq``, then their ids.

    The statement's rows have ascending ids from its first (``lastrowid``); the application's
    rows inserted meanwhile may take ids between them (lock mode 2), and may be committed by now.
    Ours are the ids from the first on that this transaction sees and another connection does
    not (it sees only committed rows). It looks after this transaction did, so it finds every
    row of the application this transaction saw; until it finds none it had not found before,
    this transaction looks again without them. Only plain reads of the live table: no lock on
    the application's rows. Returns the offset when the ids are ``dp_seq + offset``; else writes
    each row's id to the stage's ``id`` column, the k-th id to the k-th ``dp_seq``, by ranges."""
    st, live = ins.stage, ins.live
    source = select(*[st.c[c] for c in columns]).where(ins.where).order_by(st.c.dp_seq)
    res = conn.execute(insert(live).from_select(list(columns), source), execution_options=ROWCOUNT)
    n, first = res.rowcount, res.lastrowid
    if n != ins.count or not first:
        raise RuntimeError(
            f"inserting {ins.count} staged rows into {live.name} inserted {n} (first id {first})"
        )
    step = int(conn.exec_driver_sql("SELECT @@auto_increment_increment").scalar() or 1)
    seq_runs = (
        [(ins.first, n)] if ins.span == n else runs(conn, st.c.dp_seq, [ins.where], 1, None)
    )
    theirs: set[int] = set()
    for _ in range(APP_ROW_LOOKS):
        where = [live.c.id >= first] + ([live.c.id.not_in(sorted(theirs))] if theirs else [])
        seen, top = conn.execute(select(func.count(), func.max(live.c.id)).where(*where)).one()
        if seen == n and top == first + (n - 1) * step:  # only ours, one run: no ranking
            id_runs = [(first, n)]
        else:
            id_runs = runs(conn, live.c.id, where, step, n)
        if sum(k for _, k in id_runs) != n or id_runs[0][0] != first:
            raise RuntimeError(f"{n} rows inserted into {live.name} from id {first}, but "
                               f"{sum(k for _, k in id_runs)} found from {id_runs[0][0]}")
        last = id_runs[-1][0] + (id_runs[-1][1] - 1) * step
        with conn.engine.connect() as other:  # sees committed rows only: not ours
            found = set(other.execute(
                select(live.c.id).where(live.c.id.between(first, last))
            ).scalars())
        if found <= theirs:  # the ids are settled: recorded once
            return n, record_ids(conn, ins, seq_runs, id_runs, step)
        theirs |= found
    raise RuntimeError(
        f"the application kept committing rows among the {n} inserted into {live.name}; "
        "their ids are not known"
    )


def runs(
    conn: Connection, col: Any, where: list[Any], step: int, limit: int | None
) -> list[tuple[int, int]]:
    """The ascending values of ``col`` (the first ``limit`` of them) where ``where`` holds, as
    runs (first value, length) of values ``step`` apart. A plain read: no row lock."""
    values = select(col.label("v")).where(*where).order_by(col)
    if limit is not None:
        values = values.limit(limit)
    v = values.subquery("v")
    keyed = select(
        v.c.v, (v.c.v - func.row_number().over(order_by=v.c.v) * step).label("run")
    ).subquery("keyed")
    q = select(func.min(keyed.c.v), func.count()).group_by(keyed.c.run).order_by(func.min(keyed.c.v))
    return [(int(a), int(k)) for a, k in conn.execute(q)]


def matched_ranges(
    seq_runs: list[tuple[int, int]], id_runs: list[tuple[int, int]], step: int
) -> list[tuple[int, int, int]]:
    """The k-th ``dp_seq`` paired with the k-th id, as ranges (low seq, high seq, shift) over
    which ``id = dp_seq * step + shift``: cut wherever either sequence has a gap."""
    out: list[tuple[int, int, int]] = []
    i = j = 0
    seq, left_s = seq_runs[0]
    ident, left_i = id_runs[0]
    while True:
        k = min(left_s, left_i)
        shift = ident - seq * step
        if out and out[-1][2] == shift and out[-1][1] + 1 == seq:  # continues the last range
            out[-1] = (out[-1][0], seq + k - 1, shift)
        else:
            out.append((seq, seq + k - 1, shift))
        seq, left_s, ident, left_i = seq + k, left_s - k, ident + k * step, left_i - k
        if not left_s:
            i += 1
            if i == len(seq_runs):
                return out
            seq, left_s = seq_runs[i]
        if not left_i:
            j += 1
            ident, left_i = id_runs[j]


def insert_values(
    conn: Connection, ins: StagedInserts, columns: Sequence[str]
) -> tuple[int, int | None]:
    """The staged rows ``ins`` into the live table by multi-row INSERT ... VALUES in ``dp_seq``
    order; their ids from each statement's first id. Returns (rows, offset | None) as
    ``DatabaseDialect.insert_staged``.

    The server writes each row's values as SQL text (``row_literal``) and joins a chunk of them
    into one string (GROUP_CONCAT): one value per chunk crosses to the client and goes back as
    the INSERT, unparsed and unescaped (reading 100k rows one by one cost more than inserting
    them). A chunk whose text would not fit a packet is halved."""
    st, live = ins.stage, ins.live
    step, packet = conn.exec_driver_sql(
        "SELECT @@auto_increment_increment, @@max_allowed_packet"
    ).one()
    room = min(int(packet) - (64 << 10), 256 << 20)  # the INSERT's head fits in what is left
    conn.exec_driver_sql(f"SET SESSION group_concat_max_len = {room}")
    q = conn.dialect.identifier_preparer
    names = ", ".join(q.quote(c) for c in columns)
    head = f"INSERT INTO {table_sql(conn, live)} ({names}) VALUES "
    text: Any = literal_column(row_literal(conn, st, columns)).label("txt")
    seq_runs: list[tuple[int, int]] = []  # the rows' dp_seq, as runs (first, length)
    id_runs: list[tuple[int, int]] = []  # their ids: a statement's from its first, step apart
    after, total, rows = ins.first - 1, 0, CHUNK_ROWS
    while True:
        chunk = (
            select(st.c.dp_seq, text)
            .where(ins.where, st.c.dp_seq > after)
            .order_by(st.c.dp_seq)
            .limit(rows)
            .subquery("chunk")
        )
        joined: Any = select(
            func.count(),
            func.min(chunk.c.dp_seq),
            func.max(chunk.c.dp_seq),
            func.sum(func.char_length(chunk.c.txt)),
            literal_column("GROUP_CONCAT(chunk.txt ORDER BY chunk.dp_seq SEPARATOR ',')"),
            literal_column("GROUP_CONCAT(chunk.dp_seq ORDER BY chunk.dp_seq)"),
        )
        sql = str(joined.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
        n, low, high, chars, values, seq_text = run_text(conn, sql)[0]
        if not n:
            break
        values = values.decode() if isinstance(values, bytes) else values
        if len(values) != int(chars) + n - 1:  # cut at group_concat_max_len
            if rows == 1:
                raise RuntimeError(f"a staged row of {live.name} does not fit in one statement")
            rows = max(1, rows // 2)
            continue
        _, count, first_id = run_text(conn, head + values)
        if count != n or not first_id:
            raise RuntimeError(
                f"inserting {n} staged rows into {live.name} inserted {count} "
                f"(first id {first_id})"
            )
        if int(high) - int(low) + 1 == n:
            seq_runs.append((int(low), n))
        else:
            seq_runs += consecutive_runs([int(s) for s in str(seq_text).split(",")])
        id_runs.append((int(first_id), n))
        total += n
        after = int(high)
    return total, record_ids(conn, ins, seq_runs, id_runs, int(step or 1))


def record_ids(
    conn: Connection,
    ins: StagedInserts,
    seq_runs: list[tuple[int, int]],
    id_runs: list[tuple[int, int]],
    step: int,
) -> int | None:
    """The k-th inserted id belongs to the k-th ``dp_seq`` (both given as runs: first value,
    length). The offset when every id is ``dp_seq + offset``; else write each row's id to the
    stage's ``id`` column, one UPDATE per range (``matched_ranges``), and return None."""
    pieces = matched_ranges(seq_runs, id_runs, step)
    if len(pieces) == 1 and step == 1:
        return pieces[0][2]
    st = ins.stage
    for low_seq, high_seq, shift in pieces:
        conn.execute(
            update(st).where(ins.where, st.c.dp_seq.between(low_seq, high_seq))
            .values(id=st.c.dp_seq * step + shift)
        )
    return None


def consecutive_runs(values: Sequence[int]) -> list[tuple[int, int]]:
    """Ascending ``values`` as runs (first value, length) of consecutive integers."""
    out: list[tuple[int, int]] = []
    for v in values:
        if out and out[-1][0] + out[-1][1] == v:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((v, 1))
    return out
