"""Purge: remove the work data (backup, stage, target sets, rejects, an approving dry run's
fingerprint) of patch executions that finished more than the retention period ago, recorded as
an execution of kind ``purge``. A purged execution can no longer be restored (restore says so)."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.engine import Connection, Engine

from patch_ops import state
from patch_ops.database import check_connection, write_transaction
from patch_ops.execution import PatchError, drop_work_rows, finish_execution, set_execution, utcnow
from patch_ops.state import executions
from patch_ops.steps.drift import APPROVED, drop_fingerprint
from patch_ops.steps.report import md_table
from patch_ops.steps.restore import new_execution, recorded
from patch_ops.target_sets import target_counts
from patch_ops.work_rows import WORK_ACTIONS, drop_own_tables, existing_rows

PURGE_NAME = "purge_expired_backups"


def _work_rows(conn: Connection, execution_id: str, decl: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for table in (decl or {}).get("tables", []):
        for rows in [existing_rows(conn, table, execution_id, a) for a in WORK_ACTIONS]:
            if rows is not None:
                n = conn.execute(
                    select(func.count()).select_from(rows.table).where(rows.mine)
                ).scalar_one()
                if n or not rows.shared:  # a table of its own, empty too: it is dropped
                    counts[rows.table.name] = counts.get(rows.table.name, 0) + n
        # an earlier version's copy of a fingerprint (its backup and updates), in a mirror of
        # its own: every row of the execution, as ``drop_fingerprint`` deletes them
        legacy = state.mirror_by_name(conn, state.mirror_name(APPROVED, table))
        if legacy is not None:
            n = conn.execute(select(func.count()).select_from(legacy).where(
                legacy.c.dp_execution_id == execution_id)).scalar_one()
            if n:
                counts[legacy.name] = n
    counts.update(target_counts(conn, execution_id, (decl or {}).get("tables", [])))
    n = conn.execute(select(func.count()).where(state.rejects.c.execution_id == execution_id)
                     ).scalar_one()
    if n:
        counts[state.rejects.name] = n
    return counts


def purge_backups(
    engine: Engine,
    retention_days: int,
    dry_run: bool = True,
    dagster_run_id: str | None = None,
    launched_by: str | None = None,
    log: Any = None,
) -> str:
    """Remove the work data (backup, stage, targets, rejects) of patch executions that finished
    more than ``retention_days`` ago; record it as an execution of kind 'purge'."""
    log = log or logging.getLogger(__name__)
    if retention_days < 1:
        raise PatchError(f"retention_days must be at least 1, got {retention_days}")
    check_connection(engine)
    state.ensure_framework_tables(engine)
    cutoff = utcnow() - dt.timedelta(days=retention_days)
    with write_transaction(engine) as conn:
        purge_id = new_execution(
            conn,
            patch_name=PURGE_NAME,
            kind="purge",
            dry_run=dry_run,
            dagster_run_id=dagster_run_id,
            launched_by=launched_by,
            config={"retention_days": retention_days, "dry_run": dry_run},
            business_date=cutoff.date().isoformat(),
        )
    with recorded(engine, purge_id):
        finished = func.coalesce(executions.c.completed_at, executions.c.started_at)
        with engine.connect() as conn:
            candidates = (
                conn.execute(
                    select(
                        executions.c.execution_id,
                        executions.c.patch_name,
                        executions.c.declaration,
                        finished.label("finished_at"),
                    )
                    .where(
                        executions.c.kind == "patch",
                        executions.c.status.in_(["completed", "failed"]),
                        finished < cutoff,
                    )
                    .order_by(finished, executions.c.execution_id)
                )
                .mappings()
                .all()
            )
            found = []
            for c in candidates:
                rows = _work_rows(conn, c["execution_id"], c["declaration"])
                if rows:
                    found.append(
                        {
                            "execution_id": c["execution_id"],
                            "patch_name": c["patch_name"],
                            "finished_at": str(c["finished_at"]),
                            "rows": rows,
                        }
                    )
        if not dry_run:
            for f in found:
                with write_transaction(engine) as conn:
                    # Row lock on the execution: a restore applying it meanwhile is waited for.
                    ex = dict(
                        conn.execute(
                            select(executions)
                            .where(executions.c.execution_id == f["execution_id"])
                            .with_for_update()
                        )
                        .mappings()
                        .one()
                    )
                    tables = drop_work_rows(conn, f["execution_id"])
                    drop_fingerprint(conn, f["execution_id"], tables)
                    conn.execute(
                        delete(state.rejects).where(
                            state.rejects.c.execution_id == f["execution_id"]
                        )
                    )
                    report = dict(ex["report"] or {})
                    report["backup_purged"] = {"by": purge_id, "at": utcnow().isoformat(" ")}
                    set_execution(conn, f["execution_id"], report=report)
                # after that commit: a DROP would commit it on MySQL
                drop_own_tables(engine, [f["execution_id"]], tables)
        total = sum(sum(f["rows"].values()) for f in found)
        report = {
            "cutoff": cutoff.isoformat(" "),
            "retention_days": retention_days,
            "executions": found,
            "rows": total,
        }
        verb = "would remove" if dry_run else "removed"
        lines = [
            f"## Purge of expired backups: {'DRY RUN, nothing removed' if dry_run else 'REAL RUN'}",
            "",
            f"Kept: executions that finished after {cutoff:%Y-%m-%d %H:%M} UTC "
            f"({retention_days} days). {verb.capitalize()}: {total:,} rows of "
            f"{len(found):,} execution(s).",
        ]
        if found:
            lines += [
                "",
                *md_table(
                    [
                        {
                            "execution_id": f["execution_id"],
                            "patch": f["patch_name"],
                            "finished_at (UTC)": f["finished_at"][:19],
                            "rows": ", ".join(f"{t} {n:,}" for t, n in f["rows"].items()),
                        }
                        for f in found
                    ]
                ),
            ]
        finish_execution(
            engine,
            purge_id,
            "completed",
            phase="purged" if not dry_run else "dry_run_reported",
            report=report,
            report_markdown="\n".join(lines) + "\n",
            target_count=len(found),
            processed_records=0 if dry_run else len(found),
        )
    log.info(
        f"purge {purge_id}: {verb} {total:,} rows of {len(found):,} execution(s) "
        f"finished before {cutoff:%Y-%m-%d %H:%M} UTC"
    )
    return purge_id
