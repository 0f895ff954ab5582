"""The transform step's cost, statement by statement (issue 22, session 17). Old code against
new, interleaved on one seeded durable database.

    python -m benchmarks.transform_cost --postgres --items 200000 --rounds 3 \\
        --code before=/path/to/old/checkout --code after=.
    python -m benchmarks.transform_cost --mysql --items 100000 ...

Per round and code version, in turn, a child process with that version on its PYTHONPATH plans
a real run of ``inventory_price_adjustment`` (+8 %, approval not required) on the shared
database, backs it up, then times ``run_transform`` alone: wall, client + server CPU, WAL
(PostgreSQL), batches, connection checkouts, commits and every statement shape (SQLAlchemy
cursor events). The execution is then released; its mirror rows stay, as in production.
"""

from __future__ import annotations

import json
import os
import sys

MARK = "TRANSFORM_COST "


def child(url: str, show: int) -> None:
    import dataclasses
    import time

    from sqlalchemy import delete, event, text, update

    from benchmarks.common import StatementTimer, server_cpu_seconds
    from patch_ops.database import get_engine
    from patch_ops.execution import load_execution
    from patch_ops.state import executions, forget_mirrors, locks
    from patch_ops.steps.backup import take_backup
    from patch_ops.steps.plan import plan_execution
    from patch_ops.steps.transform import run_transform
    from resources.memory import MemoryGuard
    from stockrx_patches.registry import default_registry

    name = "inventory_price_adjustment"
    registry = default_registry()
    patch = registry.patches[name]
    settings = dataclasses.replace(registry.settings(name), require_approved_plan=False)
    engine = get_engine(url)
    cfg = patch.config_class(adjustment_type="percentage", adjustment_value=8,
                             allow_outside_window=True, dry_run=False)
    xid = plan_execution(engine, patch, settings, cfg)
    take_backup(engine, xid)
    forget_mirrors()
    engine.dispose()
    timer = StatementTimer()
    timer.attach(engine)
    counts = {"checkouts": 0, "commits": 0}
    event.listen(engine, "checkout", lambda *a: counts.__setitem__(
        "checkouts", counts["checkouts"] + 1))
    event.listen(engine, "commit", lambda *a: counts.__setitem__(
        "commits", counts["commits"] + 1))
    postgres = engine.dialect.name == "postgresql"
    with engine.connect() as conn:
        wal0 = conn.execute(text("SELECT pg_current_wal_lsn()")).scalar_one() if postgres else 0
    timer.take()
    counts.update(checkouts=0, commits=0)
    server_pid = int(os.environ["TRANSFORM_COST_SERVER_PID"])
    server0, client0 = server_cpu_seconds(server_pid) or 0.0, time.process_time()
    t0 = time.perf_counter()
    run_transform(engine, patch, xid, MemoryGuard(), batch_seconds=settings.batch_seconds)
    out: dict[str, object] = {"transform": time.perf_counter() - t0}
    out["client_cpu"] = time.process_time() - client0
    out["server_cpu"] = (server_cpu_seconds(server_pid) or 0.0) - server0
    out["cpu"] = out["client_cpu"] + out["server_cpu"]  # type: ignore[operator]
    stats = timer.take()
    out["statements"] = sum(n for _, _, n in stats)
    out["sql"] = sum(s for _, s, _ in stats)
    out.update(counts)
    with engine.begin() as conn:
        out["batches"] = int(load_execution(conn, xid)["batches_done"])
        if postgres:
            out["wal_mb"] = float(conn.execute(text(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), :a)"), {"a": wal0}).scalar_one()
            ) / 2**20
        conn.execute(delete(locks).where(locks.c.execution_id == xid))
        conn.execute(update(executions).where(executions.c.execution_id == xid)
                     .values(status="failed"))
    for st, s, n in stats[:show]:
        print(f"  {s:7.3f} s {n:4d}x  {st[:220]}", file=sys.stderr)
    print(MARK + json.dumps(out), flush=True)


def main() -> None:
    from benchmarks.ab import labelled_arguments, run_labelled

    ap = labelled_arguments(__doc__.splitlines()[0])
    ap.add_argument("--show", type=int, default=12, help="slowest statement shapes printed")
    args = ap.parse_args()
    if args.child_url:
        child(args.child_url, args.show)
        return
    run_labelled(args, "benchmarks.transform_cost", "TRANSFORM_COST_SERVER_PID", MARK,
                 ["--show", str(args.show)], echo=True, width=14, fmt="9.3f")


if __name__ == "__main__":
    main()
