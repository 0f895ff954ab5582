"""The plan's and the backup's per-row key cost, old code against new (session 17).

    python -m benchmarks.plan_cost --postgres --items 200000 --old /tmp/base [--rounds 3]
    python -m benchmarks.plan_cost --mysql --items 100000 --old /tmp/base

The price patch's data seeded once on a durable throwaway server; per round, each code version
(old, new; the order swaps every round) gets its own copy and runs in a child process of its own
``--executions`` executions one after the other (plan, then backup; each closed with its work
rows kept, as a production database keeps them for its retention period: the targets and the
backup mirror are shared by them all), then the safety floor's freeze and backup steps
(``floor_steps``) on the same copy. Every step is timed (wall, this process's CPU, the server's
CPU, WAL bytes on PostgreSQL) as a fresh op process would start it (engine disposed, caches
dropped), with its slowest statements.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import warnings
from typing import Any

#: Executions per copy (``--executions``): the first into empty framework tables, the later
#: ones next to the earlier ones' kept rows.
EXECUTIONS = 5
#: The safety floor's steps that the plan and the backup stand against.
FLOOR = ("plan: freeze the target ids", "backup: whole rows", "backup: key")


def worker(url: str, server_pid: str, executions: str) -> dict[str, Any]:
    from sqlalchemy import text

    from benchmarks.common import StatementTimer, server_cpu_seconds
    from benchmarks.price_adjustment import FLOOR_TABLES, floor_steps, item_columns
    from patch_ops import state
    from patch_ops.database import catalog_scope, get_engine
    from patch_ops.execution import finish_execution
    from patch_ops.steps.backup import take_backup
    from patch_ops.steps.plan import plan_execution
    from stockrx_patches.registry import default_registry

    registry = default_registry()
    name = "inventory_price_adjustment"
    patch = registry.get(name)
    settings = dataclasses.replace(registry.settings(name), require_approved_plan=False)
    engine = get_engine(url)
    postgres = engine.dialect.name == "postgresql"
    timer = StatementTimer()
    timer.attach(engine)
    pid = int(server_pid) if server_pid != "-" else None
    steps: list[dict[str, Any]] = []

    def wal() -> float:
        if not postgres:
            return 0.0
        with engine.connect() as conn:
            return float(conn.execute(text(
                "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')")).scalar_one())

    def step(label: str, fn: Any) -> Any:
        engine.dispose()
        state.forget_mirrors()  # a fresh op process starts without them
        w0 = wal()
        s0, c0, t0 = server_cpu_seconds(pid), time.process_time(), time.perf_counter()
        with catalog_scope():
            result = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        s1 = server_cpu_seconds(pid)
        sql = timer.take()
        steps.append({
            "step": label, "wall": wall, "cpu": cpu,
            "server_cpu": None if s0 is None or s1 is None else s1 - s0,
            "wal_mb": (wal() - w0) / 2**20, "statements": sum(n for _, _, n in sql),
            "top": [(round(s, 3), n, q[:160]) for q, s, n in sql[:5]],
        })
        return result

    for i in range(int(executions)):
        cfg = patch.config_class(adjustment_type="percentage", adjustment_value=8,
                                 allow_outside_window=True, dry_run=True)
        x = step(f"plan {i + 1}", lambda cfg=cfg: plan_execution(engine, patch, settings, cfg))
        step(f"backup {i + 1}", lambda x=x: take_backup(engine, x))
        finish_execution(engine, x, "completed")  # work rows kept (retention)

    floor = dict(floor_steps(engine.dialect.name, item_columns(engine)))
    for label in (x for x in FLOOR if x in floor):  # MariaDB: keyed as it is made
        def run(sql: str = floor[label]) -> None:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text(sql))
        step(f"floor {label}", run)
    with engine.begin() as conn:
        for t in FLOOR_TABLES[:2]:
            conn.execute(text(f"DROP TABLE {t}"))
    engine.dispose()
    return {"steps": steps}


def main() -> int:
    warnings.simplefilter("ignore")
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(*sys.argv[2:5]), default=str))
        return 0
    from benchmarks.ab import ab_arguments, ab_parse, run_ab

    ap = ab_arguments(__doc__.splitlines()[0])
    ap.add_argument("--executions", type=int, default=EXECUTIONS)
    args = ab_parse(ap)
    return run_ab(__file__, args, [str(args.executions)], lambda res: ", ".join(
        f"{s['step']} {s['wall']:.2f} s" for s in res["steps"]), report)


def report(runs: dict[str, list[dict[str, Any]]]) -> None:
    from benchmarks.ab import cpu_and_server, step_median

    names = [s["step"] for s in runs["old"][0]["steps"]]
    print("\n| step | old wall s | new wall s | ratio | old CPU+server s | new CPU+server s "
          "| ratio | WAL MB old → new |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for i, name in enumerate(names):
        def med(label: str, f: Any, i: int = i) -> float:
            return step_median(runs, label, i, f)

        ow, nw = med("old", lambda s: s["wall"]), med("new", lambda s: s["wall"])
        oc, nc = med("old", cpu_and_server), med("new", cpu_and_server)
        owal, nwal = med("old", lambda s: s["wal_mb"]), med("new", lambda s: s["wal_mb"])
        print(f"| {name} | {ow:.3f} | {nw:.3f} | {nw / ow:.2f} | {oc:.3f} | {nc:.3f} | "
              f"{nc / oc:.2f} | {owal:.1f} → {nwal:.1f} |")
    for label in ("old", "new"):
        for s in runs[label][-1]["steps"]:
            print(f"\n{label} {s['step']}: {s['wall']:.3f} s, {s['statements']} statements")
            for sec, n, q in s["top"][:3]:
                print(f"    {sec:8.3f} s {n:4d}x {q}")


if __name__ == "__main__":
    sys.exit(main())
