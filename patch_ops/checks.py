"""The plan checks every patch job runs (``execution.PlanCheck``: called with the stage
``before_freeze``, ``after_freeze`` or ``resume``; raising PlanRefused refuses the run before any
write to StockRx tables, recorded in the history): the audit key a real run needs, no repeat of
a committed run unless asked for, and the maintenance window (see ``patch_ops.windows``). The
approval gate is ``patch_ops.approval``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import false, func, select
from sqlalchemy.engine import Connection

from patch_ops.execution import (
    PlanInfo,
    PlanRefused,
    estimate_seconds,
    load_execution,
    set_execution,
)
from patch_ops.lifecycle import AUDIT
from patch_ops.state import UPDATE, executions
from patch_ops.steps.plan import work_config
from patch_ops.target_sets import target_ids
from patch_ops.windows import (
    MIN_TIME_BUDGET_SECONDS,
    OVERRUN_FACTOR,
    describe_windows,
    fixed_clock,
    next_window,
    now,
    real_run_window,
    utc_naive,
)
from patch_ops.work_rows import existing_rows
from resources.audit import AuditLog


def missing_audit_key(resources: Any, what: str) -> str | None:
    """Why a real run, restore or purge (``what``) may not change data: the audit trail is on
    (security.log_encryption) but has no key. None: it may."""
    audit: AuditLog | None = getattr(resources, AUDIT, None) if resources is not None else None
    if audit is not None and audit.enabled and not audit.has_key:
        return (
            f"no audit key configured: a real {what} needs the encrypted audit trail. Set "
            "STOCKRX_AUDIT_KEYS (key_id:fernet_key; `stockrx-patches audit new-key` makes one) "
            "or STOCKRX_AUDIT_KEY_FILE, or opt out with security.log_encryption: false."
        )
    return None


def require_audit_key(stage: str, conn: Connection, info: PlanInfo) -> None:
    """A real run needs the audit trail (unless security.log_encryption is false)."""
    if stage != "before_freeze" or info.config.dry_run:
        return
    reason = missing_audit_key(info.resources, "run")
    if reason:
        raise PlanRefused(reason)


#: ``launched_by`` of a scheduled run: "schedule:<schedule name>" (stockrx_patches.schedules).
SCHEDULED_BY = "schedule:"
#: A scheduled real run whose target set exceeds this many times the largest of the patch's
#: completed real runs (or its ``estimated_records`` before it has any) is held, not committed.
ANOMALY_FACTOR = 3


def hold_anomalous_scheduled_runs(stage: str, conn: Connection, info: PlanInfo) -> None:
    """A scheduled real run runs without a dry-run approval (its code and schedule are reviewed
    in version control); one whose target set is far outside the patch's own history is not
    committed: it goes on as a dry run (reported, an ordinary message) and waits for a person
    to launch the real run by hand."""
    config = info.config
    if stage != "after_freeze" or config.dry_run:
        return
    if not (config.launched_by or "").startswith(SCHEDULED_BY):
        return
    ex = load_execution(conn, info.execution_id)
    count = int(ex["target_count"] or 0)
    largest = conn.execute(
        select(func.max(executions.c.target_count)).where(
            executions.c.patch_name == info.patch.name,
            executions.c.kind == "patch",
            executions.c.dry_run.is_(False),
            executions.c.status == "completed",
        )
    ).scalar()
    if largest:
        limit, basis = ANOMALY_FACTOR * int(largest), f"the largest of its completed runs ({largest:,})"
    else:
        limit = ANOMALY_FACTOR * int(info.settings.estimated_records)
        basis = f"its estimated_records ({info.settings.estimated_records:,}; no completed run yet)"
    if count <= limit:
        return
    reason = (
        f"held for approval: this scheduled run targets {count:,} rows, more than "
        f"{ANOMALY_FACTOR}x {basis}; it ran as a dry run and committed nothing. Check the report, "
        "then launch the real run by hand to apply it"
    )
    report = dict(ex["report"] or {})
    report["held_for_approval"] = {"targets": count, "limit": limit, "reason": reason}
    set_execution(conn, info.execution_id, dry_run=True, report=report)


def refuse_repeats(stage: str, conn: Connection, info: PlanInfo) -> None:
    """A real run must not apply a patch a second time by accident (a +8 % twice): refused,
    unless ``allow_repeat`` (recorded), when an unrestored committed real run of the patch

    - had the same ``release`` (when the config names one), or
    - had the same config and changed any of this run's frozen targets (comparing configs alone
      is not enough: a threshold filter such as ``min_price`` selects new rows after +8 %;
      comparing target sets is not either). Not for ``idempotent`` patches.
    """
    config = info.config
    if stage != "after_freeze" or config.dry_run:
        return
    earlier = conn.execute(
        select(executions).where(
            executions.c.patch_name == info.patch.name,
            executions.c.kind == "patch",
            executions.c.dry_run.is_(False),
            executions.c.phase.in_(["committed", "verified"]),
            executions.c.rollback_performed.is_(false()),
            executions.c.restored_by_execution_id.is_(None),
            executions.c.execution_id != info.execution_id,
        ).order_by(executions.c.started_at)
    ).mappings().all()
    mine = work_config(config.model_dump())
    repeats = []
    for ex in earlier:
        theirs = ex["config"] or {}
        if config.release and theirs.get("release") == config.release:
            repeats.append((ex, f"already ran for release {config.release!r}"))
        elif not info.patch.idempotent and work_config(theirs) == mine:
            changed = rows_changed_again(conn, info, ex)
            if changed is None:
                repeats.append((ex, "had the same config (which rows it changed is unknown: its "
                                    "work data was purged)"))
            elif changed:
                repeats.append((ex, f"had the same config and changed {changed:,} of the rows "
                                    "this run would change"))
    if not repeats:
        return
    what = "; ".join(
        f"execution {ex['execution_id']} (launched by {ex['launched_by']}, started "
        f"{ex['started_at']:%Y-%m-%d %H:%M} UTC) {why}" for ex, why in repeats
    )
    if config.allow_repeat:
        mine_row = load_execution(conn, info.execution_id)
        report = dict(mine_row["report"] or {})
        report["repeat_allowed"] = {"of": [e["execution_id"] for e, _ in repeats], "why": what}
        set_execution(conn, info.execution_id, report=report)
        return
    raise PlanRefused(
        f"refused as a repeat: {what}. A second real run would apply {info.patch.name} again; "
        "restore the earlier execution first, or set allow_repeat: true in the run config to "
        "repeat it on purpose (recorded in the history)."
    )


def rows_changed_again(conn: Connection, info: PlanInfo, earlier: Any) -> int | None:
    """How many of this execution's frozen targets an earlier execution changed (None: its
    stage rows were purged, so it cannot be told)."""
    if (earlier["report"] or {}).get("backup_purged"):
        return None
    earlier_id, total = earlier["execution_id"], 0
    for table in info.patch.updates:
        theirs = existing_rows(conn, table, earlier_id, UPDATE)
        if theirs is None:
            continue
        mine = target_ids(conn, info.execution_id, table)
        total += conn.execute(
            select(func.count()).select_from(theirs.table).where(theirs.mine, theirs.seq.in_(mine))
        ).scalar_one()
    return total


def estimate_run_seconds(conn: Connection, info: PlanInfo, records: int) -> tuple[float, str]:
    """(seconds, how it was estimated) for ``records`` rows of the patch."""
    past = estimate_seconds(conn, info.patch.name, records)
    if past is not None:
        return past, "throughput of its last completed runs"
    rate = info.settings.first_run_rows_per_second
    return records / rate, f"no completed run yet: {rate:g} rows/s assumed"


def check_maintenance_window(stage: str, conn: Connection, info: PlanInfo) -> None:
    """Plan check (execution.PlanCheck): window guard, fit-in-window, deadline and time budget."""
    windows = tuple(info.settings.maintenance_windows)
    config = info.config
    real = not config.dry_run
    override = bool(getattr(config, "allow_outside_window", False))
    instant = now()
    occ, why = real_run_window(windows, instant)
    outside = real and why is not None

    if stage in ("before_freeze", "resume") and outside and not override:
        what = "resume" if stage == "resume" else "start"
        if occ is not None:  # inside a window by a fixed clock: that is an override
            raise PlanRefused(
                f"{why}: a fixed clock is an override of the maintenance windows, so a real run "
                f"of {info.patch.name} under it needs allow_outside_window: true in the run "
                "config (recorded in the history); or unset it to run by the system clock."
            )
        nxt = next_window(windows, instant)
        raise PlanRefused(
            f"outside the maintenance windows ({describe_windows(windows)}): a real run of "
            f"{info.patch.name} may {what} only inside one"
            + (f"; the next one opens {nxt.describe()}" if nxt else "")
            + ". Launch it then, or set allow_outside_window: true in the run config to "
            "override (recorded in the history)."
        )
    if stage not in ("after_freeze", "resume"):
        return

    ex = load_execution(conn, info.execution_id)
    total = int(ex["target_count"] or 0)
    if stage == "after_freeze":
        estimate, basis = estimate_run_seconds(conn, info, total)
    else:
        done = int(ex["processed_records"] or 0)
        previous = ex["estimated_seconds"]
        if previous is not None and total:
            estimate = float(previous) * max(total - done, 0) / total
            basis = f"the rest ({total - done:,} of {total:,} rows) of the first estimate"
        else:
            estimate, basis = estimate_run_seconds(conn, info, max(total - done, 0))
    deadline = occ.end if (real and occ is not None) else None
    if stage == "after_freeze" and deadline is not None:
        left = (deadline - instant).total_seconds()
        if estimate > left:
            raise PlanRefused(
                f"estimated {estimate:,.0f} s for {total:,} rows ({basis}) will not finish before "
                f"the maintenance window ends at {deadline:%H:%M %Z} ({left:,.0f} s left); "
                f"launch it at the start of the next window"
                + (f" ({nxt.describe()})" if (nxt := next_window(windows, deadline)) else "")
            )
    record = {
        "clock": instant.isoformat(),
        "clock_fixed": fixed_clock() is not None,
        "window": occ.describe() if occ is not None else None,
        "deadline_at": deadline.isoformat() if deadline else None,
        "estimated_seconds": round(estimate, 3),
        "estimate_basis": basis,
        "allow_outside_window": override,
        "outside_window_override": outside and override,
        "override_reason": why if outside and override else None,
    }
    report = dict(ex["report"] or {})
    key = "timing" if stage == "after_freeze" else "timing_resumed"
    report[key] = record if stage == "after_freeze" else [*report.get(key, []), record]
    values: dict[str, Any] = {
        "deadline_at": utc_naive(deadline) if deadline else None,
        "overrun_at": utc_naive(
            instant + dt.timedelta(seconds=max(OVERRUN_FACTOR * estimate, MIN_TIME_BUDGET_SECONDS))
        ),
        "report": report,
    }
    if stage == "after_freeze":
        values["estimated_seconds"] = estimate
    set_execution(conn, info.execution_id, **values)
