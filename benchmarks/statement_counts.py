"""How many SQL statements each op of a patch job sends to the StockRx database, by kind, through
the real job (``dagster job execute``, op processes forked from the fork server).

The fixed cost of an op (issue 22) is mostly statements that do not move data: catalog lookups
(``has_table``, reflection), reads of the execution row, lock and audit bookkeeping. This runs a
0-row dry run and its approved 0-row real run of ``inventory_price_adjustment`` (no item is
above the price floor) on a small seeded database and counts, per op, every statement its
process sent: a ``sitecustomize`` put on the children's ``PYTHONPATH`` listens to every engine's
``before_cursor_execute`` and ``after_cursor_execute`` and appends one line per statement, with
its time, to a file; the Dagster event log gives each op's process id. With ``--changed`` the
runs use the patch's own config (rows change), so ``--show OP`` says where a real op's time goes.

    python -m benchmarks.statement_counts --postgres [--code REV] [--items 2000]
    python -m benchmarks.statement_counts --mysql --items 1000000 --changed --show commit_changes
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import contenders, databases, harness, report
from benchmarks.price_contenders import AUDIT_KEY, JOB, job_setup

LOG_ENV = "STOCKRX_STATEMENT_LOG"

SITECUSTOMIZE = f'''
import os
import time

def _listen():
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    path = os.environ["{LOG_ENV}"]

    def before(conn, cursor, statement, params, context, executemany):
        conn.info["statement_started"] = time.perf_counter()

    def after(conn, cursor, statement, params, context, executemany):
        if conn.engine.url.get_backend_name() == "sqlite":
            return  # the Dagster instance's own storage
        seconds = time.perf_counter() - conn.info.pop("statement_started")
        line = " ".join(statement.split())
        with open(path, "a") as f:
            f.write(f"{{os.getpid()}}\\t{{seconds:.4f}}\\t{{line}}\\n")

    event.listen(Engine, "before_cursor_execute", before)
    event.listen(Engine, "after_cursor_execute", after)

if os.environ.get("{LOG_ENV}"):
    _listen()
'''

#: Statement kinds, first match wins (case-insensitive regex on the one-line statement).
KINDS = (
    ("catalog", r"pg_catalog|information_schema|^show |^describe |^select current_schema"
                r"|^select version|^select pg_|^select @@|^select database\(\)"),
    ("execution row", r"^select .* from \S*data_patch_executions where "
                      r"\S*data_patch_executions\.execution_id = \S+( for update)?$"),
    ("locks", r"data_patch_locks"),
    ("audit", r"data_patch_audit"),
    ("ddl/analyze", r"^(create|alter|drop|analyze|vacuum)"),
)


def kind_of(statement: str) -> str:
    for name, pattern in KINDS:
        if re.search(pattern, statement, re.IGNORECASE):
            return name
    return "other"


def statements(log: Path) -> list[tuple[str, float, str]]:
    """The log's lines as (pid, seconds, one-line statement); none if the run sent none."""
    if not log.exists():
        return []
    rows = (line.split("\t", 2) for line in log.read_text().splitlines())
    return [(pid, float(seconds), statement) for pid, seconds, statement in rows]


def count(log: Path, pids: dict[int, str]) -> dict[str, collections.Counter[str]]:
    per_op: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for pid, _, statement in statements(log):
        op = pids.get(int(pid), f"pid {pid} (no op)")
        per_op[op][kind_of(statement)] += 1
        per_op[op]["all"] += 1
    return per_op


def render(name: str, per_op: dict[str, collections.Counter[str]]) -> str:
    kinds = ["all", *(k for k, _ in KINDS), "other"]
    rows: list[list[Any]] = [[op, *(c[k] for k in kinds)] for op, c in per_op.items()]
    total = collections.Counter[str]()
    for c in per_op.values():
        total.update(c)
    rows.append(["total", *(total[k] for k in kinds)])
    return f"### {name}\n\n" + report.table(["op", *kinds], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.statement_counts", description=__doc__)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--postgres", action="store_true", help="throwaway PostgreSQL (default)")
    where.add_argument("--mysql", action="store_true", help="throwaway MariaDB")
    where.add_argument("--sqlite", action="store_true", help="temporary SQLite files")
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--code", metavar="REV", help="as benchmarks.price_adjustment --code")
    p.add_argument("--changed", action="store_true",
                   help="run the patch's own config (rows change) instead of a 0-row run")
    p.add_argument("--show", metavar="OP", help="also print the statement shapes of these ops (comma-separated; all: every op)")
    args = p.parse_args(argv)
    args.database_url, args.mysql_copy = None, "insert"
    with harness.workdir() as work:
        code = contenders.measured_code(args.code, work)
        setup = job_setup(code, work, "default")
        hook = Path(tempfile.mkdtemp(dir=work))
        (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join([str(hook), *([old] if old else [])])
        copies = databases.make_copies(args, work)
        try:
            url = copies.fresh("counts")
            extra = {} if args.changed else {"min_price": 1e9}
            rows = "" if args.changed else "0-row "
            for label, base in ((f"{rows}dry run", setup.dry_config),
                                (f"{rows}real run", setup.real_config)):
                log = work / f"{label.replace(' ', '_')}.log"
                os.environ[LOG_ENV] = str(log)
                out = contenders.run_dagster_job(JOB, label, url,
                                                 setup.config_files(base, extra), code,
                                                 work, 600, AUDIT_KEY)
                steps = out.timings.steps if out.timings else []
                pids = {s.pid: s.step for s in steps if s.pid}
                print(f"{label}: {'ok' if out.ok else 'FAILED ' + '; '.join(out.notes)}")
                print(render(f"{label}, {code.label}", count(log, pids)))
                for op in (args.show or "").split(",") if args.show else []:
                    calls = collections.Counter[str]()
                    seconds: dict[str, float] = collections.defaultdict(float)
                    for pid, secs, statement in statements(log):
                        if op in ("all", pids.get(int(pid))):
                            shape = f"[{kind_of(statement)}] {statement[:150]}"
                            calls[shape] += 1
                            seconds[shape] += secs
                    step = next((f" (op {x.duration_s:.2f} s)" for x in steps if x.step == op), "")
                    print(f"\n{op}{step}: {sum(seconds.values()):.2f} s of SQL")
                    for shape, secs in sorted(seconds.items(), key=lambda kv: -kv[1]):
                        print(f"  {secs:8.3f} s {calls[shape]:4d}×  {shape}")
                print()
        finally:
            copies.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
