"""Restore: undo a committed patch execution from its backup.

It needs no patch code: it works from what the execution stored, its ``declaration`` (tables,
updated and inserted columns) and its work rows (``patch_ops.work_rows``). Updated rows get their
before-values back (counter caches included: they are declared columns), inserted rows are
deleted. A row the application changed after the patch is a conflict: the restore refuses and
lists them, or with ``skip_conflicts`` leaves every change of the conflicting source rows alone
and reports them. Each restore is an execution of its own (kind ``restore``); post-verification
calls ``restore_rows`` directly when it restores automatically.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, insert, not_, select, update
from sqlalchemy.engine import Connection, Engine

from patch_ops import state
from patch_ops.database import check_connection, write_transaction
from patch_ops.dialects import dialect_of
from patch_ops.execution import (
    PatchError,
    RestoreRefused,
    RunFinished,
    default_user,
    describe,
    finish_execution,
    inserted_id,
    jsonable,
    load_execution,
    new_execution_id,
    set_execution,
    utcnow,
)
from patch_ops.state import BACKUP, INSERT, UPDATE, executions
from patch_ops.steps.apply import find_conflicts, lock_target_rows
from patch_ops.steps.locks import acquire_locks
from patch_ops.steps.report import md_table
from patch_ops.work_rows import work_rows

CONFLICT_SAMPLE = 10


@dataclass
class RestorePlan:
    updated: dict[str, int]
    deleted: dict[str, int]
    conflicts: dict[str, list[int]]
    skipped_sources: int


def restore_rows(
    conn: Connection,
    engine: Engine,
    execution_id: str,
    skip_conflicts: bool,
    apply: bool,
) -> RestorePlan:
    """Put back the before-images of a committed execution; delete the rows it inserted.

    Rows the application changed after the patch are conflicts: with ``skip_conflicts`` every
    change of a conflicting source row is left as it is (and reported); otherwise the restore
    refuses. With ``apply=False`` only counts what would be restored.
    """
    ex = load_execution(conn, execution_id)
    decl = ex["declaration"]
    tables = state.reflect_tables(engine, decl["tables"])
    if apply:
        lock_target_rows(conn, tables, execution_id, decl)
    conflicts = find_conflicts(conn, engine, tables, ex, "stage")
    if conflicts and not skip_conflicts:
        desc = "; ".join(f"{t}: ids {ids[:20]}" for t, ids in conflicts.items())
        raise RestoreRefused(
            f"the application changed {sum(map(len, conflicts.values()))} row(s) after the patch; "
            f"restore refused (use skip_conflicts to restore the rest): {desc}",
            {"conflicts": conflicts},
        )
    # Conflicting rows → their source rows; every change of such a source is left alone.
    bad_sources: set[int] = set()
    for table, ids in conflicts.items():
        # A live id is dp_seq of an updated row but id of an inserted one (a table can be both
        # updated and inserted into: match each action on its own key).
        keys = []
        if table in decl["updates"]:
            upd = work_rows(engine, tables[table], execution_id, UPDATE)
            keys.append((upd, upd.seq))
        if table in decl["inserts"]:
            ins = work_rows(engine, tables[table], execution_id, INSERT)
            keys.append((ins, inserted_id(ins, ex, table)))
        for chunk in _chunks(ids, 1000):
            for rows, key in keys:
                q = select(rows.c.dp_source_id).where(rows.mine, key.in_(chunk))
                bad_sources.update(s for s in conn.execute(q).scalars() if s is not None)
    keep_out = list(bad_sources)
    updated: dict[str, int] = {}
    deleted: dict[str, int] = {}
    for table, cols in decl["updates"].items():
        live = tables[table]
        st = work_rows(engine, live, execution_id, UPDATE)
        bk = work_rows(engine, live, execution_id, BACKUP)
        to_restore = st.select_seq().where(
            *([not_(st.c.dp_source_id.in_(keep_out))] if keep_out else []),
        )
        if apply:
            res = conn.execute(
                update(live)
                .where(bk.at(live.c.id), bk.seq.in_(to_restore))
                .values({c: bk.c[c] for c in cols})
            )
            updated[table] = res.rowcount
        else:
            updated[table] = conn.execute(
                select(func.count()).select_from(to_restore.subquery())
            ).scalar_one()
    for table in reversed(list(decl["inserts"])):  # children before the parents they point to
        live = tables[table]
        st = work_rows(engine, live, execution_id, INSERT)
        to_delete = select(inserted_id(st, ex, table)).where(
            st.mine, *([not_(st.c.dp_source_id.in_(keep_out))] if keep_out else []),
        )
        if apply:
            deleted[table] = dialect_of(conn).delete_ids(conn, live, to_delete)
        else:
            deleted[table] = conn.execute(
                select(func.count()).select_from(to_delete.subquery())
            ).scalar_one()
    return RestorePlan(updated, deleted, conflicts, len(bad_sources))


def _chunks(seq: list[int], n: int) -> Iterable[list[int]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


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


def new_execution(conn: Connection, **values: Any) -> str:
    execution_id = new_execution_id()
    now = utcnow()
    conn.execute(
        insert(executions).values(
            execution_id=execution_id,
            status="running",
            phase="planning",
            started_at=now,
            run_at=now.replace(microsecond=0),
            heartbeat_at=now,
            launched_by=values.pop("launched_by", None) or default_user(),
            root_run_id=values.get("dagster_run_id"),
            **values,
        )
    )
    return execution_id


def _missing_backup(conn: Connection, engine: Engine, target_id: str, decl: dict[str, Any]) -> str:
    """Tables with staged updates that have no before-image (backup purged or lost). Its first
    call, before the restore's transaction, finds their tables as ``work_rows`` does (a shared
    mirror's keys converted, a lost table made empty): the later ones only read them."""
    tables = state.reflect_tables(engine, decl["tables"])
    missing = []
    for table in decl["updates"]:
        st = work_rows(engine, tables[table], target_id, UPDATE)
        bk = work_rows(engine, tables[table], target_id, BACKUP)
        n = conn.execute(
            select(func.count())
            .select_from(st.table.outerjoin(bk.table, bk.at(st.seq)))
            .where(st.mine, bk.seq.is_(None))
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
        action = UPDATE if table in decl["updates"] else INSERT
        st = work_rows(engine, live, target_id, action)
        cols = list(
            dict.fromkeys([*decl["updates"].get(table, []), *decl["inserts"].get(table, [])])
        )
        first = ids[:CONFLICT_SAMPLE]
        key = st.seq if action == UPDATE else inserted_id(st, target, table)
        rows = conn.execute(
            select(
                key.label("id"),
                st.c.dp_source_id.label("source_id"),
                (live.c.id.is_(None)).label("gone"),
                *[st.c[c].label(f"{c}_patched") for c in cols],
                *[live.c[c].label(f"{c}_now") for c in cols],
            )
            .select_from(st.table.outerjoin(live, live.c.id == key))
            .where(st.mine, key.in_(first))
            .order_by(key)
        ).mappings()
        sample = []
        for r in rows:
            rec: dict[str, Any] = {"id": r["id"], "source_id": r["source_id"]}
            for c in cols:
                now = "(row deleted)" if r["gone"] else jsonable(r[f"{c}_now"])
                patched = jsonable(r[f"{c}_patched"])
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
            *md_table(c["sample"]),
        ]
    return "\n".join(lines) + "\n"


def record_report(conn: Connection, restore_id: str, report: dict[str, Any], **values: Any) -> None:
    """A restore execution's report (JSON and Markdown) and its progress, in ``conn``."""
    ex = load_execution(conn, restore_id)
    markdown = _render(ex, report)
    set_execution(conn, restore_id, report=report, report_markdown=markdown, heartbeat_at=utcnow(),
                  **values)


def plan_restore(
    engine: Engine,
    execution_id: str,
    dry_run: bool = True,
    skip_conflicts: bool = False,
    dagster_run_id: str | None = None,
    launched_by: str | None = None,
    log: Any = None,
    run_finished: RunFinished | None = None,
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
            target = load_execution(conn, target_id)
        except PatchError:
            raise RestoreRefused(f"unknown execution {target_id}") from None
        restore_id = new_execution(
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
    with recorded(engine, restore_id):
        reason = _refusal_reason(target)
        if reason:
            raise RestoreRefused(reason)
        decl = target["declaration"]
        with write_transaction(engine) as conn:
            acquire_locks(conn, decl["tables"], restore_id, dagster_run_id, run_finished, log)
        with engine.connect() as conn:
            missing = _missing_backup(conn, engine, target_id, decl)
            if missing:
                raise RestoreRefused(f"execution {target_id} has no backup for {missing}")
            plan = restore_rows(conn, engine, target_id, skip_conflicts=True, apply=False)
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
            record_report(conn, restore_id, report, phase="planned", target_count=total)
        if report.get("refused"):
            raise RestoreRefused(report["refused"], {"conflicts": plan.conflicts})
    log.info(
        f"restore {restore_id} of {target_id} planned ({'DRY RUN' if dry_run else 'REAL RUN'}): "
        f"{total:,} rows, {plan.skipped_sources:,} source rows skipped for conflicts"
    )
    if dry_run:
        finish_execution(engine, restore_id, "completed", phase="dry_run_reported")
    return restore_id


def apply_restore(
    engine: Engine,
    restore_id: str,
    log: Any = None,
    on_applied: Callable[[Connection, dict[str, Any]], None] | None = None,
    run_finished: RunFinished | None = None,
) -> dict[str, Any]:
    """Carry out a planned restore in one transaction; returns the counts restored.
    ``on_applied(conn, report)`` runs in that transaction (e.g. the audit event)."""
    log = log or logging.getLogger(__name__)
    with engine.connect() as conn:
        ex = load_execution(conn, restore_id)
    if ex["kind"] != "restore" or ex["dry_run"]:
        raise PatchError(f"execution {restore_id} is not a real restore")
    if ex["phase"] == "restored":
        log.info(f"restore {restore_id} already applied")
        return dict(ex["report"]["restored"])
    cfg, decl, report = ex["config"], ex["declaration"], dict(ex["report"] or {})
    target_id = ex["restores_execution_id"]
    with recorded(engine, restore_id), write_transaction(engine) as conn:
        set_execution(conn, restore_id, status="running", completed_at=None, error_message=None)
        acquire_locks(conn, decl["tables"], restore_id, ex["dagster_run_id"], run_finished, log)
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
        lock_target_rows(conn, tables, target_id, decl)
        expected = restore_rows(conn, engine, target_id, skip_conflicts=True, apply=False)
        if expected.conflicts and not cfg["skip_conflicts"]:
            raise RestoreRefused(
                "the application changed rows after the patch (since the restore was planned); "
                "restore refused: "
                + "; ".join(f"{t}: ids {ids[:20]}" for t, ids in expected.conflicts.items()),
                {"conflicts": expected.conflicts},
            )
        done = restore_rows(conn, engine, target_id, skip_conflicts=True, apply=True)
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
        set_execution(conn, target_id, restored_by_execution_id=restore_id)
        if on_applied is not None:
            on_applied(conn, report)
        total = sum(done.updated.values()) + sum(done.deleted.values())
        record_report(conn, restore_id, report, phase="restored", processed_records=total)
    finish_execution(engine, restore_id, "completed", phase="restored")
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
def recorded(engine: Engine, execution_id: str) -> Iterator[None]:
    """On any error: the execution is closed as failed (locks released) and the error re-raised."""
    try:
        yield
    except BaseException as exc:
        finish_execution(engine, execution_id, "failed", error=describe(exc))
        if isinstance(exc, PatchError):
            exc.details.setdefault("execution_id", execution_id)
        raise

