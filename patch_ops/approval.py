"""Approve the plan: a real run needs a recent, completed dry run of exactly the same plan.

A *plan hash* is computed for every patch execution, in the freezing transaction (plan check
stage ``after_freeze``, when the target set is in ``data_patch_targets``). It is the SHA-256 of a
canonical JSON document of:

- ``patch``: the patch name;
- ``code``: SHA-256 over the source files of the patch class and of its config class (with their
  patch/config base classes, not the framework's) and of its pandera schemas: a change to what
  the patch computes or accepts is a new plan;
- ``config``: the run config, normalized (every field with its default filled in, numbers and
  enums as pydantic serializes them), without ``EXCLUDED_CONFIG``;
- ``targets``: per table the patch may update (sorted), the number of frozen ids and a SHA-256
  over them in keyset order (a page at a time, packed by the database where the dialect
  can: memory stays flat whatever the size);
- ``schema``: per table the patch touches, its reflected columns, keys, unique constraints and
  indexes and CHECKs (``patch_ops.steps.drift.schema_of``): a migration after approval is a new
  plan, and the refusal names what changed.

Left out on purpose (they change how or when the same rows are written, not what):
``dry_run`` (the whole point: the dry run approves the real run), ``launched_by`` (who, not
what; recorded on both executions), ``batch_size`` (how the frozen set is cut into batches; a
patch's transform is per driving row; ``batch_seconds`` likewise), ``transform_path`` (SQL or
pandas: both stage the same rows), ``memory_limit_mb`` (only the guard's threshold),
``allow_outside_window`` (when a real run may start, not what it writes),
``resume_execution_id`` (continuing a paused execution, whose plan was approved when it was
planned), and the run's time (``run_at``, ``business_date``): a real run always comes after its
dry run, and what the time changes in the selection is in the target digest. A field a patch
adds to its config is in the hash unless listed here: unknown means it may change the result.

A real run with ``require_approved_plan`` (the default) is refused unless a dry run of the same
patch with the same plan hash completed within ``plan_valid_hours`` and has not already
approved a real run that reached the live tables (one approval, one commit: running the same
config twice would otherwise apply a relative change twice). The real run records the hash and
``approved_by_execution_id``; both executions record ``launched_by``.

The target digest is over ids, not row contents. What the application changed in a targeted
row between dry run and real run is measured separately, on the patch's drift columns only
(``patch_ops.steps.drift``): those rows are held back with their before / approved / now
values, and above ``max_drift_percent`` the real run is refused. With
``require_distinct_approver`` the approving dry run must have been launched by someone else.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import inspect
import json
import struct
from pathlib import Path
from typing import Any

from dagster import get_dagster_logger
from sqlalchemy import and_, exists, func, select
from sqlalchemy.engine import Connection

from patch_ops.dialects import dialect_of
from patch_ops.execution import (
    PlanInfo,
    PlanRefused,
    fetch_rows,
    load_execution,
    set_execution,
    utcnow,
)
from patch_ops.lifecycle import Lifecycle
from patch_ops.patch import Patch, PatchRunConfig
from patch_ops.state import executions
from patch_ops.steps.drift import SAMPLE, hold_back_drift, schema_changes, schema_of
from patch_ops.target_sets import target_set

PLAN_VERSION = "stockrx-plan-v2"  # v2: the schema of the touched tables
EXCLUDED_CONFIG = (
    "dry_run",
    "launched_by",
    "batch_size",
    "memory_limit_mb",
    "allow_outside_window",  # when a real run may start (maintenance windows), not what it writes
    "resume_execution_id",  # which paused execution to continue; its plan was approved already
    "allow_repeat",  # whether a repeat is intended (patch_ops.checks.refuse_repeats), not what
    "release",  # a label of the run, not what it writes
    "transform_path",  # how the transform stages the same rows (SQL or pandas), not what
    "batch_seconds",  # how the frozen set is cut into batches, as batch_size
)
PAGE = 10_000
#: Phases of a real run whose changes reached the live tables: its approval is used up.
COMMITTED_PHASES = ("committed", "verified", "restored")


# ---------------------------------------------------------------------------------------------
# The plan hash
# ---------------------------------------------------------------------------------------------


def _source_files(patch: Patch) -> list[Path]:
    classes: list[type] = [
        c for c in type(patch).__mro__ if issubclass(c, Patch) and c is not Patch
    ]
    classes += [
        c
        for c in patch.config_class.__mro__
        if issubclass(c, PatchRunConfig) and c is not PatchRunConfig
    ]
    classes += list(patch.schemas.values())
    files = []
    for cls in classes:
        path = inspect.getsourcefile(cls)
        if path is None:
            raise PlanRefused(f"cannot find the source of {cls.__qualname__} to version the plan")
        files.append(Path(path).resolve())
    return sorted(set(files))


def code_version(patch: Patch) -> str:
    """SHA-256 over the patch's own source files (path names relative, so it is portable)."""
    h = hashlib.sha256()
    for path in _source_files(patch):
        h.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def normalized_config(config: PatchRunConfig) -> dict[str, Any]:
    """The run config as it determines what is written: defaults filled in, exclusions out."""
    data = config.model_dump(mode="json")
    return {k: data[k] for k in sorted(data) if k not in EXCLUDED_CONFIG}


def target_digest(conn: Connection, execution_id: str, table: str) -> dict[str, Any]:
    """Count and SHA-256 of an execution's frozen ids of one table, in keyset order, a page at
    a time (memory stays flat): packed by the database where it can
    (``DatabaseDialect.ids_sha256``, the same bytes hashed), else read here id by id."""
    frozen = target_set(conn, execution_id, table)
    mine = frozen.ids()
    prefix = table.encode() + b"\0"
    server = dialect_of(conn).ids_sha256(conn, mine, prefix)
    if server is not None:
        return {"count": server[0], "sha256": server[1]}
    h = hashlib.sha256(prefix)
    count, last = 0, None
    while True:
        q = mine if last is None else mine.where(frozen.row_id > last)
        # the driver's tuples (not SQLAlchemy rows): 1M ids in ~0.8 s instead of ~2.2 s
        ids = [r[0] for r in fetch_rows(conn, q.order_by(frozen.row_id).limit(PAGE))]
        if not ids:
            break
        h.update(struct.pack(f">{len(ids)}q", *ids))
        count += len(ids)
        last = ids[-1]
    return {"count": count, "sha256": h.hexdigest()}


def plan_of(conn: Connection, info: PlanInfo) -> dict[str, Any]:
    patch = info.patch
    tables = sorted({patch.driving_table, *patch.updates})
    return {
        "version": PLAN_VERSION,
        "patch": patch.name,
        "code": code_version(patch),
        "config": normalized_config(info.config),
        "targets": {t: target_digest(conn, info.execution_id, t) for t in tables},
        "schema": schema_of(conn, patch.tables()),
    }


def plan_hash(plan: dict[str, Any]) -> str:
    parts = {k: plan[k] for k in ("version", "patch", "code", "config", "targets", "schema")}
    text = json.dumps(
        parts, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return hashlib.sha256(text.encode("ascii")).hexdigest()


# ---------------------------------------------------------------------------------------------
# The plan check
# ---------------------------------------------------------------------------------------------


def require_approved_plan(stage: str, conn: Connection, info: PlanInfo) -> None:
    """Plan check: record the plan hash; refuse a real run without an approving dry run."""
    if stage != "after_freeze":
        return
    plan = plan_of(conn, info)
    digest = plan_hash(plan)
    log = get_dagster_logger()
    if info.config.dry_run:
        set_execution(conn, info.execution_id, plan_hash=digest, plan=plan)
        _audit(conn, info, "plan_hash", {"plan_hash": digest})
        log.info(
            f"plan hash {digest}: a real run with the same config and target set approved by "
            f"this dry run may run within {info.settings.plan_valid_hours:g} hours"
        )
        return
    if not info.settings.require_approved_plan:
        set_execution(conn, info.execution_id, plan_hash=digest, plan=plan)
        _audit(conn, info, "plan_hash", {"plan_hash": digest, "approval": "not required"})
        log.warning(f"plan hash {digest}: approval not required for {info.patch.name}")
        return
    me = str(load_execution(conn, info.execution_id)["launched_by"] or "")
    distinct = me if info.settings.require_distinct_approver else None
    approver = find_approval(
        conn, info.patch.name, digest, info.settings.plan_valid_hours, not_launched_by=distinct
    )
    if approver is None:
        same = find_approval(conn, info.patch.name, digest, info.settings.plan_valid_hours)
        if distinct is not None and same is not None:
            raise PlanRefused(
                f"require_distinct_approver: approving dry run {same['execution_id']} was "
                f"launched by {same['launched_by']}, who launches this real run too; someone "
                "else must launch the dry run that approves it, or the real run"
            )
        raise PlanRefused(_refusal(conn, info, plan, digest))
    drift = hold_back_drift(
        conn, info.patch, info.settings, info.execution_id, approver["execution_id"]
    )
    plan["approval"] = {
        "execution_id": approver["execution_id"],
        "launched_by": approver["launched_by"],
        "completed_at": approver["completed_at"].isoformat(sep=" ", timespec="seconds"),
    }
    set_execution(
        conn,
        info.execution_id,
        plan_hash=digest,
        plan=plan,
        approved_by_execution_id=approver["execution_id"],
    )
    _audit(
        conn,
        info,
        "plan_approved",
        {
            "plan_hash": digest,
            "approved_by_execution_id": approver["execution_id"],
            "approved_by": approver["launched_by"],
            "dry_run_completed_at": plan["approval"]["completed_at"],
            "drift_held_back": drift["count"],
        },
    )
    if drift["count"]:
        _audit(
            conn,
            info,
            "drift_held_back",
            {"rows": drift["count"], "targets": drift["targets"], "percent": drift["percent"],
             "max_drift_percent": drift["max_percent"], "columns": drift["columns"],
             "approved_by_execution_id": approver["execution_id"],
             "sample_ids": [s["source_id"] for s in drift["sample"][:SAMPLE]]},
            {"sample": drift["sample"]},
        )
        log.warning(
            f"held back {drift['count']:,} row(s) changed since approving dry run "
            f"{approver['execution_id']} ({drift['percent']:g} % of {drift['targets']:,}; at "
            f"most {drift['max_percent']:g} %): "
            + "; ".join(f"{s['source_id']} ({s['values']})" for s in drift["sample"])
        )
    log.info(
        f"plan hash {digest} approved by dry run {approver['execution_id']} "
        f"(launched by {approver['launched_by']}, completed {plan['approval']['completed_at']} UTC)"
    )


def _used_up(dry_id: Any) -> Any:
    real = executions.alias("real")
    return exists().where(
        real.c.approved_by_execution_id == dry_id, real.c.phase.in_(COMMITTED_PHASES)
    )


def find_approval(
    conn: Connection,
    patch_name: str,
    digest: str,
    valid_hours: float,
    not_launched_by: str | None = None,
) -> dict[str, Any] | None:
    """The newest completed dry run with this plan, still valid and not used up, if any
    (``not_launched_by``: launched by someone else, names compared case-insensitively)."""
    since = utcnow() - dt.timedelta(hours=valid_hours)
    q = select(executions).where(
        executions.c.patch_name == patch_name,
        executions.c.kind == "patch",
        executions.c.dry_run.is_(True),
        executions.c.status == "completed",
        executions.c.plan_hash == digest,
        executions.c.completed_at >= since,
        ~_used_up(executions.c.execution_id),
    )
    if not_launched_by is not None:
        q = q.where(
            func.lower(func.coalesce(executions.c.launched_by, "")) != not_launched_by.lower()
        )
    row = (
        conn.execute(
            q.order_by(executions.c.completed_at.desc())
            .limit(1)
        )
        .mappings()
        .first()
    )
    return dict(row) if row is not None else None


def _refusal(conn: Connection, info: PlanInfo, plan: dict[str, Any], digest: str) -> str:
    """Why no dry run approves this plan, as precisely as the history allows."""
    name, hours = info.patch.name, info.settings.plan_valid_hours
    how = (
        f"run {name} with dry_run: true and the same config, check its impact report, then run "
        f"the real run within {hours:g} hours"
    )
    head = f"no approved dry run for this plan (plan hash {digest[:16]}…)"
    dry_runs = executions.c.dry_run.is_(True)
    base = and_(
        executions.c.patch_name == name,
        executions.c.kind == "patch",
        dry_runs,
        executions.c.status == "completed",
    )
    same = (
        conn.execute(
            select(executions)
            .where(base, executions.c.plan_hash == digest)
            .order_by(executions.c.completed_at.desc())
            .limit(1)
        )
        .mappings()
        .first()
    )
    if same is not None:
        used = conn.execute(
            select(executions.c.execution_id)
            .where(
                executions.c.approved_by_execution_id == same["execution_id"],
                executions.c.phase.in_(COMMITTED_PHASES),
            )
            .limit(1)
        ).scalar()
        if used is not None:
            return (
                f"{head}: dry run {same['execution_id']} already approved real run {used}, "
                f"which committed; an approval is good for one commit: {how}"
            )
        age = (utcnow() - same["completed_at"]).total_seconds() / 3600
        return (
            f"{head}: dry run {same['execution_id']} of this plan completed "
            f"{same['completed_at']:%Y-%m-%d %H:%M} UTC, {age:.1f} hours ago, and plans stay "
            f"valid for {hours:g} hours (plan_valid_hours): {how}"
        )
    latest = (
        conn.execute(
            select(executions).where(base).order_by(executions.c.completed_at.desc()).limit(1)
        )
        .mappings()
        .first()
    )
    if latest is None:
        return f"{head}: {name} has no completed dry run: {how}"
    diffs = _differences(latest.get("plan") or {}, plan)
    return (
        f"{head}: the latest completed dry run {latest['execution_id']} "
        f"({latest['completed_at']:%Y-%m-%d %H:%M} UTC) planned something else: "
        f"{'; '.join(diffs) or 'a different plan'}: {how}"
    )


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    if old.get("version") != new["version"]:
        return ["it was planned by another version of the framework"]
    if old.get("code") != new["code"]:
        out.append("the patch's code changed since")
    old_cfg, new_cfg = old.get("config", {}), new["config"]
    changed = [k for k in sorted(set(old_cfg) | set(new_cfg)) if old_cfg.get(k) != new_cfg.get(k)]
    if changed:
        out.append(
            "config differs in "
            + ", ".join(
                f"{k} ({_short(old_cfg.get(k))} → {_short(new_cfg.get(k))})" for k in changed
            )
        )
    for table, items in (new.get("schema") or {}).items():
        was = (old.get("schema") or {}).get(table)
        if was is not None and was != items:
            changes = schema_changes(was, items)
            shown = "; ".join(changes[:3]) + (f"; {len(changes) - 3} more" if len(changes) > 3 else "")
            out.append(f"the schema of {table} changed since approval ({shown})")
    for table, t in new["targets"].items():
        o = old.get("targets", {}).get(table, {})
        if o.get("sha256") != t["sha256"]:
            if o.get("count") != t["count"]:
                out.append(f"target set of {table} differs ({o.get('count')} → {t['count']} rows)")
            else:
                out.append(f"target set of {table} differs (same size {t['count']}, other ids)")
    return out


def _audit(
    conn: Connection,
    info: PlanInfo,
    event_type: str,
    public: dict[str, Any],
    secret: dict[str, Any] | None = None,
) -> None:
    """An audit event in the freezing transaction: it commits only if the plan does."""
    Lifecycle(info.resources, info.engine, info.execution_id).audit(
        event_type, public, secret, conn=conn
    )
