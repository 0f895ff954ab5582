"""The plan checks every patch job runs (``execution.PlanCheck``: called with the stage
``before_freeze``, ``after_freeze`` or ``resume``; raising PlanRefused refuses the run before any
write to StockRx tables, recorded in the history): the audit key a real run needs, and the
maintenance window (see ``patch_ops.windows``). The approval gate is ``patch_ops.approval``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy.engine import Connection

from patch_ops.execution import (
    PlanInfo,
    PlanRefused,
    estimate_seconds,
    load_execution,
    set_execution,
)
from patch_ops.lifecycle import AUDIT
from patch_ops.windows import (
    MIN_TIME_BUDGET_SECONDS,
    OVERRUN_FACTOR,
    current_window,
    describe_windows,
    fixed_clock,
    next_window,
    now,
    utc_naive,
)
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
    occ = current_window(windows, instant) if windows else None
    outside = real and bool(windows) and occ is None

    if stage in ("before_freeze", "resume") and outside and not override:
        nxt = next_window(windows, instant)
        what = "resume" if stage == "resume" else "start"
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
