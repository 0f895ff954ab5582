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
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import importlib.util
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import DateTime, bindparam, select, text

from benchmarks import common
from benchmarks.app_writer import app_writer
from benchmarks.common import Digest
from benchmarks.rounds import summary

JOB = "inventory_price_adjustment"
DRY_CONFIG = Path("config") / "runs" / f"{JOB}.yaml"  # relative to the measured code
REAL_CONFIG = Path("config") / "runs" / f"{JOB}.real.yaml"
RESULT_MARK = common.RESULT_MARK
#: A throwaway audit key for this benchmark process only (``key_id:fernet_key``).
AUDIT_KEY = "bench:" + base64.urlsafe_b64encode(os.urandom(32)).decode()


def fmt_price(v: float | Decimal) -> str:
    """As the patch prints prices in notes: whole yen as an integer, else two decimals."""
    return f"{int(v)}" if float(v).is_integer() else f"{float(v):.2f}"


def run_config(path: Path) -> dict[str, Any]:
    """The op config of a run config file (it configures exactly one op: plan_patch)."""
    (op,) = yaml.safe_load(path.read_text())["ops"].values()
    return dict(op["config"])


def percentage_of_config(path: Path) -> Decimal:
    cfg = run_config(path)
    if cfg.get("adjustment_type") != "percentage" or set(cfg) - {
        "dry_run", "adjustment_type", "adjustment_value"
    }:
        raise SystemExit(f"{path} is no longer a plain percentage run: update the baselines")
    return Decimal(str(cfg["adjustment_value"]))


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
    #: safety floor: row locks on the items to change (None: the transaction's write lock does)
    lock: str | None
    #: safety floor: the items' UPDATE from the staged rows
    update_from_stage: str


_FLOOR_BACKUP = ("CREATE TABLE bench_floor_backup AS SELECT i.* FROM inventories i "
                 "JOIN bench_floor_targets t ON t.id = i.id")
_UPDATE_FROM = ("UPDATE inventories SET price = u.price, inventory_logs_count = "
                "u.inventory_logs_count, updated_at = u.updated_at FROM bench_floor_up u "
                "WHERE inventories.id = u.id")

DIALECT_SQL: dict[str, DialectSQL] = {
    "postgresql": DialectSQL(
        PG_NEW, PG_OLD_TEXT, PG_NEW_TEXT, _pipes,
        lambda a, b: f"{a} IS DISTINCT FROM {b}",
        ":run_at", "CAST(NULL AS INTEGER)",
        _FLOOR_BACKUP, "ALTER TABLE bench_floor_backup ADD PRIMARY KEY (id)",
        "SELECT count(*) FROM (SELECT i.id FROM inventories i JOIN bench_floor_up u "
        "ON u.id = i.id FOR UPDATE OF i) locked",
        _UPDATE_FROM,
    ),
    "sqlite": DialectSQL(
        SQLITE_NEW, SQLITE_OLD_TEXT, SQLITE_NEW_TEXT, _pipes,
        lambda a, b: f"{a} IS NOT {b}",
        ":run_at", "CAST(NULL AS INTEGER)",
        _FLOOR_BACKUP, "CREATE UNIQUE INDEX bench_floor_backup_id ON bench_floor_backup (id)",
        None,  # the transaction's write lock covers the whole database
        _UPDATE_FROM,
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
        "SELECT count(*) FROM inventories i JOIN bench_floor_up u ON u.id = i.id FOR UPDATE",
        "UPDATE inventories i JOIN bench_floor_up u ON u.id = i.id SET i.price = u.price, "
        "i.inventory_logs_count = u.inventory_logs_count, i.updated_at = u.updated_at",
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
    engine = common.baseline_engine(url)
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


def floor_steps(dialect: str, columns: list[str]) -> list[tuple[str, str]]:
    """(step, statement) of the safety floor: the job's safety steps (freeze the target set,
    compare it with what the approving dry run saw (drift), back up whole rows, stage the new
    values, check every staged row and the cross-table pairing, commit with row locks and a conflict check against the backup, check live against staged)
    as hand-written set-based SQL, with no Python on the rows and no Dagster. ``columns``: the
    reflected columns of ``inventories`` (the conflict check compares every one)."""
    new, note = new_price_and_note(dialect)
    d = dialect_sql(dialect)
    differ = d.differ
    live_row = ", ".join(f"i.{c}" for c in columns)
    backup_row = ", ".join(f"b.{c}" for c in columns)  # columns: reflected, quoted
    log_cols = ("inventory_id, delta, operation_type, previous_quantity, current_quantity, note, "
                "user_id, created_at, updated_at")
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
        ("validate: every staged item",
         "SELECT count(*) FROM bench_floor_up WHERE price IS NULL OR price < 0 "
         "OR inventory_logs_count < 1"),
        ("validate: every staged log row",
         "SELECT count(*) FROM bench_floor_log WHERE note IS NULL OR previous_quantity < 0 "
         "OR current_quantity <> previous_quantity"),
        ("validate: one log row per changed item",
         "SELECT count(*) FROM bench_floor_up u LEFT JOIN (SELECT inventory_id, count(*) AS n "
         "FROM bench_floor_log GROUP BY inventory_id) l ON l.inventory_id = u.id "
         "WHERE l.n IS NULL OR l.n <> 1"),
        # No trial apply: a real run approved by a dry run skips it (its dry run passed it on
        # the same plan, and the commit is all-or-nothing), so the least a real run takes has
        # none either.
        ("commit: BEGIN", "BEGIN"),
    ]
    if d.lock:
        steps.append(("commit: lock the rows", d.lock))
    steps += [
        ("commit: conflicts against the backup",
         "SELECT count(*) FROM bench_floor_up u JOIN bench_floor_backup b ON b.id = u.id "
         "LEFT JOIN inventories i ON i.id = u.id WHERE i.id IS NULL "
         f"OR {differ(f'({live_row})', f'({backup_row})')}"),
        ("commit: update the items", d.update_from_stage),
        ("commit: insert the log rows",
         f"INSERT INTO inventory_logs ({log_cols}) SELECT {log_cols} FROM bench_floor_log "
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
         f"{differ('l.inventory_id', 's.inventory_id')} OR {differ('l.note', 's.note')}"),
    ]
    return steps


def safety_floor(url: str, run_at: dt.datetime, pct: Decimal) -> dict[str, Any]:
    """The safety floor (floor_steps), timed step by step on one connection; every check must
    find nothing. Its final data must equal bare SQL's and the job's."""
    from sqlalchemy import inspect

    engine = common.baseline_engine(url)
    quote = engine.dialect.identifier_preparer.quote
    columns = [quote(c["name"]) for c in inspect(engine).get_columns("inventories")]
    params = sql_params(run_at, pct)
    steps: list[tuple[str, float]] = []
    changed = None
    with engine.begin() as conn:
        conn.execute(text(FLOOR_APPROVED))
    t0 = time.perf_counter()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for name, sql in floor_steps(engine.dialect.name, columns):
            t = time.perf_counter()
            res = conn.execute(sql_statement(sql), params)
            found = res.scalar_one() if res.returns_rows else None
            steps.append((name, time.perf_counter() - t))
            if found and name.startswith(("validate", "commit: conflicts", "verify")):
                raise SystemExit(f"safety floor: {name} found {found} row(s)")
            if name == "commit: update the items":
                changed = res.rowcount
    work = time.perf_counter() - t0
    with engine.begin() as conn:
        for table in FLOOR_TABLES:
            conn.execute(text(f"DROP TABLE {table}"))
    return {"work_s": work, "rows_changed": changed, "rows": None, "steps": steps}


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

    engine = common.baseline_engine(url)
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
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# Contenders as measured from outside
# ---------------------------------------------------------------------------------------------


Outcome = common.Outcome


WORKER_NAMES = {"bare": "bare SQL", "naive": "naive ORM", "floor": "safety floor (SQL)"}


def run_worker(kind: str, url: str, run_at: dt.datetime, pct: Decimal,
               args: argparse.Namespace) -> Outcome:
    cmd = [sys.executable, "-m", "benchmarks.price_adjustment", "--worker", kind,
           "--database-url", url, "--run-at", run_at.isoformat(), "--percentage", str(pct),
           "--naive-rows", str(args.naive_rows)]
    proc = common.run_monitored(cmd, env=dict(os.environ), timeout=args.timeout)
    out = Outcome(WORKER_NAMES[kind], 0, proc)
    res: dict[str, Any] = {}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            res = json.loads(line[len(RESULT_MARK):])
    if res:
        out.work_s = res["work_s"]
        out.rows_changed = res["rows_changed"]
        out.rows = res["rows"] if res["rows"] is not None else args.items
        out.steps = res.get("steps", [])
    if kind == "naive" and out.rows:
        out.scale = args.items / out.rows
        # Scale the work's CPU only, not the process start-up.
        out.cpu_s = proc.cpu_s + res["work_cpu_s"] * (out.scale - 1)
    if not out.ok:
        out.notes.append("failed: " + " / ".join(proc.stderr.strip().splitlines()[-3:]))
    return out


read_execution = common.read_execution


@dataclass
class JobSetup:
    """How the job is launched: the measured code, the run config files, the op they configure."""

    code: common.Code
    workdir: Path
    op_key: str
    overrides: dict[str, Any]
    executor: str = "default"

    @property
    def dry_config(self) -> Path:
        return self.code.dir / DRY_CONFIG

    @property
    def real_config(self) -> Path:
        return self.code.dir / REAL_CONFIG

    @property
    def percentage(self) -> Decimal:
        return percentage_of_config(self.real_config)

    def config_files(self, base: Path, extra: dict[str, Any] | None = None) -> list[Path]:
        """The repo's run config, plus a file with the benchmark's overrides, if any."""
        cfg = {**self.overrides, **(extra or {})}
        doc: dict[str, Any] = {"ops": {self.op_key: {"config": cfg}}} if cfg else {}
        if self.executor != "default":
            doc["execution"] = {"config": EXECUTORS[self.executor]}
        if not doc:
            return [base]
        path = self.workdir / f"overrides_{len(list(self.workdir.glob('overrides_*')))}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return [base, path]


EXECUTORS = common.EXECUTORS


def job_setup(
    code: common.Code, workdir: Path, executor: str, batch_size: int | None = None,
    transform_path: str | None = None,
) -> JobSetup:
    ops = yaml.safe_load((code.dir / REAL_CONFIG).read_text())["ops"]
    (op_key,) = ops
    # Real runs may be refused outside the maintenance windows: say so explicitly, as a release
    # engineer would outside them (the dry run gets the same config: it approves that plan).
    fields = config_fields(code)
    overrides: dict[str, Any] = (
        {"allow_outside_window": True} if "allow_outside_window" in fields else {}
    )
    if batch_size is not None:  # the run config's override of config/data_patches.yml
        overrides["batch_size"] = batch_size
    if transform_path is not None:  # default: the in-database path where the patch declares it
        if "transform_path" not in fields:
            raise SystemExit("--transform-path: the measured code has no transform_path option")
        overrides["transform_path"] = transform_path
    return JobSetup(code, workdir, op_key, overrides, executor)


def config_fields(code: common.Code) -> set[str]:
    """Field names of the patch's run config, as the measured code defines them."""
    probe = (
        "from stockrx_patches.registry import default_registry as r; "
        f"print(' '.join(r().get({JOB!r}).config_class.model_fields))"
    )
    res = common.run_monitored([sys.executable, "-c", probe], cwd=code.dir,
                               env=code.env(dict(os.environ)), timeout=120)
    if res.returncode != 0:
        raise SystemExit(f"cannot load the measured code in {code.dir}:\n{res.stderr[-2000:]}")
    return set(res.stdout.split())


def run_job(name: str, url: str, configs: list[Path], setup: JobSetup,
            args: argparse.Namespace) -> Outcome:
    return common.run_dagster_job(JOB, name, url, configs, setup.code, setup.workdir,
                                  args.timeout, AUDIT_KEY)


EMPTY_JOB = ("benchmarks.trivial_job", "empty_patch_shape")


def empty_job_executor(executor: str, home: Path) -> dict[str, Any]:
    """The empty job's executor config for ``--executor``. "default" is what the patch jobs'
    own executor does (patch_ops.executor): op processes forked from a fork server that has imported
    the code location, Dagster's CLI and the instance's modules; nothing of ours."""
    if executor != "default":
        return EXECUTORS[executor]
    from dagster import DagsterInstance

    from patch_ops.executor import instance_modules

    instance = DagsterInstance.from_config(str(home))
    try:
        preload = [EMPTY_JOB[0], "dagster._cli", *instance_modules(instance)]
    finally:
        instance.dispose()
    return {"multiprocess": {"start_method": {"forkserver": {"preload_modules": preload}}}}


def run_empty_job(setup: JobSetup, args: argparse.Namespace) -> Outcome:
    """benchmarks/trivial_job.py through ``dagster job execute`` with the patch job's executor
    and instance config: what Dagster itself costs a six-op run on the users' path."""
    home = common.new_dagster_home(setup.workdir, "empty_job", setup.code.dir)
    config = setup.workdir / "empty_job.yaml"
    execution = empty_job_executor(setup.executor, home)
    config.write_text(yaml.safe_dump({"execution": {"config": execution}}))
    module, job = EMPTY_JOB
    path = os.pathsep.join(p for p in (str(common.REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, DAGSTER_HOME=str(home), PYTHONPATH=path)
    return common.execute_dagster_job("Dagster alone: 6 empty ops",
                                      ["-m", module, "-j", job, "-c", str(config)], env,
                                      common.REPO_ROOT, home, args.timeout)


def run_profile(url: str, setup: JobSetup, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The in-process engine profile, in a child process that imports the measured code."""
    cmd = [sys.executable, "-m", "benchmarks.profile_engine", "--database-url", url,
           "--out", str(Path(args.profile).resolve()),
           "--config", json.dumps(run_config(setup.real_config) | setup.overrides)]
    res = common.run_monitored(cmd, env=setup.code.env(dict(os.environ)), cwd=setup.code.dir,
                               timeout=args.timeout * 2)
    for line in res.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return list(json.loads(line[len(RESULT_MARK):]))
    log("profile failed:\n" + res.stderr[-3000:])
    return []


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


make_copies = common.make_copies


def _same(a: Digest | None, b: Digest | None, part: str) -> str:
    return common.same(a, b, part)


def benchmark(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    code = common.measured_code(args.code, workdir)
    setup = job_setup(code, workdir, args.executor, args.batch_size, args.transform_path)
    log(f"measuring {code.label}; job config overrides {setup.overrides or 'none'}; "
        f"executor {args.executor}; {args.rounds} round(s)"
        + (f"; application stand-in {args.app_writer:g} writes/s" if args.app_writer else ""))
    copies = make_copies(args, workdir)
    log(f"seeded {copies.counts} in {copies.seed_seconds:.1f} s ({copies.description})")
    rounds: list[dict[str, Outcome]] = []
    run_ats: list[dt.datetime] = []
    profile: list[dict[str, Any]] = []
    try:
        seeded = common.digest(copies.seeded_url, min(args.naive_rows, args.items))
        for r in range(args.rounds):
            if args.rounds > 1:
                log(f"round {r + 1} of {args.rounds}")
            outcomes, run_at = one_round(args, setup, copies, workdir, seeded, first=r == 0)
            rounds.append(outcomes)
            run_ats.append(run_at)
        if args.profile:
            url = copies.fresh("profile")
            try:
                log("profiling the engine steps in-process ...")
                profile = run_profile(url, setup, args)
            finally:
                copies.discard(url)
    finally:
        copies.close()
    return {
        **common.result_fields(args, code, copies),
        "run_at": run_ats[-1].isoformat(),
        "percentage": str(setup.percentage),
        "outcomes": rounds[-1],
        "rounds": rounds,
        "run_ats": [r.isoformat() for r in run_ats],
        "profile": profile,
        "total_s": time.monotonic() - t0,
    }


def one_round(args: argparse.Namespace, setup: JobSetup, copies: common.Copies, workdir: Path,
              seeded: Digest, first: bool) -> tuple[dict[str, Outcome], dt.datetime]:
    """Every contender once, each on a fresh copy (the naive baseline in the first round only:
    it is the reference for the rows/min bound, not part of the job's); the final data checked."""
    subset = min(args.naive_rows, args.items)
    outcomes: dict[str, Outcome] = {}
    run_at = dt.datetime(2026, 1, 15, 2, 0, 0)  # replaced by the real run's run_at

    def measure(key: str, url: str | None, fn) -> Outcome:  # type: ignore[no-untyped-def]
        """Run ``fn(url)`` (with the application stand-in writing, if asked); digest the data it
        leaves (``url`` None: it uses no database)."""
        log(f"running {key} ...")
        cpu0 = common.server_cpu_seconds(copies.server_pid)
        with app_writer(url if key != "naive" else None, args.items, args.app_writer, workdir,
                        key) as writer:
            out = fn(url)
        cpu1 = common.server_cpu_seconds(copies.server_pid)
        if cpu0 is not None and cpu1 is not None:
            out.server_cpu_s = (cpu1 - cpu0) * out.scale
        out.writer = writer
        out.digest = common.digest(url, subset) if out.ok and url else None
        log(f"  {key}: rc {out.process.returncode}, {out.process.wall_s:.1f} s")
        outcomes[key] = out
        return out

    dry_cfg = setup.config_files(setup.dry_config)
    real_cfg = setup.config_files(setup.real_config)
    if "job" in args.only:
        # The real run comes after its dry run on the same data (the dry run approves it).
        url = copies.fresh("job")
        try:
            dry = measure("job_dry", url, lambda u: run_job("job dry", u, dry_cfg, setup, args))
            real = None
            if dry.ok:  # without its dry run, the real run is refused
                common.settle(url)
                real = measure("job_real", url,
                               lambda u: run_job("job real", u, real_cfg, setup, args))
        finally:
            copies.discard(url)
        if real and real.execution and real.execution.get("run_at"):
            run_at = real.execution["run_at"]
        elif real:
            real.notes.append(f"no run_at: baselines used {run_at}")
    for key in ("bare", "naive", "floor"):
        if key in args.only and (first or key != "naive"):
            url = copies.fresh(key)
            try:
                measure(key, url, lambda u, k=key: run_worker(k, u, run_at, setup.percentage,
                                                              args))
            finally:
                copies.discard(url)
    if "dagster" in args.only:
        measure("dagster", None, lambda _: run_empty_job(setup, args))
    if "zero" in args.only:
        above_all = {"min_price": 1e9}
        zdry = setup.config_files(setup.dry_config, above_all)
        zreal = setup.config_files(setup.real_config, above_all)
        url = copies.fresh("zero")
        try:
            zero = measure("zero_dry", url, lambda u: run_job("job dry, 0 rows", u, zdry, setup,
                                                              args))
            if zero.ok:
                measure("zero_real", url, lambda u: run_job("job real, 0 rows", u, zreal, setup,
                                                            args))
        finally:
            copies.discard(url)

    ref = outcomes["job_real"].digest if "job_real" in outcomes else None
    checks = {
        "job_real": lambda o: "reference",
        "bare": lambda o: _same(o.digest, ref, "full") + " to job real",
        "floor": lambda o: _same(o.digest, ref, "full") + " to job real",
        "dagster": lambda o: "no data (uses no database)",
        "naive": lambda o: _same(o.digest, ref, "subset") + f" to job real on items ≤ {subset:,}",
        "job_dry": lambda o: _same(o.digest, seeded, "full") + " to seed",
        "zero_dry": lambda o: _same(o.digest, seeded, "full") + " to seed",
        "zero_real": lambda o: _same(o.digest, seeded, "full") + " to seed",
    }
    for key, o in outcomes.items():
        o.check = checks[key](o)
    return outcomes, run_at


log = common.log


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

ORDER = ("bare", "naive", "floor", "dagster", "job_dry", "job_real", "zero_dry", "zero_real")
CONTENDERS = ("bare", "naive", "floor", "dagster", "job", "zero")


def bounds(outs: dict[str, Outcome]) -> list[str]:
    """What the measured floors allow, next to the targets (≥ 100× naive, ≤ 2× bare SQL)."""
    bare, naive, floor, empty = (outs.get(k) for k in ("bare", "naive", "floor", "dagster"))
    if not (bare and bare.ok and bare.work_s):
        return []
    lines = []
    if naive and naive.ok and naive.work_s and naive.rows:
        ratio = (bare.rows / bare.work_s) / (naive.rows / naive.work_s)
        lines.append(
            f"- bare SQL makes the changes at {ratio:.1f}× the naive baseline's rows/min (work): "
            "the most any contender that makes them with set-based SQL can expect (target for "
            "the job: ≥ 100×)."
        )
    if floor and floor.ok and empty and empty.ok:
        least = floor.process.wall_s + empty.process.wall_s
        lines.append(
            f"- safety floor {floor.process.wall_s:.1f} s + Dagster alone "
            f"{empty.process.wall_s:.1f} s = {least:.1f} s = "
            f"{least / bare.process.wall_s:.2f}× bare SQL's wall ({bare.process.wall_s:.1f} s): "
            "the least a real run can take that keeps the safety steps and runs as a Dagster "
            "job on this path, before pandera, the impact report, history and audit (target "
            "for the job: ≤ 2×)."
        )
    return ["", "### Bounds", "", *lines] if lines else []


def render(res: dict[str, Any]) -> str:
    """The report: with several rounds, their medians first, then each round as run."""
    rounds = res.get("rounds") or [res["outcomes"]]
    if len(rounds) == 1 and not res["args"].get("app_writer"):
        return render_round(res)
    args = res["args"]
    lines = [f"## inventory_price_adjustment (percentage {fmt_price(Decimal(res['percentage']))}), "
             f"{args['items']:,} items, {res['database']}: {len(rounds)} round(s)", "",
             *summary(rounds, ORDER), ""]
    for i, (outs, run_at) in enumerate(zip(rounds, res["run_ats"], strict=True), 1):
        lines += ["", f"## Round {i} of {len(rounds)}", "",
                  render_round(res | {"outcomes": outs, "run_at": run_at})]
    return "\n".join(lines) + "\n"


def render_round(res: dict[str, Any]) -> str:
    args, outs = res["args"], res["outcomes"]
    bare = outs.get("bare")
    lines = [
        f"## inventory_price_adjustment (percentage {fmt_price(Decimal(res['percentage']))}), "
        f"{args['items']:,} items, {res['database']}",
        "",
        f"Seeded {', '.join(f'{n:,} {t}' for t, n in res['seeded'].items())}"
        f"{common.copies_text(res)}. "
        f"Run timestamp of every contender: {res['run_at']} (the job's run_at). "
        f"Job executor: {res['executor']}.",
        "",
    ]
    rows = []
    for key in [k for k in ORDER if k in outs]:
        o = outs[key]
        name, wall, work, tail = common.contender_columns(
            o, bare, f" ({o.rows:,} rows measured, times ×{o.scale:g})"
        )
        rpm = (o.rows * o.scale) / work * 60 if work and o.rows else None
        rows.append([
            name,
            int(o.rows * o.scale) if o.rows else None,
            int(o.rows_changed * o.scale) if o.rows_changed is not None else None,
            wall,
            work,
            rpm,
            *tail,
        ])
    lines.append(common.table(
        ["contender", "rows", "changed", "wall s", "work s", "rows/min (work)", "× bare wall",
         "× bare work", "client CPU s", "DB CPU s", "largest process MB",
         "peak RSS MB (tree)", "procs",
         "final data"],
        rows,
    ))
    lines += [
        "",
        "wall s: the child process from spawn to exit (what a user waits for). work s: bare/naive "
        "= the SQL/ORM work inside the process; job = Dagster RUN_START → RUN_SUCCESS. rows = "
        "items in the target set. client CPU s: user+system CPU of the child process tree "
        "(wait4 rusage); DB CPU s: of the local database server meanwhile (PostgreSQL: its "
        "processes; MariaDB: the mariadbd process; – for SQLite, whose work is in the client); "
        "both far less sensitive to the machine's load "
        "than wall times (naive: ×scale). " + common.RSS_FOOTNOTE,
    ]
    floor = outs.get("floor")
    if floor and floor.steps:
        lines += ["", f"### {floor.name}: time per step", "",
                  common.table(["step", "s"], floor.steps)]
    for key in [k for k in ORDER if k.startswith(("dagster", "job", "zero")) and k in outs]:
        lines += common.op_timings_section(outs[key])
    lines += bounds(outs)
    if res["profile"]:
        from benchmarks.profile_engine import render_profile

        lines += ["", render_profile(res["profile"])]
    return "\n".join(lines) + "\n"



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
    p.add_argument("--mysql-copy", choices=common.MYSQL_COPY_METHODS, default="tablespace",
                   help="how --mysql copies the seeded data for each contender: tablespace "
                   "(InnoDB file copy, local server; the default) or insert (INSERT ... SELECT)")
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
    if args.profile and importlib.util.find_spec("pyinstrument") is None:
        p.error("--profile needs pyinstrument: pip install -e '.[bench]'")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    return common.run_benchmark(args, benchmark, render)


if __name__ == "__main__":
    sys.exit(main())
