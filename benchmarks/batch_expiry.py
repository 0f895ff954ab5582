"""batch_expiry_update (write off expired lots) against hand-written baselines, side by side,
plus the restore of its real run.

    python -m benchmarks.batch_expiry --postgres --items 200000
    python -m benchmarks.batch_expiry --sqlite --items 200000
    python -m benchmarks.batch_expiry --mysql --items 200000      # throwaway MariaDB, durable
    python -m benchmarks.batch_expiry --database-url URL --items 200000   # wiped + re-seeded

The seed (benchmarks.databases: fixed seed, fixed "today" 2026-01-15) gives ~0.24 expired lots with
stock per item for business date = the seed's today: 200,000 items → ~48,750 lots.

Contenders, each on its own identical copy of the same seeded data, each a child process whose
whole process tree is polled for RSS and whose CPU is read from wait4:

- ``bare SQL``: three set-based statements in one transaction (INSERT the remove log rows with
  window functions for the chained quantities, UPDATE the items, UPDATE the lots), no backup,
  no checks. The floor.
- ``naive ORM``: SQLAlchemy ORM, one lot at a time, commit every 1,000 lots; measured on the
  lots of the first ``--naive-rows`` items and scaled to all expired lots.
- ``job dry`` then ``job real`` on the same copy: ``dagster job execute -m
  stockrx_patches.definitions -j batch_expiry_update -c config/runs/batch_expiry_update[.real]
  .yaml -c <business_date, allow_outside_window>``, fresh DAGSTER_HOME with the repo's
  dagster.yaml, a throwaway audit key.
- ``restore dry`` then ``restore real`` of that real run's execution on the same copy
  (``-j restore_patch -c config/runs/restore_patch[.real].yaml -c <execution_id>``): the data
  must be exactly the seeded data afterwards.

The job fixes its run timestamp at plan time (``data_patch_executions.run_at``); it is read back
and handed to the baselines, so every column of inventories, batches and inventory_logs must
match (updated_at/created_at and the new log rows' ids included).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import Date, DateTime, bindparam, create_engine, select, text

from benchmarks import common, contenders, databases, digests, harness, report
from benchmarks.contenders import Outcome

JOB = "batch_expiry_update"
RESTORE_JOB = "restore_patch"
CONFIG_DIR = Path("config") / "runs"  # relative to the measured code
RESULT_MARK = common.RESULT_MARK
#: A throwaway audit key for this benchmark process only (``key_id:fernet_key``).
AUDIT_KEY = "bench:" + base64.urlsafe_b64encode(os.urandom(32)).decode()
#: Expired means expires_on before the business date; the default is the seed's "today".
DEFAULT_BUSINESS_DATE = databases.SEED_TODAY

log = common.log


# ---------------------------------------------------------------------------------------------
# Baselines (run in a child process: `--worker bare|naive`)
# ---------------------------------------------------------------------------------------------

EXPIRED = "b.expires_on < :cutoff AND b.quantity > 0"


def _pipes(*parts: str) -> str:
    return " || ".join(parts)


def _concat(*parts: str) -> str:
    return "CONCAT(" + ", ".join(parts) + ")"


#: What the bare SQL spells differently per database (the one place it does): string
#: concatenation, a lot's expiry date and its quantity as text ('YYYY-MM-DD', digits), and the
#: items' UPDATE from the per-item sums (``{sums}``: a subquery aliased ``s``).
EXPIRY_SQL: dict[str, dict[str, Any]] = {
    "postgresql": {
        "concat": _pipes, "exp_text": "to_char(b.expires_on, 'YYYY-MM-DD')",
        "qty_text": "CAST(b.quantity AS TEXT)",
        "update_items": "UPDATE inventories SET quantity = inventories.quantity - s.removed, "
        "inventory_logs_count = inventories.inventory_logs_count + s.lots, updated_at = :run_at "
        "FROM {sums} WHERE inventories.id = s.inventory_id",
    },
    "sqlite": {
        "concat": _pipes, "exp_text": "CAST(b.expires_on AS TEXT)",  # stored as 'YYYY-MM-DD'
        "qty_text": "CAST(b.quantity AS TEXT)",
        "update_items": "UPDATE inventories SET quantity = inventories.quantity - s.removed, "
        "inventory_logs_count = inventories.inventory_logs_count + s.lots, updated_at = :run_at "
        "FROM {sums} WHERE inventories.id = s.inventory_id",
    },
    # MySQL 8 syntax (MariaDB runs it too): CONCAT, a DATE as CHAR is 'YYYY-MM-DD', UPDATE ... JOIN.
    "mysql": {
        "concat": _concat, "exp_text": "CAST(b.expires_on AS CHAR)",
        "qty_text": "CAST(b.quantity AS CHAR)",
        "update_items": "UPDATE inventories JOIN {sums} ON inventories.id = s.inventory_id "
        "SET inventories.quantity = inventories.quantity - s.removed, "
        "inventories.inventory_logs_count = inventories.inventory_logs_count + s.lots, "
        "inventories.updated_at = :run_at",
    },
}
EXPIRY_SQL["mariadb"] = EXPIRY_SQL["mysql"]  # SQLAlchemy's name for mariadb+... URLs


def bare_statements(dialect: str) -> list[str]:
    """Log rows first (they need the quantities before), then items, then lots."""
    if dialect not in EXPIRY_SQL:
        raise SystemExit(f"no bare SQL baseline for {dialect}")
    d = EXPIRY_SQL[dialect]
    note = d["concat"]("'期限切れ廃棄: ロット '", "b.lot_code", "' (有効期限 '", d["exp_text"], "', '",
                       d["qty_text"], "'個)'")
    # Per item, lots in (expires_on, id) order; each row's previous quantity is the item's
    # quantity minus what the lots before it removed. Rows in (item, expiry, id) order, so the
    # new ids are the job's.
    removed_so_far = "sum(b.quantity) OVER w"
    sums = ("(SELECT b.inventory_id, sum(b.quantity) AS removed, count(*) AS lots "
            f"FROM batches b WHERE {EXPIRED} GROUP BY b.inventory_id) s")
    return [
        "INSERT INTO inventory_logs (inventory_id, delta, operation_type, previous_quantity, "
        "current_quantity, note, user_id, created_at, updated_at) "
        f"SELECT b.inventory_id, -b.quantity, 'remove', i.quantity - {removed_so_far} + "
        f"b.quantity, i.quantity - {removed_so_far}, {note}, NULL, :run_at, :run_at "
        f"FROM batches b JOIN inventories i ON i.id = b.inventory_id WHERE {EXPIRED} "
        "WINDOW w AS (PARTITION BY b.inventory_id ORDER BY b.expires_on, b.id "
        "ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) "
        "ORDER BY b.inventory_id, b.expires_on, b.id",
        d["update_items"].format(sums=sums),
        "UPDATE batches SET quantity = 0, updated_at = :run_at "
        "WHERE expires_on < :cutoff AND quantity > 0",
    ]


def _stmt(sql: str) -> Any:
    params: list[Any] = []
    if ":run_at" in sql:
        params.append(bindparam("run_at", type_=DateTime()))
    if ":cutoff" in sql:
        params.append(bindparam("cutoff", type_=Date()))
    return text(sql).bindparams(*params)


def bare_sql(url: str, run_at: dt.datetime, cutoff: dt.date) -> dict[str, Any]:
    engine = databases.baseline_engine(url)
    params = {"run_at": run_at, "cutoff": cutoff}
    t0 = time.perf_counter()
    counts = []
    with engine.begin() as conn:
        for sql in bare_statements(engine.dialect.name):
            counts.append(conn.execute(_stmt(sql), params).rowcount)
    work = time.perf_counter() - t0
    return {"work_s": work, "lots": counts[2], "items": counts[1], "logs": counts[0]}


def naive_orm(url: str, run_at: dt.datetime, cutoff: dt.date, limit: int) -> dict[str, Any]:
    """What a hand-run script typically does: one lot at a time, commit every 1,000 lots."""
    from sqlalchemy.orm import DeclarativeBase, Session

    from stockrx_patches import tables as stockrx_tables

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __table__ = stockrx_tables.inventories

    class Lot(Base):
        __table__ = stockrx_tables.batches

    class Log(Base):
        __table__ = stockrx_tables.inventory_logs

    engine = databases.baseline_engine(url)
    b = stockrx_tables.batches.c
    t0, cpu0 = time.perf_counter(), time.process_time()
    items: set[int] = set()
    with Session(engine) as session:
        lot_ids = session.scalars(
            select(b.id)
            .where(b.expires_on < cutoff, b.quantity > 0, b.inventory_id <= limit)
            .order_by(b.inventory_id, b.expires_on, b.id)
        ).all()
        for n, lot_id in enumerate(lot_ids, 1):
            lot = session.get(Lot, lot_id)
            item = session.get(Item, lot.inventory_id)  # type: ignore[union-attr]
            amount = lot.quantity  # type: ignore[union-attr]
            before = item.quantity  # type: ignore[union-attr]
            session.add(
                Log(
                    inventory_id=item.id,  # type: ignore[union-attr]
                    delta=-amount,
                    operation_type="remove",
                    previous_quantity=before,
                    current_quantity=before - amount,
                    note=f"期限切れ廃棄: ロット {lot.lot_code} "  # type: ignore[union-attr]
                    f"(有効期限 {lot.expires_on.isoformat()}, {amount}個)",  # type: ignore[union-attr]
                    user_id=None,
                    created_at=run_at,
                    updated_at=run_at,
                )
            )
            item.quantity = before - amount  # type: ignore[union-attr]
            item.inventory_logs_count += 1  # type: ignore[union-attr]
            item.updated_at = run_at  # type: ignore[union-attr]
            lot.quantity = 0  # type: ignore[union-attr]
            lot.updated_at = run_at  # type: ignore[union-attr]
            items.add(item.id)  # type: ignore[union-attr]
            if n % 1000 == 0:
                session.commit()
        session.commit()
    return {"work_s": time.perf_counter() - t0, "work_cpu_s": time.process_time() - cpu0,
            "lots": len(lot_ids), "items": len(items), "logs": len(lot_ids)}


def worker_main(args: argparse.Namespace) -> int:
    warnings.simplefilter("ignore")
    run_at = dt.datetime.fromisoformat(args.run_at)
    cutoff = dt.date.fromisoformat(args.business_date)
    if args.worker == "bare":
        result = bare_sql(args.database_url, run_at, cutoff)
    else:
        result = naive_orm(args.database_url, run_at, cutoff, args.naive_rows)
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


def run_worker(kind: str, url: str, run_at: dt.datetime, args: argparse.Namespace,
               total_lots: int) -> Outcome:
    cmd = [sys.executable, "-m", "benchmarks.batch_expiry", "--worker", kind,
           "--database-url", url, "--run-at", run_at.isoformat(),
           "--business-date", args.business_date, "--naive-rows", str(args.naive_rows)]
    proc = common.run_monitored(cmd, env=dict(os.environ), timeout=args.timeout)
    out = Outcome("bare SQL" if kind == "bare" else "naive ORM", 0, proc)
    res: dict[str, Any] = {}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            res = json.loads(line[len(RESULT_MARK):])
    if res:
        out.work_s = res["work_s"]
        out.rows = res["lots"]
        out.rows_changed = res["items"] + res["lots"]
    if kind == "naive" and out.rows:
        out.scale = total_lots / out.rows
        out.cpu_s = proc.cpu_s + res["work_cpu_s"] * (out.scale - 1)
    if not out.ok:
        out.notes.append("failed: " + " / ".join(proc.stderr.strip().splitlines()[-3:]))
    return out


# ---------------------------------------------------------------------------------------------
# The job and the restore
# ---------------------------------------------------------------------------------------------


class Runner:
    """Launches the patch job and the restore job of the measured code."""

    def __init__(self, code: contenders.Code, workdir: Path, args: argparse.Namespace):
        self.code, self.workdir, self.args = code, workdir, args

    def configs(self, base: str, op_key: str, cfg: dict[str, Any]) -> list[Path]:
        doc: dict[str, Any] = {"ops": {op_key: {"config": cfg}}}
        if self.args.executor != "default":
            doc["execution"] = {"config": contenders.EXECUTORS[self.args.executor]}
        path = self.workdir / f"overrides_{len(list(self.workdir.glob('overrides_*')))}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return [self.code.dir / CONFIG_DIR / base, path]

    def patch(self, name: str, url: str, real: bool) -> Outcome:
        # Outside the maintenance windows a real run is refused unless told; the dry run gets
        # the same config (part of the plan).
        cfg = {"business_date": self.args.business_date, "allow_outside_window": True}
        files = self.configs(f"{JOB}{'.real' if real else ''}.yaml", "plan_patch", cfg)
        return contenders.run_dagster_job(JOB, name, url, files, self.code, self.workdir,
                                          self.args.timeout, AUDIT_KEY)

    def restore(self, name: str, url: str, execution_id: str, real: bool) -> Outcome:
        files = self.configs(f"{RESTORE_JOB}{'.real' if real else ''}.yaml", "plan_restore",
                             {"execution_id": execution_id})
        return contenders.run_dagster_job(RESTORE_JOB, name, url, files, self.code,
                                          self.workdir, self.args.timeout, AUDIT_KEY,
                                          kind="restore")


def expired_counts(url: str, cutoff: dt.date) -> tuple[int, int, int]:
    """(expired lots with stock, their items, their total quantity) in a database."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                _stmt(f"SELECT count(*), count(DISTINCT b.inventory_id), "
                      f"coalesce(sum(b.quantity), 0) FROM batches b WHERE {EXPIRED}"),
                {"cutoff": cutoff},
            ).one()
    finally:
        engine.dispose()
    return int(row[0]), int(row[1]), int(row[2])


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def benchmark(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    code = contenders.measured_code(args.code, workdir)
    runner = Runner(code, workdir, args)
    log(f"measuring {code.label}; business date {args.business_date}; executor {args.executor}")
    copies = databases.make_copies(args, workdir)
    log(f"seeded {copies.counts} in {copies.seed_seconds:.1f} s ({copies.description})")
    cutoff = dt.date.fromisoformat(args.business_date)
    lots, items, qty = expired_counts(copies.seeded_url, cutoff)
    subset = min(args.naive_rows, args.items)
    sub_lots = expired_counts_subset(copies.seeded_url, cutoff, subset)
    log(f"{lots:,} expired lots with stock (expires_on < {cutoff}) on {items:,} items, "
        f"{qty:,} units; naive subset: items ≤ {subset:,}, {sub_lots:,} lots")
    outcomes: dict[str, Outcome] = {}
    run_at = dt.datetime(2026, 1, 15, 2, 0, 0)  # replaced by the real run's run_at
    tables = digests.ALL_TABLES

    def measure(key: str, url: str, fn) -> Outcome:  # type: ignore[no-untyped-def]
        log(f"running {key} ...")
        cpu0 = common.server_cpu_seconds(copies.server_pid)
        out = fn(url)
        cpu1 = common.server_cpu_seconds(copies.server_pid)
        if cpu0 is not None and cpu1 is not None:
            out.server_cpu_s = (cpu1 - cpu0) * out.scale
        out.digest = digests.digest(url, subset, tables, id_free=True) if out.ok else None
        log(f"  {key}: rc {out.process.returncode}, {out.process.wall_s:.1f} s")
        outcomes[key] = out
        return out

    try:
        seeded = digests.digest(copies.seeded_url, subset, tables, id_free=True)
        if "job" in args.only:
            url = copies.fresh("job")
            try:
                dry = measure("job_dry", url, lambda u: runner.patch("job dry", u, False))
                databases.settle(url)
                real = measure("job_real", url, lambda u: runner.patch("job real", u, True))
                for o in (dry, real):
                    # The job's target_count counts items (and a restore's, rows of every
                    # table): the lots column shows lots, unknown (–) for a run that failed.
                    o.rows = lots if o.ok else 0
                ex = real.execution or {}
                if real.ok and ex.get("run_at"):
                    run_at = ex["run_at"]
                else:
                    real.notes.append(f"no run_at: baselines used {run_at}")
                if "restore" in args.only and real.ok and ex.get("execution_id"):
                    xid = str(ex["execution_id"])
                    rdry = measure("restore_dry", url,
                                   lambda u: runner.restore("restore dry", u, xid, False))
                    rreal: Outcome | None = None
                    if rdry.ok:
                        rreal = measure("restore_real", url,
                                        lambda u: runner.restore("restore real", u, xid, True))
                    for ro in (rdry, rreal):
                        if ro is not None:
                            ro.rows = lots if ro.ok else 0  # the lots the restore puts back
            finally:
                copies.discard(url)
        for key in ("bare", "naive"):
            if key in args.only:
                url = copies.fresh(key)
                try:
                    measure(key, url, lambda u, k=key: run_worker(k, u, run_at, args, lots))
                finally:
                    copies.discard(url)
    finally:
        copies.close()

    ref = outcomes["job_real"].digest if "job_real" in outcomes else None
    real_digest = ref
    checks = {
        "job_real": lambda o: "reference",
        "bare": lambda o: digests.same(o.digest, ref, "full") + " to job real",
        "naive": lambda o: digests.same(o.digest, ref, "subset")
        + f" to job real on items ≤ {subset:,}",
        "job_dry": lambda o: digests.same(o.digest, seeded, "full") + " to seed",
        "restore_dry": lambda o: digests.same(o.digest, real_digest, "full") + " to job real",
        "restore_real": lambda o: digests.same(o.digest, seeded, "full") + " to seed",
    }
    for key, o in outcomes.items():
        o.check = checks[key](o)
    return {
        **harness.result_fields(args, code, copies),
        "run_at": run_at.isoformat(),
        "business_date": args.business_date,
        "expired": {"lots": lots, "items": items, "quantity": qty, "subset_lots": sub_lots},
        "outcomes": outcomes,
        "total_s": time.monotonic() - t0,
    }


def expired_counts_subset(url: str, cutoff: dt.date, subset: int) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(
                _stmt(f"SELECT count(*) FROM batches b WHERE {EXPIRED} "
                      "AND b.inventory_id <= :subset"),
                {"cutoff": cutoff, "subset": subset},
            ).scalar_one())
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

ORDER = ("bare", "naive", "job_dry", "job_real", "restore_dry", "restore_real")
CONTENDERS = ("bare", "naive", "job", "restore")


def render(res: dict[str, Any]) -> str:
    args, outs, exp = res["args"], res["outcomes"], res["expired"]
    bare = outs.get("bare")
    lines = [
        f"## batch_expiry_update (business date {res['business_date']}), {args['items']:,} items, "
        f"{res['database']}",
        "",
        f"Seeded {', '.join(f'{n:,} {t}' for t, n in res['seeded'].items())}"
        f"{report.copies_text(res)}. "
        f"**{exp['lots']:,} expired lots with stock** on {exp['items']:,} items "
        f"({exp['quantity']:,} units written off). Run timestamp of every contender: "
        f"{res['run_at']} (the job's run_at). Job executor: {res['executor']}.",
        "",
    ]
    rows = []
    for key in [k for k in ORDER if k in outs]:
        o = outs[key]
        name, wall, work, tail = report.contender_columns(
            o, bare,
            f" (items ≤ {min(args['naive_rows'], args['items']):,}: {o.rows:,} lots measured, "
            f"times ×{o.scale:.2f})",
        )
        lots = round(o.rows * o.scale) if o.rows else None
        rpm = lots / work * 60 if work and lots else None
        rows.append([name, lots, wall, work, rpm, *tail])
    lines.append(report.table(
        ["contender", "lots", "wall s", "work s", "lots/min (work)", "× bare wall",
         "× bare work", "client CPU s", "DB CPU s", "largest process MB",
         "peak RSS MB (tree)", "procs",
         "final data"],
        rows,
    ))
    lines += [
        "",
        "wall s: the child process from spawn to exit (what a user waits for). work s: bare/naive "
        "= the SQL/ORM work inside the process; job/restore = Dagster RUN_START → RUN_SUCCESS. "
        "lots = expired lots with stock written off (restore: put back). client CPU s: "
        "user+system CPU of the child process tree (wait4 rusage); DB CPU s: of the local "
        "database server meanwhile (PostgreSQL: its processes; MariaDB: the mariadbd process; – "
        "for SQLite); naive: ×scale. "
        + report.RSS_FOOTNOTE
        + " Final data: digests of every column of inventories, batches and inventory_logs in "
        "id order.",
    ]
    for key in [k for k in ORDER if k.startswith(("job", "restore")) and k in outs]:
        lines += report.op_timings_section(outs[key])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.batch_expiry",
        description="Benchmark batch_expiry_update (and the restore of its real run) against "
        "bare SQL and a naive ORM loop.",
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
    p.add_argument("--items", type=int, default=200_000,
                   help="items to seed (default 200,000: ~48,750 expired lots with stock)")
    p.add_argument("--business-date", default=DEFAULT_BUSINESS_DATE.isoformat(),
                   help="the run's business date: lots expiring before it are written off "
                   f"(default {DEFAULT_BUSINESS_DATE}, the seed's today)")
    p.add_argument("--naive-rows", type=int, default=20_000,
                   help="the naive ORM baseline writes off the lots of items id <= N (default "
                   "20,000: ~4,900 lots); its times are scaled to all expired lots")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds before a contender is killed (default 900)")
    p.add_argument("--only", default=",".join(CONTENDERS),
                   help="comma-separated contenders to run (default: all of "
                   f"{','.join(CONTENDERS)}; job = dry + real run, restore = dry + real restore "
                   "of the job's real run, needs job)")
    p.add_argument("--executor", choices=sorted(contenders.EXECUTORS), default="default",
                   help="the jobs' executor (default: the jobs' own, one process per op forked "
                   "from a preloaded fork server; spawn: Dagster's stock multiprocess)")
    p.add_argument("--code", metavar="REV",
                   help="measure a commit (git archive, e.g. HEAD) or 'snapshot' (a copy of the "
                   "working tree taken at start) instead of the live working tree")
    p.add_argument("--json", metavar="PATH", help="write the raw results as JSON")
    p.add_argument("--output", metavar="PATH", help="append the printed report to this file")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--worker", choices=["bare", "naive"], help=argparse.SUPPRESS)
    p.add_argument("--run-at", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker and not (args.database_url and args.run_at):
        p.error("--worker needs --database-url and --run-at")
    try:
        dt.date.fromisoformat(args.business_date)
    except ValueError:
        p.error(f"--business-date must be YYYY-MM-DD, got {args.business_date!r}")
    args.only = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = set(args.only) - set(CONTENDERS)
    if unknown:
        p.error(f"unknown contender(s) {sorted(unknown)}; choose from {', '.join(CONTENDERS)}")
    if "restore" in args.only and "job" not in args.only:
        p.error("restore undoes the job's real run: --only needs job too")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    return harness.run_benchmark(args, benchmark, render)


if __name__ == "__main__":
    sys.exit(main())
