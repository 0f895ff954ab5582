"""Undo a committed patch execution from its backup; purge backups past their retention.

Restore needs no patch code: it works from what the execution stored, its ``declaration``
(tables, updated and inserted columns) and the backup/stage mirror tables (see
``engine.restore_rows``). Updated rows get their before-values back (counter caches included:
they are declared columns), inserted rows are deleted. A row the application changed after the
patch is a conflict: the restore refuses and lists them, or with ``skip_conflicts`` leaves every
change of the conflicting source rows alone and reports them. Each restore and purge is an
execution of its own in ``data_patch_executions`` (kind ``restore`` / ``purge``).

    restore_patch:          plan_restore ──(real run)──> apply_restore
    purge_expired_backups:  purge_backups
"""

# No `from __future__ import annotations`: Dagster reads the op signatures' annotations.

import datetime as dt
import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from dagster import (
    Config,
    Failure,
    In,
    JobDefinition,
    MetadataValue,
    OpExecutionContext,
    Out,
    Output,
    job,
    op,
)
from pydantic import Field
from sqlalchemy import and_, delete, func, insert, select
from sqlalchemy.engine import Connection, Engine

from patch_ops import engine as eng
from patch_ops import state
from patch_ops.engine import BACKUP, PatchError, RestoreRefused
from patch_ops.jobs import patch_executor, run_finished
from patch_ops.lifecycle import AUDIT, NOTIFIER, Lifecycle
from patch_ops.state import INSERT, UPDATE, executions, mirror_table
from patch_ops.database import DatabaseUnavailable, check_connection, write_transaction
from resources.database import StockRxDatabase

DB = "stockrx_db"
PURGE_NAME = "purge_expired_backups"
CONFLICT_SAMPLE = 10


class RestoreConfig(Config):
    execution_id: str = Field(description="The committed patch execution to undo.")
    dry_run: bool = Field(
        default=True,
        description="Report what would be restored and change nothing. A real restore needs an "
        "explicit dry_run: false.",
    )
    skip_conflicts: bool = Field(
        default=False,
        description="Rows the application changed after the patch are conflicts. false: refuse "
        "and list them. true: restore everything else, leave every change of a conflicting "
        "source row as it is, and report them.",
    )
    launched_by: str | None = Field(default=None, description="Who launched it (history).")


class PurgeConfig(Config):
    dry_run: bool = Field(default=True, description="Only list what would be removed.")
    retention_days: int | None = Field(
        default=None,
        description="Keep the work data (backup, stage, targets, rejects) of executions that "
        "finished less than this many days ago; default: security.audit_retention_days in "
        "config/data_patches.yml.",
    )
    launched_by: str | None = Field(default=None, description="Who launched it (history).")


# ---------------------------------------------------------------------------------------------
# Restore
# ---------------------------------------------------------------------------------------------


def _check_id(execution_id: str) -> str:
    try:
        return str(uuid.UUID(str(execution_id).strip()))
    except ValueError:
        raise RestoreRefused(f"not an execution id: {str(execution_id)[:80]!r}") from None


def _refusal_reason(target: dict[str, Any]) -> str | None:
    """Why this execution cannot be restored (None: it can)."""
    tid = target["execution_id"]
    if target["kind"] != "patch":
        return f"execution {tid} is a {target['kind']}, not a patch execution"
    if target["dry_run"]:
        return f"execution {tid} was a dry run: it changed nothing"
    if target["restored_by_execution_id"]:
        return (
            f"execution {tid} was already restored by execution "
            f"{target['restored_by_execution_id']}; restoring it twice is refused"
        )
    if target["rollback_performed"]:
        return f"execution {tid} was already rolled back automatically (phase {target['phase']})"
    if target["phase"] not in ("committed", "verified"):
        return (
            f"execution {tid} never committed (status {target['status']}, phase "
            f"{target['phase']}): there is nothing to restore"
        )
    purged = (target["report"] or {}).get("backup_purged")
    if purged:
        return (
            f"the backup of execution {tid} was purged on {purged['at']} by execution "
            f"{purged['by']} (retention); it can no longer be restored"
        )
    return None


def _new_execution(conn: Connection, **values: Any) -> str:
    execution_id = str(uuid.uuid4())
    now = eng.utcnow()
    conn.execute(
        insert(executions).values(
            execution_id=execution_id,
            status="running",
            phase="planning",
            started_at=now,
            run_at=now.replace(microsecond=0),
            heartbeat_at=now,
            launched_by=values.pop("launched_by", None) or eng._default_user(),
            root_run_id=values.get("dagster_run_id"),
            **values,
        )
    )
    return execution_id


def _missing_backup(conn: Connection, engine: Engine, target_id: str, decl: dict[str, Any]) -> str:
    """Tables with staged updates that have no before-image (backup purged or lost)."""
    tables = state.reflect_tables(engine, decl["tables"])
    missing = []
    for table in decl["updates"]:
        st = mirror_table(engine, tables[table], "stage")
        bk = mirror_table(engine, tables[table], "backup")
        n = conn.execute(
            select(func.count())
            .select_from(
                st.outerjoin(
                    bk,
                    and_(
                        bk.c.dp_execution_id == st.c.dp_execution_id,
                        bk.c.dp_seq == st.c.dp_seq,
                        bk.c.dp_action == BACKUP,
                    ),
                )
            )
            .where(
                st.c.dp_execution_id == target_id, st.c.dp_action == UPDATE, bk.c.dp_seq.is_(None)
            )
        ).scalar_one()
        if n:
            missing.append(f"{table} ({n:,} rows)")
    return ", ".join(missing)


def _conflict_sample(
    conn: Connection,
    engine: Engine,
    target: dict[str, Any],
    conflicts: dict[str, list[int]],
) -> dict[str, Any]:
    """Per table: how many conflicts, their ids, and the declared columns as the patch wrote
    them next to what the live row holds now (∅ / gone: the row was deleted). ``target``: the
    restored execution's row."""
    target_id, decl = target["execution_id"], target["declaration"]
    tables = state.reflect_tables(engine, decl["tables"])
    out: dict[str, Any] = {}
    for table, ids in conflicts.items():
        live = tables[table]
        st = mirror_table(engine, live, "stage")
        cols = list(
            dict.fromkeys([*decl["updates"].get(table, []), *decl["inserts"].get(table, [])])
        )
        first = ids[:CONFLICT_SAMPLE]
        key = st.c.dp_seq if table in decl["updates"] else eng.inserted_id(st, target, table)
        action = UPDATE if table in decl["updates"] else INSERT
        rows = conn.execute(
            select(
                key.label("id"),
                st.c.dp_source_id.label("source_id"),
                (live.c.id.is_(None)).label("gone"),
                *[st.c[c].label(f"{c}_patched") for c in cols],
                *[live.c[c].label(f"{c}_now") for c in cols],
            )
            .select_from(st.outerjoin(live, live.c.id == key))
            .where(st.c.dp_execution_id == target_id, st.c.dp_action == action, key.in_(first))
            .order_by(key)
        ).mappings()
        sample = []
        for r in rows:
            rec: dict[str, Any] = {"id": r["id"], "source_id": r["source_id"]}
            for c in cols:
                now = "(row deleted)" if r["gone"] else eng._jsonable(r[f"{c}_now"])
                patched = eng._jsonable(r[f"{c}_patched"])
                rec[c] = f"{patched} → {now}" if now != patched else str(patched)
            sample.append(rec)
        out[table] = {"count": len(ids), "ids": ids[:100], "sample": sample}
    return out


def _render(ex: dict[str, Any], report: dict[str, Any]) -> str:
    mode = "DRY RUN, nothing changed" if ex["dry_run"] else "REAL RUN"
    done = "restored" in report
    counts = report["restored"] if done else report["would_restore"]
    verb = "" if done else "would be "
    lines = [
        f"## Restore of {ex['patch_name']} execution `{report['restores']}`: {mode}",
        "",
        f"Restore execution `{ex['execution_id']}`",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    for table, n in counts["updated"].items():
        lines.append(f"| {table} rows {verb}put back to their before-values | {n:,} |")
    for table, n in counts["deleted"].items():
        lines.append(f"| {table} rows inserted by the patch {verb}deleted | {n:,} |")
    n_conf = sum(c["count"] for c in report["conflicts"].values())
    lines.append(f"| rows changed by the application after the patch (conflicts) | {n_conf:,} |")
    lines.append(
        f"| source rows left as they are because of conflicts | {report['skipped_sources']:,} |"
    )
    if report.get("refused"):
        lines += ["", f"**Refused**: {report['refused']}"]
    for table, c in report["conflicts"].items():
        lines += [
            "",
            f"### Conflicts in {table}: {c['count']:,} (first {len(c['sample'])}; "
            "value as the patch wrote it → value now)",
            "",
            *eng._md_table(c["sample"]),
        ]
    return "\n".join(lines) + "\n"


def plan_restore(
    engine: Engine,
    execution_id: str,
    dry_run: bool = True,
    skip_conflicts: bool = False,
    dagster_run_id: str | None = None,
    launched_by: str | None = None,
    log: Any = None,
    run_finished: eng.RunFinished | None = None,
) -> str:
    """Open a restore execution of ``execution_id``: check it can be restored, lock its tables,
    report what would be restored and the conflicts. Refuses (RestoreRefused) on conflicts
    unless ``skip_conflicts``. A dry run ends here; returns the restore execution id."""
    log = log or logging.getLogger(__name__)
    target_id = _check_id(execution_id)
    check_connection(engine)
    state.ensure_framework_tables(engine)
    with write_transaction(engine) as conn:
        try:
            target = eng.load_execution(conn, target_id)
        except PatchError:
            raise RestoreRefused(f"unknown execution {target_id}") from None
        restore_id = _new_execution(
            conn,
            patch_name=target["patch_name"],
            kind="restore",
            dry_run=dry_run,
            dagster_run_id=dagster_run_id,
            launched_by=launched_by,
            config={
                "execution_id": target_id,
                "dry_run": dry_run,
                "skip_conflicts": skip_conflicts,
            },
            declaration=target["declaration"],
            restores_execution_id=target_id,
        )
    with _recorded(engine, restore_id):
        reason = _refusal_reason(target)
        if reason:
            raise RestoreRefused(reason)
        decl = target["declaration"]
        with write_transaction(engine) as conn:
            eng.acquire_locks(conn, decl["tables"], restore_id, dagster_run_id, run_finished, log)
        with engine.connect() as conn:
            missing = _missing_backup(conn, engine, target_id, decl)
            if missing:
                raise RestoreRefused(f"execution {target_id} has no backup for {missing}")
            plan = eng.restore_rows(conn, engine, target_id, skip_conflicts=True, apply=False)
            conflicts = _conflict_sample(conn, engine, target, plan.conflicts)
        report: dict[str, Any] = {
            "restores": target_id,
            "would_restore": {"updated": plan.updated, "deleted": plan.deleted},
            "conflicts": conflicts,
            "skipped_sources": plan.skipped_sources,
        }
        if plan.conflicts and not skip_conflicts:
            n = sum(map(len, plan.conflicts.values()))
            report["skipped_sources"] = 0
            report["refused"] = (
                f"the application changed {n:,} row(s) after the patch; restore refused (set "
                "skip_conflicts to restore only the other rows): "
                + "; ".join(f"{t}: ids {ids[:20]}" for t, ids in plan.conflicts.items())
            )
        total = sum(plan.updated.values()) + sum(plan.deleted.values())
        with write_transaction(engine) as conn:
            ex = eng.load_execution(conn, restore_id)
            eng.set_execution(
                conn,
                restore_id,
                phase="planned",
                report=report,
                target_count=total,
                report_markdown=_render(ex, report),
                heartbeat_at=eng.utcnow(),
            )
        if report.get("refused"):
            raise RestoreRefused(report["refused"], {"conflicts": plan.conflicts})
    log.info(
        f"restore {restore_id} of {target_id} planned ({'DRY RUN' if dry_run else 'REAL RUN'}): "
        f"{total:,} rows, {plan.skipped_sources:,} source rows skipped for conflicts"
    )
    if dry_run:
        eng.finish_execution(engine, restore_id, "completed", phase="dry_run_reported")
    return restore_id


def apply_restore(
    engine: Engine,
    restore_id: str,
    log: Any = None,
    on_applied: Callable[[Connection, dict[str, Any]], None] | None = None,
    run_finished: eng.RunFinished | None = None,
) -> dict[str, Any]:
    """Carry out a planned restore in one transaction; returns the counts restored.
    ``on_applied(conn, report)`` runs in that transaction (e.g. the audit event)."""
    log = log or logging.getLogger(__name__)
    with engine.connect() as conn:
        ex = eng.load_execution(conn, restore_id)
    if ex["kind"] != "restore" or ex["dry_run"]:
        raise PatchError(f"execution {restore_id} is not a real restore")
    if ex["phase"] == "restored":
        log.info(f"restore {restore_id} already applied")
        return dict(ex["report"]["restored"])
    cfg, decl, report = ex["config"], ex["declaration"], dict(ex["report"] or {})
    target_id = ex["restores_execution_id"]
    with _recorded(engine, restore_id), write_transaction(engine) as conn:
        eng.set_execution(conn, restore_id, status="running", completed_at=None, error_message=None)
        eng.acquire_locks(conn, decl["tables"], restore_id, ex["dagster_run_id"], run_finished, log)
        target = dict(
            conn.execute(
                select(executions).where(executions.c.execution_id == target_id).with_for_update()
            )
            .mappings()
            .one()
        )
        reason = _refusal_reason(target) or (
            _missing_backup(conn, engine, target_id, decl) and "its backup is incomplete"
        )
        if reason:
            raise RestoreRefused(reason)
        # Count first with the rows locked, then apply: the two must agree.
        tables = state.reflect_tables(engine, decl["tables"])
        eng._lock_rows(conn, tables, target_id, decl)
        expected = eng.restore_rows(conn, engine, target_id, skip_conflicts=True, apply=False)
        if expected.conflicts and not cfg["skip_conflicts"]:
            raise RestoreRefused(
                "the application changed rows after the patch (since the restore was planned); "
                "restore refused: "
                + "; ".join(f"{t}: ids {ids[:20]}" for t, ids in expected.conflicts.items()),
                {"conflicts": expected.conflicts},
            )
        done = eng.restore_rows(conn, engine, target_id, skip_conflicts=True, apply=True)
        if (done.updated, done.deleted) != (expected.updated, expected.deleted):
            raise PatchError(
                f"restore changed {done.updated} / deleted {done.deleted} rows but "
                f"{expected.updated} / {expected.deleted} were expected; rolled back, nothing "
                "was restored"
            )
        report.pop("would_restore", None)
        report.update(
            restored={"updated": done.updated, "deleted": done.deleted},
            conflicts=_conflict_sample(conn, engine, target, done.conflicts),
            skipped_sources=done.skipped_sources,
        )
        eng.set_execution(conn, target_id, restored_by_execution_id=restore_id)
        if on_applied is not None:
            on_applied(conn, report)
        total = sum(done.updated.values()) + sum(done.deleted.values())
        eng.set_execution(
            conn,
            restore_id,
            phase="restored",
            report=report,
            processed_records=total,
            report_markdown=_render(ex, report),
            heartbeat_at=eng.utcnow(),
        )
    eng.finish_execution(engine, restore_id, "completed", phase="restored")
    log.info(
        f"restored execution {target_id}: "
        + ", ".join(f"{t} {n:,} put back" for t, n in done.updated.items())
        + ", "
        + ", ".join(f"{t} {n:,} deleted" for t, n in done.deleted.items())
        + (
            f"; {done.skipped_sources:,} source rows left because of conflicts"
            if done.skipped_sources
            else ""
        )
    )
    return report["restored"]


@contextmanager
def _recorded(engine: Engine, execution_id: str) -> Iterator[None]:
    """On any error: the execution is closed as failed (locks released) and the error re-raised."""
    try:
        yield
    except BaseException as exc:
        eng.finish_execution(engine, execution_id, "failed", error=eng._describe(exc))
        if isinstance(exc, PatchError):
            exc.details.setdefault("execution_id", execution_id)
        raise


# ---------------------------------------------------------------------------------------------
# Purge
# ---------------------------------------------------------------------------------------------


def _work_rows(conn: Connection, execution_id: str, decl: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for table in (decl or {}).get("tables", []):
        for kind in ("backup", "stage"):
            mirror = eng._mirror_by_name(conn, state.mirror_name(kind, table))
            if mirror is not None:
                n = conn.execute(
                    select(func.count())
                    .select_from(mirror)
                    .where(mirror.c.dp_execution_id == execution_id)
                ).scalar_one()
                if n:
                    counts[mirror.name] = n
    for t in (state.targets, state.rejects):
        n = conn.execute(
            select(func.count()).select_from(t).where(t.c.execution_id == execution_id)
        ).scalar_one()
        if n:
            counts[t.name] = n
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
    cutoff = eng.utcnow() - dt.timedelta(days=retention_days)
    with write_transaction(engine) as conn:
        purge_id = _new_execution(
            conn,
            patch_name=PURGE_NAME,
            kind="purge",
            dry_run=dry_run,
            dagster_run_id=dagster_run_id,
            launched_by=launched_by,
            config={"retention_days": retention_days, "dry_run": dry_run},
            business_date=cutoff.date().isoformat(),
        )
    with _recorded(engine, purge_id):
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
                    eng._drop_work_rows(conn, f["execution_id"])
                    conn.execute(
                        delete(state.rejects).where(
                            state.rejects.c.execution_id == f["execution_id"]
                        )
                    )
                    report = dict(ex["report"] or {})
                    report["backup_purged"] = {"by": purge_id, "at": eng.utcnow().isoformat(" ")}
                    eng.set_execution(conn, f["execution_id"], report=report)
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
                *eng._md_table(
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
        eng.finish_execution(
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


# ---------------------------------------------------------------------------------------------
# Dagster jobs
# ---------------------------------------------------------------------------------------------


def _fail(exc: Exception, what: str, engine: Engine) -> Failure:
    """A Failure that says what happened, with the refused/failed execution's report if any."""
    details = dict(getattr(exc, "details", {}) or {})
    meta: dict[str, Any] = {"error": MetadataValue.text(str(exc))}
    execution_id = details.pop("execution_id", None)
    if execution_id:
        meta.update(_report_metadata(engine, execution_id))
    meta.update({k: MetadataValue.json(v) for k, v in details.items()})
    first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    return Failure(description=f"{what}: {first}"[:1000], metadata=meta)


def _report_metadata(engine: Engine, execution_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        ex = eng.load_execution(conn, execution_id)
    return {"execution_id": execution_id, "report": MetadataValue.md(ex["report_markdown"] or "")}


def _lifecycle(context: OpExecutionContext, engine: Engine, execution_id: str) -> Lifecycle:
    return Lifecycle(context.resources, engine, execution_id, context.log)


def _require_audit_key(resources: Any, what: str) -> None:
    """A real restore or purge changes data: like a real patch run, it needs the audit trail."""
    audit = getattr(resources, AUDIT, None)
    if audit is not None and audit.enabled and not audit.has_key:
        raise RestoreRefused(
            f"no audit key configured: a real {what} needs the encrypted audit trail. Set "
            "STOCKRX_AUDIT_KEYS or STOCKRX_AUDIT_KEY_FILE, or opt out with "
            "security.log_encryption: false."
        )


def _record_failure(context: OpExecutionContext, engine: Engine, exc: Exception, kind: str) -> None:
    execution_id = (getattr(exc, "details", None) or {}).get("execution_id")
    if execution_id:
        reason = eng._describe(exc)
        _lifecycle(context, engine, execution_id).close(
            kind, {"stage": "refused", "error": reason}, "failed", reason
        )


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "restores": report.get("restores"),
        "rows": report.get("restored") or report.get("would_restore"),
        "conflicts": {t: c["count"] for t, c in report.get("conflicts", {}).items()},
        "skipped_sources": report.get("skipped_sources", 0),
    }


def build_restore_job() -> JobDefinition:
    @op(
        name="plan_restore",
        description="Check the execution can be restored, lock its tables, report what would be "
        "restored and the conflicts; a dry run ends here.",
        required_resource_keys={DB, AUDIT, NOTIFIER},
        out={
            "execution_id": Out(str, is_required=False, description="real run: the restore id"),
            "dry_run_execution_id": Out(
                str, is_required=False, description="dry run: the restore id (nothing to apply)"
            ),
        },
    )
    def plan_restore_op(context: OpExecutionContext, config: RestoreConfig):  # type: ignore[no-untyped-def]
        db: StockRxDatabase = getattr(context.resources, DB)
        engine = db.get_engine()
        try:
            if not config.dry_run:
                _require_audit_key(context.resources, "restore")
            restore_id = plan_restore(
                engine,
                config.execution_id,
                dry_run=config.dry_run,
                skip_conflicts=config.skip_conflicts,
                dagster_run_id=context.run_id,
                launched_by=config.launched_by,
                log=context.log,
                run_finished=run_finished(context.instance),
            )
        except (PatchError, DatabaseUnavailable, LookupError, ValueError) as exc:
            _record_failure(context, engine, exc, "restore")
            raise _fail(exc, "restore refused, nothing changed", engine) from exc
        meta = _report_metadata(engine, restore_id)
        context.log.info("\n" + meta["report"].value)
        lc = _lifecycle(context, engine, restore_id)
        with engine.connect() as conn:
            lc.audit(
                "restore",
                {"stage": "planned", **_summary(eng.load_execution(conn, restore_id)["report"])},
            )
        if config.dry_run:
            context.log.info(f"dry run {restore_id}: nothing was changed")
            lc.notify("completed")
            yield Output(restore_id, "dry_run_execution_id", metadata=meta)
        else:
            yield Output(restore_id, "execution_id", metadata=meta)

    @op(
        name="apply_restore",
        description="One transaction: put back the before-values, delete the inserted rows, "
        "link the restore to the execution it undoes.",
        required_resource_keys={DB, AUDIT, NOTIFIER},
        ins={"execution_id": In(str)},
    )
    def apply_restore_op(context: OpExecutionContext, execution_id: str) -> None:
        db: StockRxDatabase = getattr(context.resources, DB)
        engine = db.get_engine()
        lc = _lifecycle(context, engine, execution_id)
        try:
            apply_restore(
                engine,
                execution_id,
                log=context.log,
                run_finished=run_finished(context.instance),
                on_applied=lambda conn, report: lc.audit(
                    "restore", {"stage": "applied", **_summary(report)}, conn=conn
                ),
            )
        except (PatchError, DatabaseUnavailable, ValueError) as exc:
            _record_failure(context, engine, exc, "restore")
            raise _fail(exc, "restore failed, nothing changed", engine) from exc
        meta = _report_metadata(engine, execution_id)
        context.log.info("\n" + meta["report"].value)
        context.add_output_metadata(meta)
        lc.notify("completed")

    @job(
        name="restore_patch",
        executor_def=patch_executor,
        description="Undo a committed patch execution from its backup (dry run by default).",
        tags={"stockrx/kind": "restore"},
    )
    def restore_patch() -> None:
        to_apply, _dry_run = plan_restore_op()
        apply_restore_op(to_apply)

    return restore_patch


def build_purge_job(default_retention_days: int) -> JobDefinition:
    @op(
        name="purge_backups",
        description=f"Remove backups older than the retention ({default_retention_days} days by "
        "default); dry run by default.",
        required_resource_keys={DB, AUDIT, NOTIFIER},
    )
    def purge_backups_op(context: OpExecutionContext, config: PurgeConfig) -> None:
        db: StockRxDatabase = getattr(context.resources, DB)
        engine = db.get_engine()
        days = (
            config.retention_days if config.retention_days is not None else default_retention_days
        )
        try:
            if not config.dry_run:
                _require_audit_key(context.resources, "purge")
            purge_id = purge_backups(
                engine,
                days,
                dry_run=config.dry_run,
                dagster_run_id=context.run_id,
                launched_by=config.launched_by,
                log=context.log,
            )
        except (PatchError, DatabaseUnavailable, ValueError) as exc:
            _record_failure(context, engine, exc, "purge")
            raise _fail(exc, "purge failed", engine) from exc
        meta = _report_metadata(engine, purge_id)
        context.log.info("\n" + meta["report"].value)
        context.add_output_metadata(meta)
        with engine.connect() as conn:
            report = eng.load_execution(conn, purge_id)["report"]
        _lifecycle(context, engine, purge_id).audit(
            "purge",
            {
                "cutoff": report["cutoff"],
                "rows": report["rows"],
                "executions": [e["execution_id"] for e in report["executions"]],
            },
        )

    @job(
        name=PURGE_NAME,
        executor_def=patch_executor,
        description="Remove patch backups past audit_retention_days (dry run by default).",
        tags={"stockrx/kind": "purge"},
    )
    def purge_expired_backups() -> None:
        purge_backups_op()

    return purge_expired_backups
