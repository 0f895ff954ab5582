"""Sensors: runs started by release requests, by data, by a paused execution; dead runs.

- ``patch_request_sensor``: launches each pending row of ``data_patch_requests`` once
  (``run_key``), rejects unknown patches and invalid config (reason on the row), holds real runs
  until a maintenance window is open, and records each request's outcome (stockrx_patches.requests).
- ``<patch>_work_pending_sensor`` (each scheduled patch): outside the maintenance windows, when
  the patch has something to do (its ``targets()`` select rows: for batch_expiry_update, expired
  lots with stock), starts a dry run, at most once per business day, so the report of what the next
  scheduled run will write is there to read.
- ``paused_patch_resume_sensor``: when a window opens, continues each paused execution that its
  patch's schedule will not (a scheduled run continues a paused execution with its config).
- ``patch_run_failure_sensor``: a patch run that failed outside the patch's own steps (its
  process died, run monitoring or a user marked it failed, or it failed before planning) gets the
  urgent notification the steps could not send; its execution is closed as failed and its table
  locks released.

The clock is ``patch_ops.windows.now()`` (STOCKRX_PATCHES_CLOCK fixes it for tests).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import warnings
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

from dagster import (
    BetaWarning,
    DagsterInvalidConfigError,
    DagsterRunStatus,
    JobDefinition,
    RunFailureSensorContext,
    RunRequest,
    RunsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    run_failure_sensor,
    sensor,
    validate_run_config,
)
from sqlalchemy import select

from patch_ops.database import write_transaction
from patch_ops.dialects.names import has_table
from patch_ops.execution import CANCELLED, finish_execution
from patch_ops.lifecycle import AUDIT, NOTIFIER, Lifecycle
from patch_ops.outbox import keep
from patch_ops.patch import PatchConfigError, RunContext
from patch_ops.state import executions, reflect_tables
from patch_ops.steps.plan import work_config
from patch_ops.windows import current_window, next_window, now, real_run_window, utc_naive
from resources.audit import AuditLog
from resources.database import StockRxDatabase
from resources.notifier import Notifier, PatchNotification
from stockrx_patches import requests as rq
from stockrx_patches.registry import Registry
from stockrx_patches.schedules import TRIGGER_TAG, scheduled_run_config, sensor_default_status
from stockrx_patches.ticks import is_preview

REQUEST_SENSOR = "patch_request_sensor"
RESUME_SENSOR = "paused_patch_resume_sensor"
FAILURE_SENSOR = "patch_run_failure_sensor"
#: A launched request whose run has not appeared after this long is requested again.
LOST_LAUNCH = dt.timedelta(minutes=10)


def work_pending_sensor_name(patch_name: str) -> str:
    return f"{patch_name}_work_pending_sensor"


def _plan_config(run_config: dict[str, Any]) -> dict[str, Any]:
    return dict(run_config["ops"]["plan_patch"]["config"])


# ---------------------------------------------------------------------------------------------
# Release requests
# ---------------------------------------------------------------------------------------------


def _job(context: SensorEvaluationContext, jobs: dict[str, JobDefinition], name: str) -> Any:
    repo = getattr(context, "repository_def", None)
    if repo is not None and repo.has_job(name):
        return repo.get_job(name)
    return jobs[name]


def request_problem(
    registry: Registry,
    job_of: Callable[[str], JobDefinition],
    name: str,
    run_config: Any,
    requested_by: str | None,
) -> tuple[str | None, dict[str, Any] | None]:
    """Why a request cannot run (None: it can), and its run config. The checks of a run's
    start before any op: the patch exists, the config is a JSON object that Dagster's config
    types and the patch's ``check_config`` accept. At request time (CLI) and by the sensor."""
    if name not in registry.patches:
        known = ", ".join(sorted(registry.patches))
        return f"unknown patch {name!r}; known patches: {known}", None
    cfg = run_config
    if isinstance(cfg, str):
        try:
            cfg = json.loads(cfg)
        except ValueError as exc:
            return f"run_config is not JSON: {exc}", None
    if not isinstance(cfg, dict):
        return "run_config must be a JSON object (the ops.plan_patch.config)", None
    cfg = {"launched_by": requested_by, **cfg}
    full = {"ops": {"plan_patch": {"config": cfg}}}
    try:
        validate_run_config(job_of(name), full)
    except DagsterInvalidConfigError as exc:
        problems = "; ".join(e.message for e in exc.errors) or str(exc)
        return f"invalid run config: {problems}", None
    patch = registry.get(name)
    try:
        config = patch.config_class(**cfg)
        problem = config.value_problem()
        if problem:
            raise PatchConfigError(problem)
        patch.check_config(config)
    except (PatchConfigError, ValueError) as exc:
        return f"invalid run config: {exc}", None
    return None, full


def judge_request(
    context: SensorEvaluationContext,
    registry: Registry,
    jobs: dict[str, JobDefinition],
    request: dict[str, Any],
    instant: dt.datetime,
) -> tuple[str, str | None, dict[str, Any] | None]:
    """(status to give the request, reason, run config to launch with or None)."""
    name = request["patch_name"]
    problem, run_config = request_problem(
        registry, lambda n: _job(context, jobs, n), name, request["run_config"],
        request["requested_by"],
    )
    if problem or run_config is None:
        return rq.REJECTED, problem, None
    if request["status"] == rq.HELD and str(request["reason"] or "").startswith(rq.PLAN_CHANGED):
        return rq.HELD, request["reason"], None  # until a person sets it back to pending
    config = registry.get(name).config_class(**_plan_config(run_config))
    settings = registry.settings(name)
    windows = settings.maintenance_windows
    occ, why = real_run_window(windows, instant)
    if not config.dry_run and why is not None and not getattr(config, "allow_outside_window", False):
        if occ is not None:  # a fixed clock: no window opens for it
            return rq.HELD, f"real run held: {why}, which needs allow_outside_window", None
        nxt = next_window(windows, instant)
        when = nxt.describe() if nxt else "the next maintenance window"
        return rq.HELD, f"real run held until the next maintenance window ({when})", None
    if request["status"] == rq.HELD and not config.dry_run and settings.require_approved_plan:
        # Its approval (a dry run of the same plan, valid 24 hours) has likely expired while it
        # waited: a fresh dry run re-confirms the plan first (_reconfirmed).
        dry = {"ops": {"plan_patch": {"config": {**_plan_config(run_config), "dry_run": True}}}}
        return rq.RECONFIRMING, "re-confirming the approved plan with a fresh dry run", dry
    return rq.LAUNCHED, None, run_config


def _reconfirmed(
    context: SensorEvaluationContext, engine: Any, req: dict[str, Any], notifier: Notifier
) -> None:
    """The outcome of a held request's re-confirming dry run: same plan as the dry run that
    approved it (or none before it): pending, so the real run starts at once; another plan:
    held with the difference until a person looks, and the requester told (not paged)."""
    runs = context.instance.get_runs(RunsFilter(tags={rq.RECONFIRM_TAG: str(req["id"])}), limit=1)
    if not runs:
        since = req["updated_at"] or req["requested_at"]
        if since is not None and rq.utcnow() - since > LOST_LAUNCH:
            with write_transaction(engine) as conn:
                rq.mark(conn, req["id"], rq.HELD, reason="no re-confirming run appeared; held")
        return
    run = runs[0]
    with engine.connect() as conn:
        ex = conn.execute(
            select(executions).where(executions.c.dagster_run_id == run.run_id,
                                     executions.c.kind == "patch")
        ).mappings().first()
        prior = None
        if ex is not None and ex["status"] == "completed":
            earlier = conn.execute(
                select(executions).where(
                    executions.c.patch_name == ex["patch_name"], executions.c.kind == "patch",
                    executions.c.dry_run.is_(True), executions.c.status == "completed",
                    executions.c.started_at < ex["started_at"],
                ).order_by(executions.c.started_at.desc())
            ).mappings()  # newest first, read until the first with the same config
            prior = next((p for p in earlier
                          if work_config(p["config"]) == work_config(ex["config"])), None)
    values: dict[str, Any] = {"dagster_run_id": run.run_id}
    if ex is None:
        if not run.is_finished:
            return
        status, values["reason"] = rq.FAILED, f"the re-confirming dry run {run.status.value}"
    elif ex["status"] in ("failed", CANCELLED):
        status = rq.FAILED
        values["reason"] = f"the re-confirming dry run {ex['status']}: {ex['error_message']}"
    elif ex["status"] != "completed":
        return
    elif prior is None or prior["plan_hash"] == ex["plan_hash"]:
        status, values["reason"] = rq.PENDING, (
            f"plan re-confirmed by dry run {ex['execution_id']}: the real run starts")
    else:
        status, values["reason"] = rq.HELD, (
            f"{rq.PLAN_CHANGED}: dry run {prior['execution_id']} planned "
            f"{prior['target_count']:,} rows, the re-confirming dry run {ex['execution_id']} "
            f"{ex['target_count']:,} (plan {str(prior['plan_hash'])[:12]} -> "
            f"{str(ex['plan_hash'])[:12]}); read its report, then set the request back to "
            "pending to run it")
        notification = PatchNotification(
            patch_name=req["patch_name"], execution_id=str(ex["execution_id"]), outcome="held",
            dry_run=False, dagster_run_id=run.run_id,
            reason=f"request {req['id']} of {req['requested_by']}: {values['reason']}",
        )
        keep(engine, notification, notifier.notify(notification))
    with write_transaction(engine) as conn:
        rq.mark(conn, req["id"], status, **values)


def _reconcile(context: SensorEvaluationContext, engine: Any, notifier: Notifier) -> None:
    """Record the outcome of launched requests (by their execution, so a paused execution that a
    later run finishes counts too)."""
    with engine.connect() as conn:
        launched = rq.launched_requests(conn)
    for req in launched:
        if req["status"] == rq.RECONFIRMING:
            _reconfirmed(context, engine, req, notifier)
            continue
        runs = context.instance.get_runs(RunsFilter(tags={rq.REQUEST_TAG: str(req["id"])}), limit=1)
        values: dict[str, Any] = {}
        status = rq.LAUNCHED
        if not runs:
            since = req["updated_at"] or req["requested_at"]
            if since is not None and rq.utcnow() - since > LOST_LAUNCH:
                status, values = rq.PENDING, {"reason": "no run appeared; requested again"}
            else:
                continue
        else:
            run = runs[0]
            values["dagster_run_id"] = run.run_id
            ex = None
            if has_table(engine, executions):
                which = (
                    executions.c.execution_id == req["execution_id"]
                    if req["execution_id"]
                    else executions.c.dagster_run_id == run.run_id
                )
                with engine.connect() as conn:
                    ex = (
                        conn.execute(
                            select(executions)
                            .where(executions.c.kind == "patch", which)
                            .order_by(executions.c.started_at.desc())
                            .limit(1)
                        )
                        .mappings()
                        .first()
                    )
            if ex is not None:
                values["execution_id"] = ex["execution_id"]
                if ex["status"] == "completed":
                    status, values["reason"] = rq.SUCCEEDED, None
                elif ex["status"] in ("failed", CANCELLED):  # cancelled: stopped on request
                    status, values["reason"] = rq.FAILED, ex["error_message"]
                elif ex["status"] == "paused":
                    values["reason"] = (
                        "paused at the end of the maintenance window; continues in the next"
                    )
            elif run.is_finished:
                ok = run.status == DagsterRunStatus.SUCCESS
                status = rq.SUCCEEDED if ok else rq.FAILED
                values["reason"] = None if ok else f"run {run.status.value} before planning"
        if status != req["status"] or any(req.get(k) != v for k, v in values.items()):
            with write_transaction(engine) as conn:
                rq.mark(conn, req["id"], status, **values)


REQUEST_POLL_ENV = "STOCKRX_REQUEST_POLL_SECONDS"


def request_poll_seconds() -> int:
    """How often ``patch_request_sensor`` looks at the request table (STOCKRX_REQUEST_POLL_SECONDS,
    default 30 s): a pending request waits at most this long for its run, and a finished run this
    long for its request's outcome. The daemon evaluates sensors at most every 5 s whatever it says.
    """
    raw = (os.environ.get(REQUEST_POLL_ENV) or "30").strip()
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{REQUEST_POLL_ENV} must be a whole number of seconds >= 1, got {raw!r}")
    return int(raw)


def build_request_sensor(registry: Registry, jobs: Sequence[JobDefinition]) -> SensorDefinition:
    by_name = {j.name: j for j in jobs if j.name in registry.patches}

    @sensor(
        name=REQUEST_SENSOR,
        jobs=list(by_name.values()),
        minimum_interval_seconds=request_poll_seconds(),
        default_status=sensor_default_status(),
        description="Launches each pending row of data_patch_requests once; rejects unknown "
        "patches and invalid config; holds real runs until a maintenance window.",
    )
    def patch_request_sensor(
        context: SensorEvaluationContext, stockrx_db: StockRxDatabase, notifier: Notifier
    ) -> SensorResult:
        engine = stockrx_db.get_engine()
        preview = is_preview(context)
        if preview and not has_table(engine, rq.requests):
            return SensorResult(skip_reason=SkipReason("preview: no request table yet"))
        if not preview:
            rq.ensure_requests_table(engine)
            _reconcile(context, engine, notifier)
        instant = now()
        run_requests = []
        summary: dict[str, int] = {}
        # A preview decides the same and writes nothing (its reads end rolled back).
        with engine.connect() if preview else write_transaction(engine) as conn:
            for req in rq.open_requests(conn):
                status, reason, run_config = judge_request(context, registry, by_name, req, instant)
                summary[status] = summary.get(status, 0) + 1
                if status == rq.HELD and req["status"] == rq.HELD and req["reason"] == reason:
                    continue
                key = rq.run_key(req["id"]) if run_config is not None else None
                if status == rq.RECONFIRMING:
                    key = f"{key}:reconfirm"
                if not preview:
                    rq.mark(conn, req["id"], status, reason=reason, run_key=key)
                if run_config is None:
                    context.log.info(
                        f"{'preview: ' if preview else ''}request {req['id']} "
                        f"({req['patch_name']}): {status}: {reason}"
                    )
                    continue
                tags = {
                    rq.REQUEST_TAG: str(req["id"]),
                    TRIGGER_TAG: "request",
                    "stockrx/requested-by": str(req["requested_by"])[:255],
                }
                if req["release_tag"]:
                    tags["stockrx/release"] = str(req["release_tag"])[:255]
                if status == rq.RECONFIRMING:
                    tags[rq.RECONFIRM_TAG] = str(req["id"])
                run_requests.append(
                    RunRequest(
                        run_key=key, job_name=req["patch_name"], run_config=run_config, tags=tags
                    )
                )
        if not run_requests:
            detail = ", ".join(f"{n} {s}" for s, n in sorted(summary.items()))
            return SensorResult(
                skip_reason=SkipReason(
                    f"{'preview, nothing written: ' if preview else ''}no request to launch "
                    f"({detail or 'none open'})"
                )
            )
        return SensorResult(run_requests=run_requests)

    return patch_request_sensor


# ---------------------------------------------------------------------------------------------
# Data condition: work pending outside the windows
# ---------------------------------------------------------------------------------------------


def build_work_pending_sensor(registry: Registry, patch_name: str) -> SensorDefinition:
    patch = registry.get(patch_name)
    settings = registry.settings(patch_name)
    sensor_name = work_pending_sensor_name(patch_name)

    @sensor(
        name=sensor_name,
        job_name=patch_name,
        minimum_interval_seconds=600,
        default_status=sensor_default_status(),
        description=f"Outside the maintenance windows, a dry run of {patch_name} (at most once a "
        "day) when it has something to do, so its report is ready before the scheduled run.",
    )
    def work_pending_sensor(
        context: SensorEvaluationContext, stockrx_db: StockRxDatabase
    ) -> SensorResult | SkipReason:
        instant = now()
        occ = current_window(settings.maintenance_windows, instant)
        if occ is not None:
            return SkipReason(
                f"inside the maintenance window {occ.describe()}: the schedule runs it"
            )
        business_date = instant.astimezone(ZoneInfo(patch.timezone)).date()
        if context.cursor == business_date.isoformat():
            return SkipReason(f"today's dry run ({business_date}) was already started")
        engine = stockrx_db.get_engine()
        try:
            tables = reflect_tables(engine, patch.tables())
        except LookupError as exc:
            return SkipReason(str(exc))
        cfg: dict[str, Any] = {"dry_run": True, "launched_by": f"sensor:{sensor_name}"}
        if "business_date" in patch.config_class.model_fields:
            cfg["business_date"] = business_date.isoformat()  # what was checked is what runs
        config = patch.config_class(**cfg)
        ctx = RunContext("sensor", utc_naive(instant), business_date)
        selection = patch.targets(tables, config, ctx)[patch.driving_table]
        with engine.connect() as conn:
            found = conn.execute(selection.limit(1)).first()
        if found is None:
            return SkipReason(f"{patch_name} has nothing to do for {business_date}")
        return SensorResult(
            run_requests=[
                RunRequest(
                    run_key=f"{patch_name}:work-pending:{business_date}",
                    run_config={"ops": {"plan_patch": {"config": cfg}}},
                    tags={TRIGGER_TAG: "sensor"},
                )
            ],
            cursor=business_date.isoformat(),
        )

    return work_pending_sensor


# ---------------------------------------------------------------------------------------------
# Resuming paused executions
# ---------------------------------------------------------------------------------------------


def build_resume_sensor(registry: Registry, jobs: Sequence[JobDefinition]) -> SensorDefinition:
    patch_jobs = [j for j in jobs if j.name in registry.patches]

    def resumed_by_schedule(name: str, config: dict[str, Any]) -> bool:
        settings = registry.settings(name)
        if not settings.scheduled:
            return False
        scheduled = registry.get(name).config_class(
            **_plan_config(scheduled_run_config(name, settings))
        )
        return work_config(scheduled.model_dump()) == work_config(config)

    @sensor(
        name=RESUME_SENSOR,
        jobs=patch_jobs,
        minimum_interval_seconds=60,
        default_status=sensor_default_status(),
        description="When a maintenance window opens, continues paused executions (those a "
        "schedule does not continue itself).",
    )
    def paused_patch_resume_sensor(
        context: SensorEvaluationContext, stockrx_db: StockRxDatabase
    ) -> SensorResult | SkipReason:
        engine = stockrx_db.get_engine()
        if not has_table(engine, executions):
            return SkipReason("no execution history yet")
        with engine.connect() as conn:
            paused = (
                conn.execute(
                    select(executions)
                    .where(executions.c.status == "paused", executions.c.kind == "patch")
                    .order_by(executions.c.started_at)
                )
                .mappings()
                .all()
            )
        instant = now()
        run_requests = []
        for ex in paused:
            name = ex["patch_name"]
            if name not in registry.patches:
                continue
            occ = current_window(registry.settings(name).maintenance_windows, instant)
            if occ is None or resumed_by_schedule(name, ex["config"]):
                continue
            cfg = {k: v for k, v in (ex["config"] or {}).items() if v is not None}
            cfg["resume_execution_id"] = ex["execution_id"]
            run_requests.append(
                RunRequest(
                    run_key=f"resume:{ex['execution_id']}:{occ.start.isoformat()}",
                    job_name=name,
                    run_config={"ops": {"plan_patch": {"config": cfg}}},
                    tags={TRIGGER_TAG: "resume", "stockrx/resumes": ex["execution_id"]},
                )
            )
        if not run_requests:
            return SkipReason(f"{len(paused)} paused execution(s), none to continue now")
        return SensorResult(run_requests=run_requests)

    return paused_patch_resume_sensor


# ---------------------------------------------------------------------------------------------
# Runs that failed outside the patch steps
# ---------------------------------------------------------------------------------------------


def build_failure_sensor(registry: Registry) -> SensorDefinition:
    # Dagster's run_failure_sensor passes its own `owners=None` to a beta parameter: the
    # BetaWarning is about Dagster's code, not ours, and came once per op process.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Parameter `owners`", category=BetaWarning)
        return failure_sensor(registry)


def failure_sensor(registry: Registry) -> SensorDefinition:
    @run_failure_sensor(
        name=FAILURE_SENSOR,
        minimum_interval_seconds=30,
        default_status=sensor_default_status(),
        description="Urgent notification, execution closed and locks released for a patch run "
        "that failed outside its steps (died, marked failed, failed before planning).",
    )
    def patch_run_failure_sensor(
        context: RunFailureSensorContext,
        stockrx_db: StockRxDatabase,
        notifier: Notifier,
        audit_log: AuditLog,
    ) -> None:
        handle_failed_run(context, registry, stockrx_db, notifier, audit_log)

    return patch_run_failure_sensor


def handle_failed_run(
    context: RunFailureSensorContext,
    registry: Registry,
    stockrx_db: StockRxDatabase,
    notifier: Notifier,
    audit_log: AuditLog,
) -> list[str]:
    """Returns the execution ids it closed (empty: the steps had reported the failure)."""
    run = context.dagster_run
    if run.job_name not in registry.patches:
        return []
    event = context.failure_event
    reason = (event.message if event is not None else None) or "the Dagster run failed"
    engine = stockrx_db.get_engine()
    resources = SimpleNamespace(**{NOTIFIER: notifier, AUDIT: audit_log})
    rows: list[dict[str, Any]] = []
    if has_table(engine, executions):
        with engine.connect() as conn:
            rows = [
                dict(r)
                for r in conn.execute(
                    select(executions).where(
                        executions.c.dagster_run_id == run.run_id, executions.c.kind == "patch"
                    )
                ).mappings()
            ]
    if not rows:
        run_config: dict[str, Any] = dict(run.run_config or {})
        ops = run_config.get("ops") or {}
        cfg = (ops.get("plan_patch") or {}).get("config") or {}
        notification = PatchNotification(
            patch_name=run.job_name,
            execution_id="none (the run failed before planning)",
            outcome="failed",
            dry_run=bool(cfg.get("dry_run", True)),
            dagster_run_id=run.run_id,
            reason=reason,
        )
        results = notifier.notify(notification)
        keep(engine, notification, results)  # what did not go out is sent again later
        context.log.info(f"run {run.run_id} failed before planning; notified: {results}")
        return []
    closed = []
    for ex in rows:
        if ex["status"] != "running":
            continue  # the failing step closed it and notified
        why = f"the Dagster run failed outside the patch steps: {reason}"
        finish_execution(engine, ex["execution_id"], "failed", error=why)
        lc = Lifecycle(resources, engine, ex["execution_id"], context.log)
        try:
            lc.audit("failed", {"step": None, "error": why})
        except Exception as exc:  # noqa: BLE001 - still notify
            context.log.error(f"could not write the audit event: {exc}")
        lc.notify("failed", reason=why)
        closed.append(ex["execution_id"])
    return closed


def build_sensors(registry: Registry, jobs: Sequence[JobDefinition]) -> list[SensorDefinition]:
    sensors = [
        build_request_sensor(registry, jobs),
        build_resume_sensor(registry, jobs),
        build_failure_sensor(registry),
    ]
    sensors += [
        build_work_pending_sensor(registry, name)
        for name in sorted(registry.patches)
        if registry.settings(name).scheduled
    ]
    return sensors
