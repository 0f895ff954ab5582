"""The transform step on its two paths, side by side (issue 22): in the database vs in pandas.

    python -m benchmarks.transform_paths --sqlite --items 100000 [--rounds 3]
    python -m benchmarks.transform_paths --postgres --items 100000

One seeded database (the benchmarks' seed); per round and path, in turn: plan a dry run of
``inventory_price_adjustment`` (+8 %), back it up, then time ``run_transform`` alone (the
step's engine function, in this process; settings' batch size and duration target). Each
execution is then released (locks dropped) so the next can plan; its mirror rows stay.
Prints each step time and the medians.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import delete, update

from benchmarks.databases import seed
from patch_ops.database import get_engine
from patch_ops.patch import PYTHON_PATH, SQL_PATH
from patch_ops.state import executions, forget_mirrors, locks
from patch_ops.steps.backup import take_backup
from patch_ops.steps.plan import plan_execution
from patch_ops.steps.transform import run_transform
from resources.memory import MemoryGuard
from stockrx_patches.registry import default_registry

PATCH = "inventory_price_adjustment"


def one(url: str, path: str) -> float:
    registry = default_registry()
    patch, settings = registry.patches[PATCH], registry.settings(PATCH)
    engine = get_engine(url)
    cfg = patch.config_class(adjustment_type="percentage", adjustment_value=8,
                             allow_outside_window=True, transform_path=path)
    execution_id = plan_execution(engine, patch, settings, cfg)
    take_backup(engine, execution_id)
    forget_mirrors()
    t0 = time.perf_counter()
    run_transform(engine, patch, execution_id, MemoryGuard(), batch_seconds=settings.batch_seconds)
    seconds = time.perf_counter() - t0
    with engine.begin() as conn:
        conn.execute(delete(locks).where(locks.c.execution_id == execution_id))
        conn.execute(update(executions).where(executions.c.execution_id == execution_id)
                     .values(status="failed"))
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    db = ap.add_mutually_exclusive_group(required=True)
    db.add_argument("--sqlite", action="store_true")
    db.add_argument("--postgres", action="store_true")
    db.add_argument("--database-url")
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.sqlite:
            url = f"sqlite:///{Path(tmp) / 'bench.sqlite'}"
        elif args.postgres:
            from tests.support.postgres import PostgresServer

            server = PostgresServer.from_env()
            server.start()
            url = server.create_database()
        else:
            url = args.database_url
        try:
            seed(url, args.items)
            times: dict[str, list[float]] = {SQL_PATH: [], PYTHON_PATH: []}
            for r in range(args.rounds):
                for path in (PYTHON_PATH, SQL_PATH):
                    s = one(url, path)
                    times[path].append(s)
                    print(f"round {r + 1} {path:6}: transform {s:.2f} s", flush=True)
            for path, ts in times.items():
                print(f"{path:6} median {statistics.median(ts):.2f} s  ({', '.join(f'{t:.2f}' for t in ts)})")
        finally:
            if server is not None:
                server.stop()


if __name__ == "__main__":
    main()
