"""`stockrx-patches`: list patches, generate a new one, write the Dagster instance config, seed a
demo database, read the execution history."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from patch_ops.database import DatabaseUnavailable, check_connection, get_engine, redact_url
from patch_ops.dialects.names import has_table
from patch_ops.execution import HELD_BACK
from patch_ops.state import executions, rejects
from patch_ops.steps.holdback import held_back_rows
from patch_ops.steps.report import markdown_text
from stockrx_patches import audit_cli

Handler = Callable[[argparse.Namespace], int]


def _engine(args: argparse.Namespace, create: bool = False):  # type: ignore[no-untyped-def]
    url = args.database_url or os.environ.get("STOCKRX_DATABASE_URL")
    if not url:
        raise SystemExit("error: give --database-url or set STOCKRX_DATABASE_URL")
    engine = get_engine(url)
    check_connection(engine, create=create)
    return engine


def cmd_list(args: argparse.Namespace) -> int:
    from stockrx_patches.registry import default_registry

    reg = default_registry()
    for name in sorted(reg.patches):
        print(f"{name}: {reg.settings(name).description}")
    return 0


def cmd_new(args: argparse.Namespace) -> int:
    """Write a new patch (module, settings entry, test) that loads and changes nothing yet."""
    from stockrx_patches.generator import GeneratorError, generate
    from stockrx_patches.registry import REPO_ROOT

    root = Path(args.root).resolve() if args.root else REPO_ROOT
    try:
        written = generate(args.name, args.driving_table, root, args.description)
    except GeneratorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    module, config, test = (p.relative_to(root) for p in written)
    print(f"wrote {module} and {test}; added {args.name} to {config}")
    print(f"next: fill in the TODOs of {module}, then make its test pass: "
          f".venv/bin/python -m pytest {test}")
    return 0


def cmd_instance_config(args: argparse.Namespace) -> int:
    """Print the Dagster instance config with one run at a time per table of every patch."""
    from stockrx_patches.registry import RegistryError, instance_config_yaml

    try:
        text = instance_config_yaml(Path(args.base) if args.base else None)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    from stockrx_patches.seed import SeedRefused, seed_demo

    engine = _engine(args, create=True)
    t0 = time.perf_counter()
    try:
        counts = seed_demo(engine, items=args.items, seed=args.seed, reset=args.reset)
    except SeedRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    took = time.perf_counter() - t0
    print(
        f"seeded {redact_url(str(engine.url))} in {took:.1f}s: "
        + ", ".join(f"{n:,} {t}" for t, n in counts.items())
    )
    return 0


def _no_history(engine) -> bool:  # type: ignore[no-untyped-def]
    if not has_table(engine, executions):
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
        timing = (r["report"] or {}).get("timing") or {}
        if timing.get("outside_window_override"):
            note += f"OVERRIDE: {timing.get('override_reason') or 'outside the windows'} "
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
    _print_approval(engine, r)
    return 0 if r["status"] == "completed" else 2


def cmd_held(args: argparse.Namespace) -> int:
    """The driving rows an execution held back because the database would refuse their changes
    (default: the latest execution that held any back)."""
    engine = _engine(args)
    if _no_history(engine):
        return 1
    rj = rejects
    execution_id = args.execution_id
    with engine.connect() as conn:
        if not execution_id:
            execution_id = conn.execute(
                select(executions.c.execution_id)
                .where(select(rj.c.execution_id).where(
                    rj.c.execution_id == executions.c.execution_id, rj.c.check_name == HELD_BACK
                ).exists())
                .order_by(executions.c.started_at.desc())
                .limit(1)
            ).scalar()
            if execution_id is None:
                print("no execution held back any row")
                return 0
        ex = conn.execute(
            select(executions).where(executions.c.execution_id == execution_id)
        ).mappings().first()
        if ex is None:
            print(f"no execution {execution_id}", file=sys.stderr)
            return 1
        rows = held_back_rows(conn, execution_id)
    if args.json:
        print(json.dumps({"execution_id": execution_id, "patch": ex["patch_name"],
                          "dry_run": bool(ex["dry_run"]), "count": len(rows), "rows": rows},
                         ensure_ascii=False, indent=2))
        return 0
    mode = "dry run" if ex["dry_run"] else "real run"
    print(f"{ex['patch_name']} {mode} {execution_id}: {len(rows):,} row(s) held back "
          "(the database would refuse their changes; left unchanged, retried by the next run)")
    for r in rows:
        print(f"{r['source_id']}\t{r['table']}\t{r['refusal']}\t{r['values']}")
    return 0


def _print_approval(engine, r) -> None:  # type: ignore[no-untyped-def]
    """Plan hash, who launched the run, and for a real run the dry run that approved it."""
    if not r.get("plan_hash"):
        return
    print(f"plan hash: {r['plan_hash']}; launched by {markdown_text(str(r['launched_by']))}")
    approver_id = r.get("approved_by_execution_id")
    if approver_id:
        with engine.connect() as conn:
            who = conn.execute(
                select(executions.c.launched_by).where(executions.c.execution_id == approver_id)
            ).scalar()
        print(f"approved by dry run {approver_id} (launched by {who})")


def _print_report(engine, execution_id: str | None) -> None:  # type: ignore[no-untyped-def]
    if not execution_id:
        return
    with engine.connect() as conn:
        md = conn.execute(
            select(executions.c.report_markdown).where(executions.c.execution_id == execution_id)
        ).scalar()
    if md:
        print(md)


def _run_job(args: argparse.Namespace, job_name: str, op_name: str, config: dict):  # type: ignore[no-untyped-def]
    """Launch a job of the code location in this process (same checks, audit trail and
    notifications as from Dagster); returns (result, engine, id of the execution it recorded)."""
    from dagster import DagsterInstance

    engine = _engine(args)
    if args.database_url:  # the job's resource reads it from the environment, like in Dagster
        os.environ["STOCKRX_DATABASE_URL"] = args.database_url
    from stockrx_patches.definitions import defs

    instance = DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else None
    result = defs.resolve_job_def(job_name).execute_in_process(
        run_config={
            "ops": {op_name: {"config": config}},
            # The failure is printed below in one line; the step's traceback stays in the
            # Dagster event log.
            "loggers": {"console": {"config": {"log_level": "CRITICAL"}}},
        },
        instance=instance,
        raise_on_error=False,
    )
    if not has_table(engine, executions):
        return result, engine, None
    with engine.connect() as conn:
        execution_id = conn.execute(
            select(executions.c.execution_id)
            .where(executions.c.dagster_run_id == result.run_id)
            .order_by(executions.c.started_at.desc())
        ).scalar()
    return result, engine, execution_id


def _failure(result) -> str:  # type: ignore[no-untyped-def]
    for event in result.all_events:
        if event.is_step_failure:
            data = event.step_failure_data
            if data.user_failure_data is not None and data.user_failure_data.description:
                return str(data.user_failure_data.description)
            return str(data.error.message if data.error else "failed")
    return "failed"


def cmd_restore(args: argparse.Namespace) -> int:
    config = {"execution_id": args.execution_id, "dry_run": not args.apply,
              "skip_conflicts": args.skip_conflicts}
    result, engine, restore_id = _run_job(args, "restore_patch", "plan_restore", config)
    _print_report(engine, restore_id)
    if not result.success:
        print(_failure(result), file=sys.stderr)
        return 1
    print(("restored" if args.apply else "dry run, nothing changed") + f": restore execution "
          f"{restore_id}" + ("" if args.apply else " (use --apply to restore)"))
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    config = {"dry_run": not args.apply, "retention_days": args.retention_days}
    result, engine, purge_id = _run_job(args, "purge_expired_backups", "purge_backups", config)
    _print_report(engine, purge_id)
    if not result.success:
        print(_failure(result), file=sys.stderr)
        return 1
    if not args.apply:
        print("dry run, nothing removed (use --apply to remove)")
    return 0


def _config_value(raw: str):  # type: ignore[no-untyped-def]
    """A --set value as YAML reads it (8 → int, true → bool, 2026-12-01 → string)."""
    import yaml

    value = yaml.safe_load(raw)
    return value.isoformat() if hasattr(value, "isoformat") else value


def cmd_request(args: argparse.Namespace) -> int:
    """Insert a pending row into data_patch_requests (what release tooling does in SQL)."""
    import yaml

    from stockrx_patches.requests import submit_request

    config: dict = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        # Either the plan_patch config itself or a whole run config file (config/runs/*.yaml).
        config = dict(loaded.get("ops", {}).get("plan_patch", {}).get("config", loaded))
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            print(f"error: --set takes KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        config[key.strip()] = _config_value(raw)
    if args.real:
        config["dry_run"] = False
    engine = _engine(args)
    requested_by = args.requested_by or os.environ.get("USER") or "unknown"
    # The sensor's own checks, now: a request that could never run is refused at once. (The
    # jobs' resources read the URL from the environment, as in Dagster.)
    if args.database_url:
        os.environ["STOCKRX_DATABASE_URL"] = args.database_url
    from stockrx_patches.definitions import defs
    from stockrx_patches.registry import default_registry
    from stockrx_patches.sensors import request_problem

    problem, _ = request_problem(
        default_registry(), defs.resolve_job_def, args.patch, config, requested_by
    )
    if problem:
        print(f"error: request refused, nothing recorded: {problem}", file=sys.stderr)
        return 2
    request_id = submit_request(engine, args.patch, config, requested_by, args.release_tag)
    mode = "dry run" if config.get("dry_run", True) else "REAL run"
    print(f"request {request_id}: {args.patch} ({mode}) {json.dumps(config, ensure_ascii=False)} "
          f"is pending; the patch_request_sensor launches it (stockrx-patches requests)")
    return 0


def cmd_requests(args: argparse.Namespace) -> int:
    from stockrx_patches.requests import ensure_requests_table, requests

    engine = _engine(args)
    ensure_requests_table(engine)
    q = select(requests).order_by(requests.c.id.desc()).limit(args.limit)
    if args.request_id is not None:
        q = select(requests).where(requests.c.id == args.request_id)
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(q).mappings()]
    if args.request_id is not None and not rows:
        print(f"error: no request {args.request_id}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, default=str, ensure_ascii=False, indent=1))
    elif args.request_id is not None:  # one request, every field whole
        for key, value in rows[0].items():
            shown = json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else value
            print(f"{key}: {'' if shown is None else shown}")
    else:
        fmt = "{:>5}  {:<28} {:<9} {:<16} {:<12} {:<36}  {}"
        print(fmt.format("id", "patch", "status", "requested_by", "release", "dagster run",
                         "reason (whole: requests ID)"))
        for r in rows:
            print(fmt.format(r["id"], r["patch_name"][:28], r["status"],
                             (r["requested_by"] or "")[:16], (r["release_tag"] or "")[:12],
                             r["dagster_run_id"] or "", (r["reason"] or "")[:100]))
    return 0


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum`` (else a one-line usage error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


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
    sp = add("new", cmd_new, "write a new patch: its module, settings entry and test", db=False)
    sp.add_argument("name", help="lowercase snake_case, e.g. archive_idle_items")
    sp.add_argument("--driving-table", required=True,
                    help="the StockRx table whose rows are batched and counted")
    sp.add_argument("--description", help="one line for data_patches.yml and the docstring")
    sp.add_argument("--root", help="the repository to write into (default: this one)")
    sp = add("instance-config", cmd_instance_config,
             "print $DAGSTER_HOME/dagster.yaml: the base plus one run at a time per patch table",
             db=False)
    sp.add_argument("--base", help="base instance config (default: the repo's dagster.yaml)")
    sp = add("seed-demo", cmd_seed, "create and fill a demo StockRx database")
    sp.add_argument("--items", type=at_least(1), default=100_000)
    sp.add_argument("--seed", type=int, default=20261129)
    sp.add_argument("--reset", action="store_true", help="drop the StockRx tables first")
    sp = add("history", cmd_history, "recent executions")
    sp.add_argument("--limit", type=at_least(1), default=20)
    sp.add_argument("--patch")
    sp = add("report", cmd_report, "impact report of an execution (default: the latest)")
    sp.add_argument("execution_id", nargs="?")
    sp.add_argument("--json", action="store_true")
    sp = add("held", cmd_held, "rows an execution held back because the database would refuse "
             "them (default: the latest execution that held any back)")
    sp.add_argument("execution_id", nargs="?")
    sp.add_argument("--json", action="store_true")
    sp = add("restore", cmd_restore, "undo a committed patch execution (dry run by default)")
    sp.add_argument("execution_id")
    sp.add_argument("--apply", action="store_true", help="really restore (default: dry run)")
    sp.add_argument(
        "--skip-conflicts",
        action="store_true",
        help="restore the rows the application did not change since, report the others "
        "(default: refuse if there is any)",
    )
    sp = add("request", cmd_request, "ask for a patch run: a pending row in data_patch_requests")
    sp.add_argument("patch")
    sp.add_argument("--config", help="YAML/JSON file: the plan_patch config or a whole run config")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="a config field (repeat)")
    sp.add_argument("--real", action="store_true", help="a real run (dry_run: false)")
    sp.add_argument("--requested-by", help="default: $USER")
    sp.add_argument("--release-tag")
    sp = add("requests", cmd_requests, "recent release requests and what became of them")
    sp.add_argument("request_id", nargs="?", type=int, help="show this request, every field whole")
    sp.add_argument("--limit", type=at_least(1), default=20)
    sp.add_argument("--json", action="store_true", help="the rows as JSON, reasons whole")
    sp = add("purge-backups", cmd_purge, "remove backups past the retention (dry run by default)")
    sp.add_argument("--apply", action="store_true", help="really remove (default: dry run)")
    sp.add_argument(
        "--retention-days", type=at_least(1), help="default: security.audit_retention_days in the config"
    )
    audit_cli.add_parser(sub, _engine)
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
