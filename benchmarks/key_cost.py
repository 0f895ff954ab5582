"""What a text key's collation costs a bulk insert into a targets-shaped table and a read of one
execution's rows (session 24); what a table of the execution's own would (session 31).

    python -m benchmarks.key_cost --mysql [--rows 1000000] [--rounds 3]
    python -m benchmarks.key_cost --postgres ...

On a durable throwaway server (as ``databases.make_copies`` starts it), one table per key
variant shaped as ``data_patch_targets`` (execution id, table name, row id; primary key on all
three), each holding an earlier execution's ``--rows`` rows, as a production database keeps them.
Per round, in turn: each variant gets a new execution's rows by one ``INSERT … SELECT`` in its own
transaction, then a count of that execution's rows by its key; the keyless ``CREATE TABLE … AS``
of the safety floor beside them. With ``--own-tables``, also a table made for the round's
execution alone (its ``CREATE TABLE`` timed with its insert): with the shared key, with the row
id alone as its key, and (MySQL/MariaDB) the latter filled on the empty-table bulk path (``unique_checks=0, foreign_key_checks=0``: one undo
record for the statement, the index built by sorting; measured only: on MariaDB 10.11 such a fill
that meets a duplicate key leaves the table empty without an error, benchmarks/README.md session
32). Medians of the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from sqlalchemy import BigInteger, Column, MetaData, PrimaryKeyConstraint, String, Table, text
from sqlalchemy.engine import Engine


def variants(dialect: str) -> dict[str, tuple[Any, Any]]:
    """name -> (execution id type, table name type)."""
    from patch_ops.dialects.types import key_string

    out: dict[str, tuple[Any, Any]] = {"utf8mb4's default collation": (String(36), String(255)),
                                       "key_string": (key_string(36), key_string(255))}
    if dialect != "postgresql":
        from sqlalchemy.dialects.mysql import VARCHAR

        # the collation Rails gave older StockRx tables, which their mirrors took
        out["utf8mb4_unicode_ci"] = (VARCHAR(36, charset="utf8mb4", collation="utf8mb4_unicode_ci"),
                                     VARCHAR(255, charset="utf8mb4",
                                             collation="utf8mb4_unicode_ci"))
        out["ascii_bin"] = (VARCHAR(36, charset="ascii", collation="ascii_bin"),
                            VARCHAR(255, charset="ascii", collation="ascii_bin"))
    out["bigint execution id"] = (BigInteger(), String(255))
    return out


def execution(kind: Any, n: int) -> str:
    return str(n) if isinstance(kind, BigInteger) else f"'0190aaaa-0000-7000-8000-{n:012d}'"


def own_tables(dialect: str) -> dict[str, tuple[str, str, bool]]:
    """name -> (columns of a table made for one execution, what fills it, bulk path)."""
    from sqlalchemy.dialects import mysql, postgresql

    from patch_ops.dialects.types import key_string

    sa = (postgresql if dialect == "postgresql" else mysql).dialect()
    k36, k255 = (key_string(n).compile(dialect=sa) for n in (36, 255))
    shared = (f"(execution_id {k36} NOT NULL, table_name {k255} NOT NULL, "
              "row_id BIGINT NOT NULL, PRIMARY KEY (execution_id, table_name, row_id))",
              "SELECT {ex}, 'inventories', id FROM key_cost_src ORDER BY id")
    row_id = ("(row_id BIGINT NOT NULL PRIMARY KEY)", "SELECT id FROM key_cost_src ORDER BY id")
    out = {"own table, the shared key": (*shared, False), "own table, row id key": (*row_id, False)}
    if dialect != "postgresql":
        out["own table, row id key, bulk path"] = (*row_id, True)
    return out


def measure(engine: Engine, rows: int, rounds: int, own: bool = False) -> dict[str, dict[str, float]]:
    from patch_ops.dialects.types import TABLE_OPTIONS

    md, kinds = MetaData(), variants(engine.dialect.name)
    tables = {name: Table(f"key_cost_{i}", md, Column("execution_id", e, nullable=False),
                          Column("table_name", t, nullable=False),
                          Column("row_id", BigInteger, nullable=False),
                          PrimaryKeyConstraint("execution_id", "table_name", "row_id"),
                          **TABLE_OPTIONS)
              for i, (name, (e, t)) in enumerate(kinds.items())}
    owned = own_tables(engine.dialect.name) if own else {}
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE key_cost_src (id BIGINT PRIMARY KEY)"))
        step = 100_000
        for lo in range(0, rows, step):
            conn.execute(text("INSERT INTO key_cost_src (id) VALUES (:id)"),
                         [{"id": i} for i in range(lo + 1, min(lo + step, rows) + 1)])
    md.create_all(engine)
    for name, table in tables.items():
        with engine.begin() as conn:
            conn.execute(text(f"INSERT INTO {table.name} SELECT {execution(kinds[name][0], 0)}, "
                              "'inventories', id FROM key_cost_src"))

    def fill(conn: Any, name: str, r: int) -> str:
        """One round's rows of ``name``; the count that reads them back."""
        if name in owned:
            columns, select, bulk = owned[name]
            conn.execute(text("DROP TABLE IF EXISTS key_cost_own"))
            conn.execute(text(f"CREATE TABLE key_cost_own {columns}"))
            if bulk:
                conn.execute(text("SET SESSION unique_checks = 0, foreign_key_checks = 0"))
            conn.execute(text(f"INSERT INTO key_cost_own {select.format(ex=execution(String(), r))}"))
            return "SELECT count(*) FROM key_cost_own"
        if name not in tables:
            conn.execute(text("DROP TABLE IF EXISTS key_cost_ctas"))
            conn.execute(text("CREATE TABLE key_cost_ctas AS SELECT id FROM key_cost_src ORDER BY id"))
            return "SELECT count(*) FROM key_cost_ctas"
        ex = execution(kinds[name][0], r)
        conn.execute(text(f"INSERT INTO {tables[name].name} SELECT {ex}, 'inventories', id "
                          "FROM key_cost_src ORDER BY id"))
        return (f"SELECT count(*) FROM {tables[name].name} WHERE execution_id = {ex} "
                "AND table_name = 'inventories'")

    times: dict[str, dict[str, list[float]]] = {}
    names = [*tables, *owned, "keyless CREATE TABLE … AS"]
    for r in range(1, rounds + 1):
        for name in names if r % 2 else names[::-1]:
            with engine.connect() as conn:
                t0 = time.perf_counter()
                read = fill(conn, name, r)
                conn.commit()
                t1 = time.perf_counter()
                if owned.get(name, ("", "", False))[2]:
                    conn.execute(text("SET SESSION unique_checks = 1, foreign_key_checks = 1"))
            with engine.connect() as conn:
                t2 = time.perf_counter()
                assert conn.execute(text(read)).scalar_one() == rows
                t3 = time.perf_counter()
            got = times.setdefault(name, {"insert": [], "read": []})
            got["insert"].append(t1 - t0)
            got["read"].append(t3 - t2)
            print(f"round {r} {name}: insert {t1 - t0:.2f} s, read {t3 - t2:.2f} s", flush=True)
    return {name: {k: statistics.median(v) for k, v in times[name].items()} for name in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mysql", action="store_true")
    ap.add_argument("--postgres", action="store_true")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--own-tables", action="store_true",
                    help="also a table made for each execution (session 31)")
    args = ap.parse_args()
    from sqlalchemy import create_engine

    from benchmarks.databases import mysql_server_args

    if args.mysql:
        from tests.support.mysql import MySQLServer

        server: Any = MySQLServer.from_env(durable=True, extra_args=mysql_server_args()).start()
    else:
        from tests.support.postgres import PostgresServer

        server = PostgresServer.from_env(durable=True).start()
    try:
        engine = create_engine(server.create_database())
        result = measure(engine, args.rows, args.rounds, args.own_tables)
        print(f"\n{args.rows:,} rows, medians of {args.rounds} rounds ({engine.dialect.name}):")
        print("| key | insert s | read s |\n|---|---:|---:|")
        for name, got in result.items():
            print(f"| {name} | {got['insert']:.2f} | {got['read']:.2f} |")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
