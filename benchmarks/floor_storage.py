"""The safety floor on the job's storage (issue 22): the price benchmark's ``keyed`` contender.

    python -m benchmarks.price_adjustment --postgres --items 1000000 --only floor,keyed,dagster,job

The safety floor (``benchmarks.price_adjustment.floor_steps``) writes its target set, backup and
stage into tables it creates for the run (``CREATE TABLE … AS``: no key, no other run's rows;
MariaDB fills them without per-row undo). The job keeps them where every execution's are: the
framework's ``data_patch_targets`` and its backup and stage mirrors, keyed by (execution,
action, sequence), because they outlive the run (the backup 90 days for restore, an approving
dry run's rows as its fingerprint, a crashed run's stage for its resume). The keyed floor is the
same statements on those tables, made by the framework's own code (``patch_ops.state``), each
filtered by its execution (a time-ordered id from ``new_execution_id``, as the job's), with fresh planner statistics after each bulk load (as the job takes
them), and an approving dry run's backup and staged updates already there (untimed) as the
job's real run finds them; its drift check reads them, as the job's does. Keyed floor + Dagster
alone is the least a real run on the job's storage can take (the report's "keyed bound").

The ``own`` contender (session 32) is the same floor on the storage a table per execution would
give (``own_tables``): each table made as its step starts, keyed by the sequence alone (the
target set by the row id); the approving dry run's backup in a table of its own. Own floor +
Dagster alone is what a real run on that storage could reach (the report's "own-table bound").
``own_bulk`` fills MySQL/MariaDB's one-statement fills (target set, backup) on InnoDB's
empty-table bulk path (``unique_checks=0``): measured, not a design to copy, for on MariaDB
10.11 a fill that meets a duplicate key there reports success and leaves the table empty
(benchmarks/README.md, session 32).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import warnings
from decimal import Decimal
from typing import Any

from benchmarks import databases
from benchmarks.common import RESULT_MARK
from benchmarks.price_adjustment import (
    LOG_COLUMNS,
    compared_row,
    dialect_sql,
    item_columns,
    new_price_and_note,
    run_floor_steps,
    sql_params,
    sql_statement,
    validation_steps,
)


def keyed_names(url: str) -> dict[str, str]:
    """The framework's tables for the keyed floor, made by its own code as the job makes them:
    SQL names of ``targets``, ``backup`` and ``stage`` (inventories) and ``logs`` (the log rows'
    stage)."""
    from sqlalchemy import MetaData, Table

    from patch_ops import state
    from patch_ops.database import get_engine
    from patch_ops.dialects.names import table_sql

    engine = get_engine(url)
    try:
        state.ensure_framework_tables(engine)
        md = MetaData()
        live = {t: Table(t, md, autoload_with=engine) for t in ("inventories", "inventory_logs")}

        def fmt(table: Table) -> str:
            return table_sql(engine, table)

        return {
            "targets": fmt(state.targets),
            "backup": fmt(state.mirror_table(engine, live["inventories"], "backup")),
            "stage": fmt(state.mirror_table(engine, live["inventories"], "stage")),
            "logs": fmt(state.mirror_table(engine, live["inventory_logs"], "stage")),
        }
    finally:
        engine.dispose()
        state.forget_mirrors()


def keyed_steps(dialect: str, columns: list[tuple[str, bool]], n: dict[str, str],
                own: bool = False, bulk: bool = False) -> list[tuple[str, str]]:
    """``floor_steps`` on the framework's shared tables ``n`` (``keyed_names``): every statement
    of the floor, writing and reading the rows of execution ``:x`` only; the drift check reads
    the approving dry run ``:a``'s backup rows. ``own``: on tables of the execution's own
    instead (``own_tables``: ``n`` also holds their DDL), keyed by the sequence alone, each made
    as the step that fills it starts; with ``bulk``, MySQL/MariaDB's one-statement fills
    (target set, backup) take InnoDB's empty-table bulk path."""
    new, note = new_price_and_note(dialect)
    d = dialect_sql(dialect)
    differ = d.differ
    cols = ", ".join(c for c, _ in columns)
    live_row = ", ".join(f"i.{c}" for c, _ in columns)  # as selected for the backup
    live_compared, backup_compared = compared_row(d, "i", columns), compared_row(d, "b", columns)

    def mine(action: str, alias: str = "") -> str:
        a = f"{alias}." if alias else ""
        return "1 = 1" if own else f"{a}dp_execution_id = :x AND {a}dp_action = '{action}'"

    x = d.execution_value(":x")  # as a selected value

    def key(action: str) -> tuple[str, str]:
        """The bookkeeping columns a mirror row starts with, and their selected values."""
        return ("", "") if own else ("dp_execution_id, dp_action, ", f"{x}, '{action}', ")

    def made(role: str, step: str) -> list[tuple[str, str | None]]:
        return [(f"{step}: make the {role} table", n[f"{role}_ddl"])] if own else []

    bulk = bulk and own and dialect not in ("postgresql", "sqlite")

    def bulk_path(step: str, on: bool) -> list[tuple[str, str | None]]:
        v = 0 if on else 1
        return [(f"{step}: bulk path {'on' if on else 'off'}",
                 f"SET SESSION unique_checks = {v}, foreign_key_checks = {v}")] if bulk else []

    up, logs, backup = n["stage"], n["logs"], n["backup"]
    targets = (f"{n['targets']} (row_id) SELECT id" if own else
               f"{n['targets']} (execution_id, table_name, row_id) SELECT {x}, "
               "'inventories', id")
    of_targets = "" if own else " WHERE t.execution_id = :x AND t.table_name = 'inventories'"
    approved = (f"{n['approved']} a ON a.dp_seq = i.id WHERE " if own else
                f"{backup} a ON a.dp_seq = i.id WHERE a.dp_execution_id = :a AND "
                "a.dp_action = 'B' AND ")
    paired = "" if own else "b.dp_execution_id = u.dp_execution_id AND b.dp_action = 'B' AND "
    analyze = d.analyze
    (kb, vb), (ku, vu), (ki, vi) = key("B"), key("U"), key("I")
    steps: list[tuple[str, str | None]] = [
        *made("targets", "plan"), *bulk_path("plan", True),
        ("plan: freeze the target ids", f"INSERT INTO {targets} FROM inventories ORDER BY id"),
        *bulk_path("plan", False),
        ("plan: statistics", analyze and analyze + n["targets"]),
        ("plan: drift since approval",
         f"SELECT count(*) FROM inventories i JOIN {approved}{differ('i.price', 'a.price')}"),
        *made("backup", "backup"), *bulk_path("backup", True),
        ("backup: whole rows",
         f"INSERT INTO {backup} ({kb}dp_seq, dp_source_id, {cols}) "
         f"SELECT {vb}i.id, NULL, {live_row} FROM inventories i JOIN {n['targets']} t "
         f"ON t.row_id = i.id{of_targets}"),
        *bulk_path("backup", False),
        ("backup: statistics", analyze and analyze + backup),
        *made("stage", "transform"), *made("logs", "transform"),
        ("transform: stage the updates",
         f"INSERT INTO {up} ({ku}dp_seq, dp_source_id, id, price, inventory_logs_count, "
         f"updated_at) SELECT {vu}id, id, id, {new}, inventory_logs_count + 1, {d.run_at} "
         f"FROM {backup} WHERE {mine('B')} AND {new} <> price"),
        ("transform: stage the log rows",
         f"INSERT INTO {logs} ({ki}dp_seq, dp_source_id, {LOG_COLUMNS}) "
         f"SELECT {vi}row_number() OVER (ORDER BY id), id, id, 0, 'adjust', quantity, "
         f"quantity, {note}, {d.null_int}, {d.run_at}, {d.run_at} FROM {backup} "
         f"WHERE {mine('B')} AND {new} <> price"),
        ("transform: statistics", analyze and f"{analyze}{up}, {logs}"),
        *validation_steps(d, up, "dp_seq", logs, backup, f"{paired}b.dp_seq = u.dp_seq",
                          lambda alias="": mine("U" if alias else "I", alias)),
        ("commit: BEGIN", "BEGIN"),
        ("commit: lock the rows", d.lock and d.lock(up, "dp_seq", mine("U", "u"))),
        ("commit: conflicts against the backup",
         f"SELECT count(*) FROM {up} u JOIN {backup} b ON {paired}b.dp_seq = u.dp_seq "
         f"LEFT JOIN inventories i ON i.id = u.dp_seq WHERE {mine('U', 'u')} AND (i.id IS NULL "
         f"OR {differ(f'({live_compared})', f'({backup_compared})')})"),
        ("commit: update the items", d.update_from_stage(up, "dp_seq", mine("U", "u"))),
        ("commit: insert the log rows",
         f"INSERT INTO inventory_logs ({LOG_COLUMNS}) SELECT {LOG_COLUMNS} FROM {logs} "
         f"WHERE {mine('I')} ORDER BY dp_seq"),
        ("commit: COMMIT", "COMMIT"),
        ("verify: live items = staged",
         f"SELECT count(*) FROM {up} u LEFT JOIN inventories i ON i.id = u.dp_seq "
         f"WHERE {mine('U', 'u')} AND (i.id IS NULL OR "
         + differ("(i.price, i.inventory_logs_count, i.updated_at)",
                  "(u.price, u.inventory_logs_count, u.updated_at)") + ")"),
        ("verify: live log rows = staged",
         f"SELECT count(*) FROM {logs} s LEFT JOIN inventory_logs l "
         "ON l.id = s.dp_seq + (SELECT max(id) FROM inventory_logs) - "
         f"(SELECT count(*) FROM {logs} WHERE {mine('I')}) WHERE {mine('I', 's')} AND (l.id IS NULL OR "
         f"{differ('l.inventory_id', 's.inventory_id')} OR "
         f"{differ(d.exact('l.note'), d.exact('s.note'))})"),
    ]
    return [(name, sql) for name, sql in steps if sql]


def own_tables(url: str) -> dict[str, str]:
    """Tables of one execution's own, as a table-per-execution storage would make them: the SQL
    names of ``targets`` (the row id its key), ``backup``, ``stage``, ``logs`` (every column of
    the live table, nullable, after ``dp_seq``, their key, and ``dp_source_id``) and the
    approving dry run's backup (``approved``), and ``<role>_ddl``: the ``CREATE TABLE`` of each
    (the timed steps run them; ``approve`` runs ``approved_ddl``, untimed)."""
    from sqlalchemy import BigInteger, Column, MetaData, Table
    from sqlalchemy.schema import CreateTable

    from patch_ops.database import get_engine
    from patch_ops.dialects.types import mirror_table_options

    engine = get_engine(url)
    try:
        md = MetaData()
        live = {t: Table(t, md, autoload_with=engine) for t in ("inventories", "inventory_logs")}
        out: dict[str, str] = {}
        for role, of in (("backup", "inventories"), ("stage", "inventories"),
                         ("logs", "inventory_logs"), ("approved", "inventories"), ("targets", "")):
            key = Column("row_id" if not of else "dp_seq", BigInteger, primary_key=True,
                         autoincrement=False)
            rest = [] if not of else [Column("dp_source_id", BigInteger), *(
                Column(c.name, c.type, nullable=True) for c in live[of].columns)]
            table = Table(f"bench_own_{role}", md, key, *rest,
                          **(mirror_table_options(live[of]) if of else {}))
            out[role] = table.name
            out[f"{role}_ddl"] = str(CreateTable(table).compile(dialect=engine.dialect))
        return out
    finally:
        engine.dispose()


def approve(url: str, names: dict[str, str], run_at: dt.datetime, pct: Decimal,
            own: bool = False) -> str:
    """Untimed: what an approving dry run leaves (its backup rows and staged updates, kept as
    its fingerprint: in the shared tables, or with ``own`` its backup in a table of its own),
    then ``settle``. Returns its execution id."""
    from patch_ops.execution import new_execution_id

    engine = databases.baseline_engine(url)
    columns = item_columns(engine)
    a = new_execution_id()
    with engine.begin() as conn:
        if own:
            cols = ", ".join(c for c, _ in columns)
            conn.execute(sql_statement(names["approved_ddl"]))
            conn.execute(sql_statement(f"INSERT INTO {names['approved']} (dp_seq, dp_source_id, "
                                       f"{cols}) SELECT id, NULL, {cols} FROM inventories"))
        else:
            steps = dict(keyed_steps(engine.dialect.name, columns, names))
            for name in ("plan: freeze the target ids", "backup: whole rows",
                         "transform: stage the updates"):
                conn.execute(sql_statement(steps[name]), {**sql_params(run_at, pct), "x": a})
            conn.execute(sql_statement(f"DELETE FROM {names['targets']} WHERE execution_id = :x"),
                         {"x": a})
    engine.dispose()
    databases.settle(url)
    return a


def keyed_floor(url: str, run_at: dt.datetime, pct: Decimal, names: dict[str, str],
                approval: str, execution: str, own: bool = False,
                bulk: bool = False) -> dict[str, Any]:
    """The keyed floor (``keyed_steps`` on the tables ``names``, execution ``execution``
    approved by ``approval``; ``own``: on tables of its own, ``bulk``: some filled on the bulk
    path) timed step by step on one
    connection, as ``safety_floor`` times its own (the same result); every check must find
    nothing. Imports nothing of the framework (the ``--worker keyed|own|own_bulk`` child)."""
    engine = databases.baseline_engine(url)
    steps = keyed_steps(engine.dialect.name, item_columns(engine), names, own, bulk)
    params = {**sql_params(run_at, pct), "x": execution, "a": approval}
    result = run_floor_steps(engine, steps, params, f"{'own' if own else 'keyed'} floor")
    engine.dispose()
    return result


def main(argv: list[str] | None = None) -> int:
    """The price benchmark's ``keyed`` and ``own`` contenders (``benchmarks.price_contenders``),
    a child process: with ``--approve``, make the tables and an approving dry run's rows
    (untimed) and print both; else time the floor on the tables that ``--keyed`` (that output)
    names."""
    warnings.simplefilter("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=["keyed", "own", "own_bulk"], required=True)
    ap.add_argument("--database-url", required=True)
    ap.add_argument("--run-at", required=True)
    ap.add_argument("--percentage", default="8")
    ap.add_argument("--naive-rows", help="given to every worker; unused")
    ap.add_argument("--approve", action="store_true")
    ap.add_argument("--keyed", help="JSON: [tables, approving execution, execution] from "
                    "--approve")
    args = ap.parse_args(argv)
    url, run_at, pct = args.database_url, dt.datetime.fromisoformat(args.run_at), Decimal(
        args.percentage)
    if args.approve:
        from patch_ops.execution import new_execution_id

        own = args.worker.startswith("own")
        names = own_tables(url) if own else keyed_names(url)
        approval = approve(url, names, run_at, pct, own)
        # the framework's time-ordered ids, as the job's: its rows go in at the keys' right end
        result: Any = [names, approval, new_execution_id()]
    else:
        names, approval, execution = json.loads(args.keyed)
        result = keyed_floor(url, run_at, pct, names, approval, execution,
                             args.worker.startswith("own"), args.worker == "own_bulk")
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
