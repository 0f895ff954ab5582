"""`stockrx-patches audit ...`: check, read and prune the encrypted audit trail.

    audit verify                      exit 1 and list every problem if the chain is broken
    audit show EXECUTION_ID [--json]  the events of an execution, decrypted (needs the key)
    audit new-key [KEY_ID]            print a fresh `key_id:fernet_key` line
    audit purge [--older-than-days N] [--dry-run]
                                      drop events past the retention, keep the chain verifiable

Keys come from STOCKRX_AUDIT_KEYS (`key_id:fernet_key` entries, newest first, comma separated)
and/or a key file (STOCKRX_AUDIT_KEY_FILE or --key-file, one entry per line). There is no option
to pass a key on the command line: it would end up in shell history and process listings. A key
file inside the project's repository is refused: keys never live next to the code.
"""

# ruff: noqa: T201 - a command line tool prints (cli.py has the same exemption in pyproject.toml)
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

from dagster import DagsterInstance
from sqlalchemy import exists, func, select

from patch_ops.audit import (
    AuditChainBroken,
    AuditConfigError,
    AuditKeyMissing,
    AuditKeyring,
    audit_checkpoints,
    audit_events,
    audit_head,
    purge_events,
    read_events,
    verify_chain,
)
from patch_ops.audit.anchors import (
    ANCHOR_FILE_ENV,
    ANCHOR_TAG,
    Anchor,
    check_anchors,
    from_file,
    from_tag_values,
)
from patch_ops.audit.errors import AuditProblem
from patch_ops.dialects.names import has_table
from patch_ops.state import executions

KEYS_ENV = "STOCKRX_AUDIT_KEYS"
KEY_FILE_ENV = "STOCKRX_AUDIT_KEY_FILE"
SOME_UNREADABLE = 3  # exit code of `audit show` when some encrypted parts could not be read


def keyring_from_env(key_file: str | None = None) -> AuditKeyring:
    """The keyring from the environment (a key file inside the repository is refused)."""
    path = key_file or os.environ.get(KEY_FILE_ENV) or None
    return AuditKeyring.from_config(os.environ.get(KEYS_ENV) or None, path)


def _has_audit_tables(engine) -> bool:  # type: ignore[no-untyped-def]
    return all(has_table(engine, t) for t in (audit_events, audit_head, audit_checkpoints))


def _real_runs(engine) -> int:  # type: ignore[no-untyped-def]
    if not has_table(engine, executions):
        return 0
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(executions)
                .where(executions.c.kind == "patch", executions.c.dry_run.is_(False))
            ).scalar_one()
        )


def outside_anchors(anchor_file: str | None) -> list[Anchor]:
    """The anchors kept outside the StockRx database: the anchor file (--anchor-file or
    $STOCKRX_AUDIT_ANCHOR_FILE) and the Dagster instance's run tags (when $DAGSTER_HOME is set)."""
    anchors: list[Anchor] = []
    path = anchor_file or os.environ.get(ANCHOR_FILE_ENV)
    if path:
        if not Path(path).is_file():
            raise AuditConfigError(f"audit anchor file {path} does not exist")
        anchors += from_file(path)
    if os.environ.get("DAGSTER_HOME"):
        with DagsterInstance.get() as instance:
            for _key, values in instance.get_run_tags(tag_keys=[ANCHOR_TAG]):
                anchors += from_tag_values(values)
    return anchors


def executions_without_events(engine) -> list[str]:  # type: ignore[no-untyped-def]
    """Real patch executions the trail has no event of (since its last retention purge)."""
    if not has_table(engine, executions):
        return []
    with engine.connect() as conn:
        since = conn.execute(select(func.max(audit_checkpoints.c.created_at))).scalar()
        query = select(executions.c.execution_id).where(
            executions.c.kind == "patch", executions.c.dry_run.is_(False),
            ~exists().where(audit_events.c.execution_id == executions.c.execution_id),
        )
        if since is not None:
            query = query.where(executions.c.started_at > since.replace(tzinfo=None))
        return [str(e) for e in conn.execute(query).scalars()]


def cmd_verify(args: argparse.Namespace, engine) -> int:  # type: ignore[no-untyped-def]
    keyring = keyring_from_env(args.key_file)
    anchors = outside_anchors(getattr(args, "anchor_file", None))
    if not _has_audit_tables(engine):
        real = _real_runs(engine)
        if real or anchors:
            print(
                f"audit trail MISSING: no audit tables, but {real} real patch run(s) are "
                f"recorded and {len(anchors)} anchor(s) outside the database say it existed "
                "(dropped tables, or runs made with log_encryption: false)"
            )
            return 1
        print("no audit trail in this database yet: nothing to verify")
        return 0
    report = verify_chain(engine, keyring)
    report = dataclasses.replace(report, problems=[
        *report.problems,
        *check_anchors(engine, anchors),
        *[AuditProblem(None, "missing_events", f"real execution {e} has no audit event")
          for e in executions_without_events(engine)],
    ])
    if report.ok:
        print(
            f"audit chain OK: {report.checked:,} event(s) checked, head seq {report.head_seq}"
            + (f", purged through seq {report.checkpoint_seq}" if report.checkpoint_seq else "")
        )
        return 0
    print(f"audit chain BROKEN: {len(report.problems)} problem(s)")
    for p in report.problems:
        where = f"seq {p.seq}" if p.seq is not None else "head"
        print(f"  {where}: {p.kind}: {p.detail}")
    if "unverifiable" in report.kinds and not keyring.has_key:
        print(f"  (no audit key given: set {KEYS_ENV} or {KEY_FILE_ENV} to check signatures)")
    return 1


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def cmd_show(args: argparse.Namespace, engine) -> int:  # type: ignore[no-untyped-def]
    keyring = keyring_from_env(args.key_file)
    if not _has_audit_tables(engine):
        print("no audit trail in this database", file=sys.stderr)
        return 1
    events = read_events(engine, keyring, args.execution_id)
    if not events:
        print(f"no audit events for execution {args.execution_id}", file=sys.stderr)
        return 1
    unreadable = [e for e in events if not e["readable"]]
    if args.json:
        print(json.dumps(events, ensure_ascii=False, indent=2, default=str))
    else:
        print(f"execution {args.execution_id}: {len(events)} audit event(s)")
        for e in events:
            at = e["occurred_at"].isoformat(sep=" ", timespec="seconds")
            print(f"\n#{e['seq']}  {at}  {e['event_type']}  by {e['actor']}")
            print(f"  public: {_json(e['public'])}")
            if e["key_id"] is None:
                continue
            if e["readable"]:
                print(f"  secret (key {e['key_id']}): {_json(e['secret'])}")
            else:
                print(f"  secret (key {e['key_id']}): NOT READABLE: {e['error']}")
        print("\n(`stockrx-patches audit verify` checks that the chain is intact)")
    if unreadable:
        print(
            f"{len(unreadable)} event(s) not readable with the configured keys "
            f"({', '.join(keyring.key_ids) or 'none'}): keep old keys after the new one in "
            f"{KEYS_ENV} when rotating",
            file=sys.stderr,
        )
        return SOME_UNREADABLE
    return 0


def cmd_new_key(args: argparse.Namespace) -> int:
    key_id = args.key_id or f"k{dt.datetime.now(dt.UTC):%Y%m%d%H%M%S}"
    try:
        entry = AuditKeyring.new_entry(key_id)
    except AuditConfigError as exc:
        print(f"error: {exc} (letters, digits, '_', '.', '-'; at most 64)", file=sys.stderr)
        return 1
    print(entry)
    print(
        f"put it first in {KEYS_ENV} (comma separated), keep the previous keys after it so older "
        "events stay readable; never commit it",
        file=sys.stderr,
    )
    return 0


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user database in some containers
        return "unknown"


def cmd_purge(args: argparse.Namespace, engine) -> int:  # type: ignore[no-untyped-def]
    from stockrx_patches.registry import load_project_config

    days = args.older_than_days
    if days is None:
        days = int(load_project_config().security.get("audit_retention_days", 90))
    if days < 1:
        print(f"error: --older-than-days must be at least 1, got {days}", file=sys.stderr)
        return 1
    if not _has_audit_tables(engine):
        print("no audit trail in this database: nothing to purge")
        return 0
    keyring = keyring_from_env(args.key_file)
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=days)
    if args.dry_run:
        report = verify_chain(engine, keyring)
        with engine.connect() as conn:
            first_kept = conn.scalar(
                select(func.min(audit_events.c.seq)).where(
                    audit_events.c.seq > report.checkpoint_seq,
                    audit_events.c.occurred_at >= cutoff,
                )
            )
            through = report.head_seq if first_kept is None else int(first_kept) - 1
            n = conn.scalar(
                select(func.count())
                .select_from(audit_events)
                .where(audit_events.c.seq > report.checkpoint_seq, audit_events.c.seq <= through)
            )
        state = "verifies" if report.ok else "is BROKEN (a real purge would refuse)"
        print(
            f"dry run: would purge {n:,} event(s) older than {days} days "
            f"(before {cutoff:%Y-%m-%d %H:%M} UTC); the chain {state}"
        )
        return 0 if report.ok else 1
    try:
        done = purge_events(engine, keyring, cutoff, actor=_user())
    except AuditChainBroken as exc:
        print(
            "purge refused: the audit chain does not verify (purging would erase the "
            "evidence); nothing was purged",
            file=sys.stderr,
        )
        for p in exc.report.problems if exc.report else []:
            print(f"  seq {p.seq}: {p.kind}: {p.detail}", file=sys.stderr)
        return 1
    after = verify_chain(engine, keyring)
    print(
        f"purged {done.purged_count:,} event(s) older than {days} days (before "
        f"{cutoff:%Y-%m-%d %H:%M} UTC)"
        + (
            f", through seq {done.through_seq}; checkpoint signed"
            if done.checkpoint_written
            else ""
        )
        + f"; chain {'verifies' if after.ok else 'does NOT verify'}"
    )
    return 0 if after.ok else 1


def add_parser(sub: Any, engine_of: Any) -> None:
    """The `audit` command and its subcommands, on the main parser's subparsers."""
    audit = sub.add_parser("audit", help="verify, show, rotate keys of and purge the audit trail")
    asub = audit.add_subparsers(dest="audit_command", required=True)

    def add(name: str, handler: Any, help_: str, db: bool = True) -> argparse.ArgumentParser:
        sp = asub.add_parser(name, help=help_)
        if db:
            sp.add_argument("--database-url", help="default: $STOCKRX_DATABASE_URL")
            sp.add_argument(
                "--key-file", help=f"default: ${KEY_FILE_ENV} (keys also from ${KEYS_ENV})"
            )
            sp.set_defaults(handler=_with_engine(handler, engine_of))
        else:
            sp.set_defaults(handler=handler)
        return sp

    sp = add("verify", cmd_verify, "check the hash chain, head and checkpoints against the "
             "anchors outside the database and the history (exit 1 if broken)")
    sp.add_argument("--anchor-file", help=f"default: ${ANCHOR_FILE_ENV}")
    sp = add("show", cmd_show, "print an execution's audit events, decrypted")
    sp.add_argument("execution_id")
    sp.add_argument("--json", action="store_true")
    sp = add("new-key", cmd_new_key, "print a fresh key_id:fernet_key line", db=False)
    sp.add_argument("key_id", nargs="?", help="default: k<UTC timestamp>")
    sp = add("purge", cmd_purge, "purge events past the retention; the chain stays verifiable")
    sp.add_argument(
        "--older-than-days",
        type=int,
        help="default: security.audit_retention_days in config/data_patches.yml",
    )
    sp.add_argument("--dry-run", action="store_true", help="only count what would be purged")


def _with_engine(handler: Any, engine_of: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(handler(args, engine_of(args)))
        except (AuditConfigError, AuditKeyMissing) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return run
