"""`stockrx-patches`: list patches, seed a demo database, read the execution history."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

from sqlalchemy import inspect, select

from patch_ops.state import executions
from resources.database import DatabaseUnavailable, check_connection, get_engine, redact_url

Handler = Callable[[argparse.Namespace], int]


def _engine(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    url = args.database_url or os.environ.get("STOCKRX_DATABASE_URL")
    if not url:
        raise SystemExit("error: give --database-url or set STOCKRX_DATABASE_URL")
    engine = get_engine(url)
    check_connection(engine)
    return engine


def cmd_list(args: argparse.Namespace) -> int:
    from stockrx_patches.registry import default_registry

    reg = default_registry()
    for name in sorted(reg.patches):
        print(f"{name}: {reg.settings(name).description}")
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    from stockrx_patches.seed import seed_demo

    engine = _engine(args)
    t0 = time.perf_counter()
    counts = seed_demo(engine, items=args.items, seed=args.seed, reset=args.reset)
    took = time.perf_counter() - t0
    print(
        f"seeded {redact_url(str(engine.url))} in {took:.1f}s: "
        + ", ".join(f"{n:,} {t}" for t, n in counts.items())
    )
    return 0


def _no_history(engine) -> bool:  # type: ignore[no-untyped-def]
    if not inspect(engine).has_table(executions.name):
        print("no executions yet")
        return True
    return False


def cmd_history(args: argparse.Namespace) -> int:
    engine = _engine(args)
    if _no_history(engine):
        return 0
    q = select(executions).order_by(executions.c.started_at.desc()).limit(args.limit)
    if args.patch:
        q = q.where(executions.c.patch_name == args.patch)
    with engine.connect() as conn:
        rows = conn.execute(q).mappings().all()
    fmt = "{:<36}  {:<28} {:<8} {:<10} {:<5} {:>10} {:>10}  {:<19}  {}"
    print(fmt.format("execution_id", "patch", "kind", "status", "dry", "records", "changed",
                     "started_at (UTC)", "error / rollback"))
    for r in rows:
        note = "ROLLED BACK " if r["rollback_performed"] else ""
        note += (r["error_message"] or "")[:80]
        print(fmt.format(r["execution_id"], r["patch_name"][:28], r["kind"], r["status"],
                         "yes" if r["dry_run"] else "no", f"{r['processed_records']:,}",
                         f"{r['staged_updates']:,}", f"{r['started_at']:%Y-%m-%d %H:%M:%S}",
                         note))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    engine = _engine(args)
    if _no_history(engine):
        return 1
    q = select(executions)
    if args.execution_id:
        q = q.where(executions.c.execution_id == args.execution_id)
    else:
        q = q.order_by(executions.c.started_at.desc()).limit(1)
    with engine.connect() as conn:
        r = conn.execute(q).mappings().first()
    if r is None:
        print(f"no execution {args.execution_id}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(dict(r), default=str, ensure_ascii=False, indent=2))
        return 0
    print(r["report_markdown"] or "(no impact report: the run stopped before validation)")
    status = r["status"].upper() + (" — ROLLED BACK" if r["rollback_performed"] else "")
    print(f"status: {status}; records processed: {r['processed_records']:,}; "
          f"rows changed: {r['staged_updates']:,}; "
          f"duration: {((r['completed_at'] or r['started_at']) - r['started_at']).total_seconds():.1f}s")
    if r["error_message"]:
        print(f"error: {r['error_message']}")
    return 0 if r["status"] == "completed" else 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stockrx-patches", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Handler, help_: str, db: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        if db:
            sp.add_argument("--database-url", help="default: $STOCKRX_DATABASE_URL")
        sp.set_defaults(handler=handler)
        return sp

    add("list", cmd_list, "list patches as name: description", db=False)
    sp = add("seed-demo", cmd_seed, "create and fill a demo StockRx database")
    sp.add_argument("--items", type=int, default=100_000)
    sp.add_argument("--seed", type=int, default=20261129)
    sp.add_argument("--reset", action="store_true", help="drop the StockRx tables first")
    sp = add("history", cmd_history, "recent executions")
    sp.add_argument("--limit", type=int, default=20)
    sp.add_argument("--patch")
    sp = add("report", cmd_report, "impact report of an execution (default: the latest)")
    sp.add_argument("execution_id", nargs="?")
    sp.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except DatabaseUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
