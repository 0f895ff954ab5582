"""What naming the rows the database refuses costs (issue 20): a dry run of batch_expiry_update
on N items with one expired lot each, K of them with stock reserved (the reserved-quantity CHECK
refuses writing their lot off), run in-process; printed: the trial applies of the search, the
longest time one attempt held its transaction (its row locks), the search's and the run's time.

    python -m benchmarks.refusal_search --items 20000 --bad 10                 # SQLite file
    python -m benchmarks.refusal_search --postgres --items 1000000 --bad 10   # throwaway server
    python -m benchmarks.refusal_search --database-url URL --items 1000000 --bad 10

The URL's database must be empty (the schema of tests/support/production.py is created in it).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

from tests.support.production import BD, expired_items, production_schema
from tests.support.stockrx import latest_execution, run_patch

JOB = "batch_expiry_update"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--database-url")
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--bad", type=int, default=10)
    p.add_argument("--seed", type=int, default=20)
    p.add_argument("--postgres", action="store_true", help="on a throwaway PostgreSQL server")
    args = p.parse_args()
    if args.postgres:
        from tests.support.postgres import PostgresServer

        server = PostgresServer.from_env().start()
        try:
            measure(server.create_database(), args)
        finally:
            server.stop()
    else:
        measure(args.database_url or f"sqlite:///{Path(tempfile.mkdtemp()) / 'r.sqlite'}", args)


def measure(url: str, args: argparse.Namespace) -> None:
    engine, md = production_schema(url)
    bad = random.Random(args.seed).sample(range(1, args.items + 1), args.bad)
    t0 = time.perf_counter()
    for start in range(0, args.items, 100_000):  # bounded memory while seeding
        n = min(100_000, args.items - start)
        expired_items(engine, md, n, {i: 1 for i in bad if start < i <= start + n},
                      first=start + 1)
    seeded = time.perf_counter() - t0
    os.environ.setdefault("STOCKRX_PATCHES_LOG_LEVEL", "WARNING")
    t0 = time.perf_counter()
    result = run_patch(url, JOB, {"business_date": BD.isoformat(), "dry_run": True},
                       approve=False)
    took = time.perf_counter() - t0
    ex = latest_execution(engine, JOB)
    held = (ex["report"] or {}).get("held_back") or {}
    search = held.get("search") or {}
    print(f"{engine.dialect.name}: {args.items:,} items, {args.bad} refused; seeded in "
          f"{seeded:.1f} s; dry run {'ok' if result.success else 'FAILED'} in {took:.1f} s")
    print(f"held back {held.get('count')} (expected {args.bad}); trial applies "
          f"{search.get('attempts')}; longest attempt (lock time) "
          f"{search.get('longest_attempt_seconds')} s; search {search.get('seconds')} s")


if __name__ == "__main__":
    main()
