"""inventory_price_adjustment (percentage 8) against hand-written baselines, side by side.

    python -m benchmarks.price_adjustment --postgres --items 100000
    python -m benchmarks.price_adjustment --sqlite --items 100000
    python -m benchmarks.price_adjustment --mysql --items 100000    # throwaway MariaDB, durable
    python -m benchmarks.price_adjustment --database-url URL --items 100000   # wiped + re-seeded

Contenders, each on its own identical copy of the same seeded data, each a child process whose
whole process tree is polled for RSS and whose CPU is read from wait4:

- ``bare SQL``: two set-based statements in one transaction (INSERT the log rows, UPDATE the
  items), no backup, no checks. The floor.
- ``naive ORM``: SQLAlchemy ORM, one object at a time, commit every 1,000 rows; measured on the
  first ``--naive-rows`` items and scaled to the full set.
- ``job dry`` then ``job real`` on the same copy (a real run needs its approving dry run):
  ``dagster job execute -m stockrx_patches.definitions -j inventory_price_adjustment -c
  config/runs/inventory_price_adjustment[.real].yaml``, the path users take, default
  executor (multiprocess, op processes from a fork server), fresh DAGSTER_HOME with the repo's dagster.yaml.
- ``job dry/real, 0 rows``: the same with ``min_price`` above every price: a run's fixed cost.
- ``safety floor (SQL)``: the job's safety steps (freeze the targets, back up whole rows, stage,
  check every staged row, one commit transaction with row locks and a conflict check against
  the backup, check live against staged) as hand-written set-based SQL: no Python on the rows,
  no Dagster. What the safety rules themselves cost.
- ``Dagster alone: 6 empty ops``: ``benchmarks/trivial_job.py``, a job of the same shape whose
  ops do nothing, through ``dagster job execute`` with the same executor: what Dagster costs.
  Floor + Dagster alone is the least a real run can take; the report's "Bounds" says so.

The job fixes its run timestamp at plan time (``data_patch_executions.run_at``). The real run's
``run_at`` is read back and handed to the baselines, so all contenders must produce the same
values in *every* column (updated_at/created_at included); the digests cover all columns of
inventories and inventory_logs in id order. Dry runs and 0-row runs must leave the data exactly
as seeded.

``--profile DIR`` adds a profiled run of the same engine functions the ops call (in a child
process, one pyinstrument session per step, caches dropped between steps as in a fresh op
process), with SQL time per statement shape: see ``benchmarks.profile_engine``.

This module is the command line and the baselines, which run in its ``--worker`` children (the
worker of ``benchmarks.plan_cost`` imports ``floor_steps`` and ``FLOOR_TABLES`` from here, from
whichever checkout it measures). The contenders as measured from outside and the rounds are in
``benchmarks.price_contenders``, the report in ``benchmarks.price_report``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import sys
import time
import warnings
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from sqlalchemy import DateTime, bindparam, select, text

from benchmarks import common, databases, harness
from benchmarks.contenders import EXECUTORS
from benchmarks.price_contenders import CONTENDERS, WORKER_NAMES, benchmark, fmt_price
from benchmarks.price_report import render

# ---------------------------------------------------------------------------------------------
# Baselines (run in a child process: `--worker bare|naive`)
# ---------------------------------------------------------------------------------------------

# PostgreSQL numeric is exact: round() is half away from zero, i.e. half up for prices >= 0.
PG_NEW = "round(price * (100 + :pct) / 100)"
PG_OLD_TEXT = (
    "CASE WHEN price = trunc(price) THEN trunc(price)::bigint::text ELSE price::text END"
)
PG_NEW_TEXT = f"{PG_NEW}::bigint::text"
# SQLite stores the prices as REAL: the same float arithmetic as the patch (floor(x + 0.5 + eps)).
SQLITE_NEW = "CAST(price * (100 + :pct) / 100.0 + 0.5 + 1e-7 AS INTEGER)"
SQLITE_OLD_TEXT = (
    "CASE WHEN price = CAST(price AS INTEGER) THEN CAST(CAST(price AS INTEGER) AS TEXT) "
    "ELSE printf('%.2f', price) END"
)
SQLITE_NEW_TEXT = f"CAST({SQLITE_NEW} AS TEXT)"
# MySQL 8 / MariaDB DECIMAL is exact too: ROUND() of a DECIMAL is half away from zero (of a
# DOUBLE it would be half even), and a DECIMAL(10,2) as CHAR has its two decimals.
MYSQL_NEW = "ROUND(price * (100 + :pct) / 100)"
MYSQL_OLD_TEXT = (
    "CASE WHEN price = TRUNCATE(price, 0) THEN CAST(TRUNCATE(price, 0) AS CHAR) "
    "ELSE CAST(price AS CHAR) END"
)
MYSQL_NEW_TEXT = f"CAST({MYSQL_NEW} AS CHAR)"


def _pipes(*parts: str) -> str:
    return " || ".join(parts)


def _concat(*parts: str) -> str:
    return "CONCAT(" + ", ".join(parts) + ")"


@dataclass(frozen=True)
class DialectSQL:
    """What the hand-written SQL spells differently per database (the one place it does)."""

    new: str  # an inventories row's new price
    old_text: str  # its price as the note prints it
    new_text: str  # its new price as the note prints it
    concat: Any  # (*parts) -> string concatenation
    #: (a, b) -> "a and b differ" (NULL-safe; a, b: scalars or parenthesised rows)
    differ: Any
    run_at: str  # the run timestamp as a staged column
    null_int: str  # a NULL integer as a staged column
    #: safety floor: the backup table of whole rows, and how it gets its key
    backup: str
    backup_key: str | None
    #: safety floors: (stage, its item id column, condition on it or "") -> row locks on the
    #: items to change (None: the transaction's write lock does)
    lock: Any
    #: safety floors: (stage, its item id column, condition on it or "") -> the items' UPDATE
    update_from_stage: Any
    #: safety floors: the execution id parameter as a selected value, of the type of the
    #: framework's execution keys (``patch_ops.dialects.types.EXECUTION_KEY``)
    execution_value: Any
    #: safety floors: fresh planner statistics of a bulk-loaded table, as the job takes them
    #: (None: it takes none)
    analyze: str | None
    #: (text expression) -> the same, compared byte for byte as the job compares text
    #: (``patch_ops.dialects.functions.as_bytes``: MySQL compares by collation, 'a' = 'A ')
    exact: Any
    #: a text's length in characters (pandera's ``str_length``)
    chars: str = "char_length"


_FLOOR_BACKUP = ("CREATE TABLE bench_floor_backup AS SELECT i.* FROM inventories i "
                 "JOIN bench_floor_targets t ON t.id = i.id")
_SET = ("{i}price = u.price, {i}inventory_logs_count = u.inventory_logs_count, "
        "{i}updated_at = u.updated_at")


def _where(cond: str, joiner: str = " WHERE ") -> str:
    return joiner + cond if cond else ""


def _update_from(stage: str, key: str, cond: str) -> str:
    return (f"UPDATE inventories SET {_SET.format(i='')} FROM {stage} u "
            f"WHERE inventories.id = u.{key}{_where(cond, ' AND ')}")


def _as_is(param: str) -> str:
    return param

DIALECT_SQL: dict[str, DialectSQL] = {
    "postgresql": DialectSQL(
        PG_NEW, PG_OLD_TEXT, PG_NEW_TEXT, _pipes,
        lambda a, b: f"{a} IS DISTINCT FROM {b}",
        ":run_at", "CAST(NULL AS INTEGER)",
        _FLOOR_BACKUP, "ALTER TABLE bench_floor_backup ADD PRIMARY KEY (id)",
        lambda stage, key, cond: f"SELECT count(*) FROM (SELECT i.id FROM inventories i JOIN "
        f"{stage} u ON u.{key} = i.id{_where(cond)} FOR UPDATE OF i) locked",
        _update_from, lambda param: f"CAST({param} AS UUID)", "ANALYZE ",
        lambda x: f'(CAST({x} AS TEXT) COLLATE "C")',
    ),
    "sqlite": DialectSQL(
        SQLITE_NEW, SQLITE_OLD_TEXT, SQLITE_NEW_TEXT, _pipes,
        lambda a, b: f"{a} IS NOT {b}",
        ":run_at", "CAST(NULL AS INTEGER)",
        _FLOOR_BACKUP, "CREATE UNIQUE INDEX bench_floor_backup_id ON bench_floor_backup (id)",
        None,  # the transaction's write lock covers the whole database
        _update_from, _as_is, None, lambda x: f"({x} COLLATE BINARY)", "length",
    ),
    # MySQL 8 syntax (MariaDB runs it too): CONCAT, <=> (NULL-safe equality, rows too),
    # UPDATE ... JOIN, FOR UPDATE without OF (MariaDB has no OF: it also locks the rows of our own
    # stage table, which nobody else uses). The backup gets its primary key as it is made (InnoDB
    # would rebuild the table for an ALTER TABLE ADD PRIMARY KEY). A DDL statement commits
    # implicitly: every one of them runs before the commit transaction.
    "mysql": DialectSQL(
        MYSQL_NEW, MYSQL_OLD_TEXT, MYSQL_NEW_TEXT, _concat,
        lambda a, b: f"NOT ({a} <=> {b})",
        "CAST(:run_at AS DATETIME(6))", "CAST(NULL AS SIGNED)",
        "CREATE TABLE bench_floor_backup (PRIMARY KEY (id)) AS SELECT i.* FROM inventories i "
        "JOIN bench_floor_targets t ON t.id = i.id",
        None,
        lambda stage, key, cond: f"SELECT count(*) FROM inventories i JOIN {stage} u "
        f"ON u.{key} = i.id{_where(cond)} FOR UPDATE",
        lambda stage, key, cond: f"UPDATE inventories i JOIN {stage} u ON u.{key} = i.id "
        f"SET {_SET.format(i='i.')}{_where(cond)}",
        _as_is, "ANALYZE TABLE ", lambda x: f"CAST(CONVERT({x} USING utf8mb4) AS BINARY)",
    ),
}
DIALECT_SQL["mariadb"] = DIALECT_SQL["mysql"]  # SQLAlchemy's name for mariadb+... URLs


def dialect_sql(dialect: str) -> DialectSQL:
    try:
        return DIALECT_SQL[dialect]
    except KeyError:
        raise SystemExit(f"no hand-written SQL for {dialect}") from None


def new_price_and_note(dialect: str) -> tuple[str, str]:
    """SQL expressions, over an inventories row, of its new price and of its log row's note
    (byte for byte the patch's: ``価格調整: {old}円 → {new}円 (percentage:8)``)."""
    d = dialect_sql(dialect)
    note = d.concat("'価格調整: '", d.old_text, "'円 → '", d.new_text, "'円 ('", ":label", "')'")
    return d.new, note


def sql_statement(sql: str) -> Any:
    """``text(sql)``, its ``:run_at`` typed as a DateTime (SQLite stores it as text)."""
    stmt = text(sql)
    return stmt.bindparams(bindparam("run_at", type_=DateTime())) if ":run_at" in sql else stmt


def sql_params(run_at: dt.datetime, pct: Decimal) -> dict[str, Any]:
    """The bound parameters of the hand-written statements."""
    return {"pct": int(pct) if pct == pct.to_integral_value() else pct,
            "label": f"percentage:{fmt_price(pct)}", "run_at": run_at}


def bare_statements(dialect: str) -> list[str]:
    new, note = new_price_and_note(dialect)
    return [
        # Log rows first: they need the old prices. Item order, so the ids match the job's.
        "INSERT INTO inventory_logs (inventory_id, delta, operation_type, previous_quantity, "
        "current_quantity, note, user_id, created_at, updated_at) "
        f"SELECT id, 0, 'adjust', quantity, quantity, {note}, NULL, :run_at, :run_at "
        f"FROM inventories WHERE {new} <> price ORDER BY id",
        f"UPDATE inventories SET price = {new}, inventory_logs_count = inventory_logs_count + 1, "
        f"updated_at = :run_at WHERE {new} <> price",
    ]


def bare_sql(url: str, run_at: dt.datetime, pct: Decimal) -> dict[str, Any]:
    engine = databases.baseline_engine(url)
    params = sql_params(run_at, pct)
    t0 = time.perf_counter()
    counts = []
    with engine.begin() as conn:
        for sql in bare_statements(engine.dialect.name):
            counts.append(conn.execute(sql_statement(sql), params).rowcount)
    work = time.perf_counter() - t0
    return {"work_s": work, "rows_changed": counts[1], "rows": None}


#: Work tables of the safety floor (on its own copy of the data; dropped when it is done).
FLOOR_TABLES = ("bench_floor_targets", "bench_floor_backup", "bench_floor_up", "bench_floor_log",
                "bench_floor_approved")
#: What the approving dry run kept of the rows it would change (untimed: the dry run's work).
FLOOR_APPROVED = "CREATE TABLE bench_floor_approved AS SELECT id, price FROM inventories"


#: ``stockrx_patches.schemas``' bounds, written out: importing them would import pandera into the
#: floors' processes, whose wall time counts.
MAX_PRICE, MAX_INT = 99_999_999.99, 2**31 - 1

#: The columns of a log row that the floors stage and insert.
LOG_COLUMNS = ("inventory_id, delta, operation_type, previous_quantity, current_quantity, note, "
               "user_id, created_at, updated_at")
#: The floors' steps that check something: each must find nothing.
FLOOR_CHECKS = ("plan: drift", "validate", "commit: conflicts", "verify")


def validation_steps(d: DialectSQL, up: str, up_id: str, logs: str, backup: str, paired: str,
                     mine: Any) -> list[tuple[str, str]]:
    """The floors' validation: what the patch declares, as hand-written set-based SQL (session 32;
    before it they checked two staged columns and one invariant). Every changed item's whole
    after-image (the staged columns, the others from its before-image) against
    ``InventorySchema`` and the invariants on its before-image (``inventory_logs_count`` up by
    one, the price changed); every staged log row against ``InventoryLogSchema``; and in one
    pass over the changed items and their grouped log rows, the invariants that pair them (one
    log row per item, no log row of another item, delta 0, ``adjust``, the item's quantity).
    ``up``/``logs``/``backup``: the stage of the items, of the log rows, the backup; ``up_id``
    the item id column of ``up`` and the backup; ``paired`` joins ``u`` to its before-image
    ``b``; ``mine(alias)``: the condition picking one execution's rows of each."""
    from stockrx_patches.tables import OPERATION_TYPES

    kinds = ", ".join(f"'{k}'" for k in OPERATION_TYPES)
    grouped = (f"SELECT inventory_id, count(*) AS n, count(CASE WHEN delta <> 0 OR "
               "operation_type <> 'adjust' THEN 1 END) AS odd, min(previous_quantity) AS pmin, "
               "max(previous_quantity) AS pmax, min(current_quantity) AS cmin, "
               f"max(current_quantity) AS cmax FROM {logs} WHERE {mine()} GROUP BY inventory_id")
    return [
        ("validate: every changed item's whole row",
         f"SELECT count(*) FROM {up} u JOIN {backup} b ON {paired} WHERE {mine('u')} AND ("
         f"u.price IS NULL OR u.price < 0 OR u.price > {MAX_PRICE} OR u.price = b.price OR "
         "u.inventory_logs_count IS NULL OR u.inventory_logs_count <> b.inventory_logs_count + 1 "
         f"OR b.name IS NULL OR {d.chars}(b.name) NOT BETWEEN 1 AND 255 OR b.quantity IS NULL "
         f"OR b.quantity NOT BETWEEN 0 AND {MAX_INT} OR b.status IS NULL OR b.status NOT IN "
         "(0, 1) OR b.batches_count IS NULL OR b.batches_count < 0)"),
        ("validate: every staged log row",
         f"SELECT count(*) FROM {logs} WHERE {mine()} AND (inventory_id IS NULL OR "
         f"inventory_id <= 0 OR operation_type IS NULL OR operation_type NOT IN ({kinds}) OR "
         "previous_quantity IS NULL OR previous_quantity < 0 OR current_quantity IS NULL OR "
         "current_quantity < 0 OR delta IS NULL OR previous_quantity + delta <> current_quantity)"),
        ("validate: the log rows against the changed items",
         "SELECT count(CASE WHEN l.n IS NULL OR l.n <> 1 OR l.odd > 0 OR l.pmin <> b.quantity "
         "OR l.pmax <> b.quantity OR l.cmin <> b.quantity OR l.cmax <> b.quantity THEN 1 END) "
         f"+ ((SELECT count(*) FROM {logs} WHERE {mine()}) - coalesce(sum(l.n), 0)) "
         f"FROM {up} u JOIN {backup} b ON {paired} LEFT JOIN ({grouped}) l "
         f"ON l.inventory_id = u.{up_id} WHERE {mine('u')}"),
    ]


def floor_steps(dialect: str, columns: list[tuple[str, bool]]) -> list[tuple[str, str]]:
    """(step, statement) of the safety floor: the job's safety steps (freeze the target set,
    compare it with what the approving dry run saw (drift), back up whole rows, stage the new
    values, check what the patch declares (``validation_steps``), commit with row locks and a
    conflict check against the backup, check live against staged)
    as hand-written set-based SQL, with no Python on the rows and no Dagster. ``columns``: the
    reflected columns of ``inventories`` (``item_columns``: the conflict check compares every one)."""
    new, note = new_price_and_note(dialect)
    d = dialect_sql(dialect)
    differ = d.differ
    live_row, backup_row = compared_row(d, "i", columns), compared_row(d, "b", columns)
    steps = [
        ("plan: freeze the target ids",
         "CREATE TABLE bench_floor_targets AS SELECT id FROM inventories ORDER BY id"),
        ("plan: drift since approval",
         "SELECT count(*) FROM inventories i JOIN bench_floor_approved a ON a.id = i.id "
         f"WHERE {differ('i.price', 'a.price')}"),
        ("backup: whole rows", d.backup),
    ]
    if d.backup_key:
        steps.append(("backup: key", d.backup_key))
    steps += [
        ("transform: stage the updates",
         f"CREATE TABLE bench_floor_up AS SELECT id, {new} AS price, inventory_logs_count + 1 "
         f"AS inventory_logs_count, {d.run_at} AS updated_at FROM bench_floor_backup "
         f"WHERE {new} <> price"),
        ("transform: stage the log rows",
         "CREATE TABLE bench_floor_log AS SELECT row_number() OVER (ORDER BY id) AS seq, "
         "id AS inventory_id, 0 AS delta, 'adjust' AS operation_type, quantity AS "
         f"previous_quantity, quantity AS current_quantity, {note} AS note, "
         f"{d.null_int} AS user_id, {d.run_at} AS created_at, {d.run_at} AS updated_at "
         f"FROM bench_floor_backup WHERE {new} <> price"),
        *validation_steps(d, "bench_floor_up", "id", "bench_floor_log", "bench_floor_backup",
                          "u.id = b.id", lambda alias="": "1 = 1"),
        # No trial apply: a real run approved by a dry run skips it (its dry run passed it on
        # the same plan, and the commit is all-or-nothing), so the least a real run takes has
        # none either.
        ("commit: BEGIN", "BEGIN"),
    ]
    if d.lock:
        steps.append(("commit: lock the rows", d.lock("bench_floor_up", "id", "")))
    steps += [
        ("commit: conflicts against the backup",
         "SELECT count(*) FROM bench_floor_up u JOIN bench_floor_backup b ON b.id = u.id "
         "LEFT JOIN inventories i ON i.id = u.id WHERE i.id IS NULL "
         f"OR {differ(f'({live_row})', f'({backup_row})')}"),
        ("commit: update the items", d.update_from_stage("bench_floor_up", "id", "")),
        ("commit: insert the log rows",
         f"INSERT INTO inventory_logs ({LOG_COLUMNS}) SELECT {LOG_COLUMNS} FROM bench_floor_log "
         "ORDER BY seq"),
        ("commit: COMMIT", "COMMIT"),
        ("verify: live items = staged",
         "SELECT count(*) FROM bench_floor_up u LEFT JOIN inventories i ON i.id = u.id "
         "WHERE i.id IS NULL OR "
         + differ("(i.price, i.inventory_logs_count, i.updated_at)",
                  "(u.price, u.inventory_logs_count, u.updated_at)")),
        ("verify: live log rows = staged",
         "SELECT count(*) FROM bench_floor_log s LEFT JOIN inventory_logs l "
         "ON l.id = s.seq + (SELECT max(id) FROM inventory_logs) - "
         "(SELECT count(*) FROM bench_floor_log) WHERE l.id IS NULL OR "
         f"{differ('l.inventory_id', 's.inventory_id')} OR "
         f"{differ(d.exact('l.note'), d.exact('s.note'))}"),
    ]
    return steps


def safety_floor(url: str, run_at: dt.datetime, pct: Decimal) -> dict[str, Any]:
    """The safety floor (floor_steps), timed step by step on one connection; every check must
    find nothing. Its final data must equal bare SQL's and the job's."""
    engine = databases.baseline_engine(url)
    with engine.begin() as conn:
        conn.execute(text(FLOOR_APPROVED))
    result = run_floor_steps(engine, floor_steps(engine.dialect.name, item_columns(engine)),
                             sql_params(run_at, pct), "safety floor")
    with engine.begin() as conn:
        for table in FLOOR_TABLES:
            conn.execute(text(f"DROP TABLE {table}"))
    return result


def item_columns(engine: Any) -> list[tuple[str, bool]]:
    """The reflected columns of ``inventories``, quoted, each with whether it holds text (the
    conflict check compares them all, text byte for byte)."""
    from sqlalchemy import String, inspect

    quote = engine.dialect.identifier_preparer.quote
    return [(quote(c["name"]), isinstance(c["type"], String))
            for c in inspect(engine).get_columns("inventories")]


def compared_row(d: DialectSQL, alias: str, columns: list[tuple[str, bool]]) -> str:
    """``alias``'s ``columns`` (``item_columns``) as a row to compare: text byte for byte."""
    return ", ".join(d.exact(f"{alias}.{c}") if text else f"{alias}.{c}" for c, text in columns)


def run_floor_steps(engine: Any, steps: list[tuple[str, str]], params: dict[str, Any],
                    who: str) -> dict[str, Any]:
    """A floor's ``steps`` timed one by one on one connection in autocommit: the worker's
    result (work seconds, items updated, the time per step). A check (``FLOOR_CHECKS``) that
    finds a row stops the benchmark."""
    steps_s: list[tuple[str, float]] = []
    changed = None
    t0 = time.perf_counter()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for name, sql in steps:
            t = time.perf_counter()
            res = conn.execute(sql_statement(sql), params)
            check = name.startswith(FLOOR_CHECKS)
            found = res.scalar_one() if check else res.all() if res.returns_rows else None
            steps_s.append((name, time.perf_counter() - t))
            if check and found:
                raise SystemExit(f"{who}: {name} found {found} row(s)")
            if name == "commit: update the items":
                changed = res.rowcount
    return {"work_s": time.perf_counter() - t0, "rows_changed": changed, "rows": None,
            "steps": steps_s}


def naive_orm(url: str, run_at: dt.datetime, pct: Decimal, limit: int) -> dict[str, Any]:
    """What a hand-run script typically does: load, change and save one object at a time."""
    from sqlalchemy.orm import DeclarativeBase, Session

    from stockrx_patches import tables as stockrx_tables

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __table__ = stockrx_tables.inventories

    class Log(Base):
        __table__ = stockrx_tables.inventory_logs

    engine = databases.baseline_engine(url)
    label = f"percentage:{fmt_price(pct)}"
    factor = (100 + pct) / 100
    t0, cpu0 = time.perf_counter(), time.process_time()
    changed = 0
    with Session(engine) as session:
        item_id_col = stockrx_tables.inventories.c.id
        ids = session.scalars(
            select(item_id_col).where(item_id_col <= limit).order_by(item_id_col)
        ).all()
        for n, item_id in enumerate(ids, 1):
            item = session.get(Item, item_id)
            old = Decimal(item.price)  # type: ignore[union-attr]
            new = (old * factor).quantize(Decimal(1), rounding=ROUND_HALF_UP)
            if new != old:
                session.add(
                    Log(
                        inventory_id=item.id,  # type: ignore[union-attr]
                        delta=0,
                        operation_type="adjust",
                        previous_quantity=item.quantity,  # type: ignore[union-attr]
                        current_quantity=item.quantity,  # type: ignore[union-attr]
                        note=f"価格調整: {fmt_price(old)}円 → {fmt_price(new)}円 ({label})",
                        user_id=None,
                        created_at=run_at,
                        updated_at=run_at,
                    )
                )
                item.price = new  # type: ignore[union-attr]
                item.inventory_logs_count += 1  # type: ignore[union-attr]
                item.updated_at = run_at  # type: ignore[union-attr]
                changed += 1
            if n % 1000 == 0:
                session.commit()
        session.commit()
    return {"work_s": time.perf_counter() - t0, "work_cpu_s": time.process_time() - cpu0,
            "rows_changed": changed, "rows": len(ids)}


def worker_main(args: argparse.Namespace) -> int:
    warnings.simplefilter("ignore")
    run_at = dt.datetime.fromisoformat(args.run_at)
    pct = Decimal(args.percentage)
    if args.worker == "bare":
        result = bare_sql(args.database_url, run_at, pct)
    elif args.worker == "floor":
        result = safety_floor(args.database_url, run_at, pct)
    else:
        result = naive_orm(args.database_url, run_at, pct, args.naive_rows)
    print(common.RESULT_MARK + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.price_adjustment",
        description="Benchmark inventory_price_adjustment against bare SQL and a naive ORM loop.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--database-url", help="a scratch database: it is wiped and re-seeded "
                       "before every contender")
    where.add_argument("--postgres", action="store_true",
                       help="start a throwaway PostgreSQL (tests/support/postgres.py; "
                       "STOCKRX_TEST_PG_URL to use an existing server); the default")
    where.add_argument("--sqlite", action="store_true", help="temporary SQLite files")
    where.add_argument("--mysql", action="store_true",
                       help="start a throwaway MariaDB with production durability (binary log, "
                       "innodb_flush_log_at_trx_commit=1, sync_binlog=1; tests/support/mysql.py; "
                       "STOCKRX_TEST_MYSQL_URL to use an existing server); contenders connect as "
                       "a least-privilege patch user")
    p.add_argument("--mysql-copy", choices=databases.MYSQL_COPY_METHODS, default="tablespace",
                   help="how --mysql copies the seeded data for each contender: tablespace "
                   "(InnoDB file copy, local server; the default) or insert (INSERT ... SELECT)")
    p.add_argument("--mysql-buffer-pool", default=databases.MYSQL_BUFFER_POOL, metavar="SIZE",
                   help="the throwaway MariaDB's innodb_buffer_pool_size (default "
                   f"{databases.MYSQL_BUFFER_POOL}, PostgreSQL's shared_buffers)")
    p.add_argument("--items", type=int, default=100_000, help="items to seed (default 100,000)")
    p.add_argument("--naive-rows", type=int, default=20_000,
                   help="items the naive ORM baseline processes; its times are scaled to --items")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds before a contender is killed (default 900)")
    p.add_argument("--profile", metavar="DIR",
                   help="also profile the engine steps in-process; reports written to DIR")
    p.add_argument("--only", default=",".join(CONTENDERS),
                   help="comma-separated contenders to run (default: all of "
                   f"{','.join(CONTENDERS)}; job = dry + real run, zero = dry + real on 0 rows)")
    p.add_argument("--rounds", type=int, default=3,
                   help="run every contender this many times, interleaved (round 1: all, round "
                   "2: all, ...), and report medians (default 3; the naive baseline runs in the "
                   "first round only)")
    p.add_argument("--app-writer", type=float, default=0.0, metavar="RATE",
                   help="an application stand-in updating random items at RATE writes/s during "
                   "every contender that uses the database (benchmarks/app_writer.py); its "
                   "latency is reported per contender and per op (default 0: off)")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="run config batch_size for the job (default: config/data_patches.yml)")
    p.add_argument("--transform-path", choices=("sql", "python"),
                   help="run config transform_path for the job (default: the patch's default, "
                   "in the database; python: the pandas path)")
    p.add_argument("--executor", choices=sorted(EXECUTORS), default="default",
                   help="the job's executor (default: the jobs' own, one process per op forked "
                   "from a preloaded fork server; spawn: Dagster's stock multiprocess)")
    p.add_argument("--code", metavar="REV",
                   help="measure a commit (git archive, e.g. HEAD) or 'snapshot' (a copy of the "
                   "working tree taken at start) instead of the live working tree")
    p.add_argument("--against", metavar="REV",
                   help="also run the job (dry + real) of this commit in every round, on its own "
                   "copy, interleaved with the measured code's (its order swapped each round), "
                   "and report job real against it: a whole-job comparison of two versions "
                   "within one run")
    p.add_argument("--json", metavar="PATH", help="write the raw results as JSON")
    p.add_argument("--output", metavar="PATH", help="append the printed report to this file")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--worker", choices=sorted(WORKER_NAMES), help=argparse.SUPPRESS)
    p.add_argument("--run-at", help=argparse.SUPPRESS)
    p.add_argument("--percentage", default="8", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker and not (args.database_url and args.run_at):
        p.error("--worker needs --database-url and --run-at")
    args.only = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = set(args.only) - set(CONTENDERS)
    if unknown:
        p.error(f"unknown contender(s) {sorted(unknown)}; choose from {', '.join(CONTENDERS)}")
    if args.against and "job" not in args.only:
        p.error("--against compares the job: add 'job' to --only")
    if args.profile and importlib.util.find_spec("pyinstrument") is None:
        p.error("--profile needs pyinstrument: pip install -e '.[bench]'")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    return harness.run_benchmark(args, benchmark, render)


if __name__ == "__main__":
    sys.exit(main())
