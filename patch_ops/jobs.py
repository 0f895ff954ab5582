"""Builds one Dagster job per patch from the steps, with the op factory of ``patch_ops.ops``.

plan_patch → take_backup → transform_batches → validate_changes ─┬→ commit_changes → verify_commit
                                                                 ├→ report_dry_run
                                                                 └→ roll_back

Ops pass only the execution id; every op re-reads its state from the database, so it runs in
its own process (``patch_ops.executor``) and can be re-executed from failure.
"""

# No `from __future__ import annotations` here: Dagster reads the op signatures' annotations.

from collections.abc import Callable, Collection
from typing import Any

from dagster import Failure, JobDefinition, MetadataValue, Out, Output, job
from sqlalchemy import select
from sqlalchemy.engine import Connection, Engine

from patch_ops.approval import require_approved_plan
from patch_ops.checks import (
    check_maintenance_window,
    hold_anomalous_scheduled_runs,
    refuse_repeats,
    require_audit_key,
)
from patch_ops.database import check_connection, table_exists, write_transaction
from patch_ops.dialects import dialect_of
from patch_ops.execution import (
    UNVERIFIED,
    PlanCheck,
    finish_execution,
    load_execution,
    set_execution,
)
from patch_ops.executor import patch_executor
from patch_ops.failpoints import failpoint
from patch_ops.lifecycle import prepare_audit
from patch_ops.ops import MEMORY, Step, step_op
from patch_ops.patch import Patch, PatchConfigError, PatchSettings
from patch_ops.state import executions, locks, require_tables
from patch_ops.steps import backup, commit, transform, validate, verify
from patch_ops.steps.drift import keep_fingerprint
from patch_ops.steps.locks import release_stale_locks
from patch_ops.steps.plan import plan_execution
from patch_ops.steps.report import log_summary
from patch_ops.steps.restore import restore_rows

#: One run tag per table a patch locks; dagster.yaml limits each to one run in progress, so the
#: run queue holds a second run on an overlapping table (the lock in the StockRx database is the
#: guarantee; this keeps the second run waiting instead of failing). Dagster allows one '/' in a
#: tag key, hence "stockrx-table/<table>".
TABLE_TAG_PREFIX = "stockrx-table/"
#: Run tags set while the run goes: dry run or real (the Runs page filters real runs by it), who
#: launched it, and the transform's progress (rows done / total, ETA), updated every batch.
MODE_TAG = "stockrx/mode"
LAUNCHED_BY_TAG = "stockrx/launched-by"
PROGRESS_TAG = "stockrx/progress"
#: The tag the Dagster UI puts on every run launched from it (its launchpad, re-execution).
FROM_UI_TAG = "dagster/from_ui"
DEFAULT_PLAN_CHECKS: tuple[PlanCheck, ...] = (
    require_audit_key,
    check_maintenance_window,
    require_approved_plan,
    refuse_repeats,
    hold_anomalous_scheduled_runs,
)


def table_tags(patch: Patch) -> dict[str, str]:
    return {f"{TABLE_TAG_PREFIX}{t}": "locked" for t in patch.tables()}


def complete(
    step: Step,
    execution_id: str,
    last_work: Callable[[], Collection[str] | None],
    phase: str,
    audit_event: str,
    message: str,
    keep_work_tables: bool = True,
    reason: str | None = None,
) -> None:
    """The last step of an execution that succeeds: ``last_work`` (it may name the tables whose
    work rows stay as a fingerprint: ``finish_execution``) and the completed state as a step of
    the execution (a failure fails it); then its last audit event and notification (with
    ``reason``, if any)."""
    with step.taking_over(execution_id):
        fingerprint = last_work() or ()
        finish_execution(step.engine, execution_id, "completed",
                         keep_work_tables=keep_work_tables, fingerprint=fingerprint, phase=phase)
    step.lifecycle(execution_id).close(audit_event, {}, "completed", reason)
    step.log.info(message)


def unverified_executions(engine: Engine, patch_name: str) -> list[str]:
    """Executions of the patch whose changes are committed but were never verified."""
    if not table_exists(engine, executions):
        return []
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(executions.c.execution_id)
                .where(
                    executions.c.patch_name == patch_name,
                    executions.c.kind == "patch",
                    executions.c.status == UNVERIFIED,
                )
                .order_by(executions.c.started_at)
            ).scalars()
        )


def verify_and_complete(
    step: Step, patch: Patch, settings: PatchSettings, execution_id: str
) -> None:
    """Post-verification of a committed execution, as a step of it: verified and completed,
    or restored from its backup and failed."""

    def verify_or_restore() -> None:
        problems = verify.verify_execution(
            step.engine,
            patch,
            execution_id,
            timeout_s=settings.query_timeout_seconds,
            connections=settings.check_connections,
        )
        if problems:
            restore_after_failed_verification(step, patch.name, execution_id, problems)

    complete(step, execution_id, verify_or_restore, "verified", "verified",
             f"execution {execution_id} committed and verified")


def restore_after_failed_verification(
    step: Step, patch_name: str, execution_id: str, problems: list[str]
) -> None:
    """Post-verification failed: put the backup back (rows the application changed since are
    left and reported), close the execution as rolled back, and fail the step."""
    engine = step.engine
    with write_transaction(engine) as conn:
        restored = restore_rows(conn, engine, execution_id, skip_conflicts=True, apply=True)
    reason = "post-verification failed: " + "; ".join(problems)
    finish_execution(
        engine, execution_id, "failed", error=reason, rollback_performed=True, phase="restored"
    )
    step.lifecycle(execution_id).close(
        "rollback",
        {"reason": reason, "restored": restored.updated, "deleted": restored.deleted,
         "conflicts_left": restored.conflicts},
        "rolled_back", reason,
    )
    left = {"updated": restored.updated, "deleted": restored.deleted,
            "conflicts_left": restored.conflicts}
    raise Failure(
        description=f"{patch_name}: verification failed, restored from backup",
        metadata={
            "execution_id": execution_id,
            "problems": MetadataValue.json(problems),
            "restored": MetadataValue.json(left),
        },
    )


def build_patch_job(
    patch: Patch, settings: PatchSettings, plan_checks: tuple[PlanCheck, ...] = DEFAULT_PLAN_CHECKS
) -> JobDefinition:
    def op_name(step: str) -> str:
        # Op definition names must be unique in a code location: "<patch>__<step>".
        return f"{patch.name}__{step}"

    def moving_step(step: str, description: str, **options: Any) -> Callable[..., Any]:
        """A step that moves the execution forward and hands its id on."""
        return step_op(op_name(step), description, out=Out(str), take_over=True, **options)

    @step_op(
        op_name("plan_patch"),
        "Validate config, lock the tables, freeze the target set, open the execution.",
        config_class=patch.config_class,
        out=Out(str, description="execution id"),
        refused=(f"{patch.name} refused before any write", "failed"),
    )
    def plan_patch(step: Step, config: Any) -> str:
        context = step.context
        if (context.run.tags.get(FROM_UI_TAG) == "true" and not config.dry_run
                and not (config.launched_by or "").strip()):
            # The UI cannot tell who clicked (its runs would say the daemon's user).
            raise PatchConfigError(
                "a real run launched from the Dagster UI must say who launched it: set "
                "launched_by (your name) in the launchpad's run config"
            )
        check_connection(step.engine)
        require_tables(step.engine, patch.tables())
        prepare_audit(context.resources, step.engine)
        if table_exists(step.engine, locks):
            with write_transaction(step.engine) as conn:
                release_stale_locks(conn, patch.tables(), f"a new run of {patch.name} "
                                    f"(Dagster run {context.run_id})", step.run_finished, step.log)
        for unverified in unverified_executions(step.engine, patch.name):
            step.log.warning(
                f"execution {unverified} of {patch.name} committed its changes but was never "
                "verified (its run stopped after the commit): verifying it before planning"
            )
            verify_and_complete(step, patch, settings, unverified)
        execution_id = plan_execution(
            step.engine,
            patch,
            settings,
            config,
            dagster_run_id=context.run_id,
            root_run_id=context.run.root_run_id or context.run_id,
            log=step.log,
            checks=plan_checks,
            resources=context.resources,
            run_finished=step.run_finished,
        )
        lc = step.lifecycle(execution_id)
        ex = step.load(execution_id)
        lc.know(ex)
        step.set_tags({MODE_TAG: "dry run" if ex["dry_run"] else "real",
                       LAUNCHED_BY_TAG: str(ex["launched_by"])[:255]})
        lc.audit("started", {"launched_by": ex["launched_by"]}, {"config": ex["config"]})
        lc.audit("plan", {"targets": (ex["report"] or {}).get("targets", {}),
                          "estimated_seconds": ex["estimated_seconds"]})
        if lc.audit_log is None or not lc.audit_log.active:
            step.log.warning("audit trail is off for this run (no key, or log_encryption off)")
        context.add_output_metadata({"execution_id": execution_id, "database": step.db.safe_url})
        return execution_id

    @moving_step(
        "take_backup", "Copy the before-image of every targeted row (all columns), set-based."
    )
    def take_backup(step: Step, execution_id: str) -> str:
        counts = backup.take_backup(step.engine, execution_id, log=step.log)
        step.lifecycle(execution_id).audit("backup_taken", {"rows": counts})
        step.context.add_output_metadata({f"backup_{t}": n for t, n in counts.items()})
        return execution_id

    @moving_step(
        "transform_batches",
        "Keyset batches over the frozen set: transform, validate, stage; resumable.",
        required=(MEMORY,),
    )
    def transform_batches(step: Step, execution_id: str) -> str:
        def on_progress(done: int, total: int, eta: float) -> None:
            left = "" if done >= total or eta != eta else f", ETA {eta:,.0f} s"  # nan: unknown
            step.set_tags({PROGRESS_TAG: f"{done:,}/{total:,} rows ({done / max(total, 1):.0%})"
                                         f"{left}"})

        counts = transform.run_transform(
            step.engine, patch, execution_id, step.memory, log=step.log, on_progress=on_progress,
            batch_seconds=settings.batch_seconds, connections=settings.check_connections,
        )
        if counts.get("paused"):
            step.lifecycle(execution_id).audit(
                "paused", {"reason": "maintenance window ended", "processed": counts["processed"]}
            )
            step.set_tags({"stockrx/paused": "window-end"})
        step.context.add_output_metadata(counts)
        return execution_id

    @step_op(
        op_name("validate_changes"),
        "Whole-set invariants and failure ratio on the would-be result; impact report.",
        out={
            "passed_real": Out(str, is_required=False, description="validated, real run"),
            "passed_dry": Out(str, is_required=False, description="validated, dry run"),
            "failed": Out(str, is_required=False, description="validation failed"),
        },
    )
    def validate_changes(step: Step, execution_id: str) -> Output | None:
        if step.load(execution_id)["status"] == "paused":
            # Stopped at the end of its maintenance window: no output, so commit/report/rollback
            # are skipped and the run succeeds; a later run continues the execution.
            step.log.info(f"execution {execution_id} is paused: validation waits for the rest")
            return None
        with step.taking_over(execution_id):
            passed, report = validate.validate_execution(
                step.engine, patch, settings, execution_id, log=step.log
            )
            failpoint("validate:inside")
            ex = step.load(execution_id)
            validation = report.get("validation", {})
            step.lifecycle(execution_id).audit(
                "validation",
                {"passed": passed, "problems": validation.get("problems", []),
                 "rows_changed": int(ex["staged_updates"]),
                 "rows_rejected": int(ex["failed_records"])},
                {"report": report},
            )
        markdown = ex["report_markdown"]
        step.log.info(log_summary(ex))
        metadata: dict[str, Any] = {
            "impact_report": MetadataValue.md(markdown),
            "rows_selected": int(ex["target_count"]),
            "rows_changed": int(ex["staged_updates"]),
            "rows_rejected": int(ex["failed_records"]),
            "execution_id": execution_id,
        }
        branch = "failed" if not passed else "passed_dry" if ex["dry_run"] else "passed_real"
        return Output(execution_id, branch, metadata=metadata)

    @moving_step(
        "commit_changes",
        "One transaction: refuse on conflicts with the backup, apply staged changes.",
    )
    def commit_changes(step: Step, execution_id: str) -> str:
        lc = step.lifecycle(execution_id)
        # The commit unit: the data, the execution's committed state and its audit event in
        # one transaction.
        def on_committed(conn: Connection, rows: dict[str, int]) -> None:
            before = dialect_of(conn).log_position(conn)
            set_execution(conn, execution_id, commit_position={"before": before})
            lc.audit("commit", {"rows": rows, "log_position_before": before}, conn=conn)
            failpoint("commit:inside")

        counts = commit.commit_execution(
            step.engine, execution_id, log=step.log, on_committed=on_committed
        )
        failpoint("commit:after")
        with write_transaction(step.engine) as conn:
            position = {**(load_execution(conn, execution_id)["commit_position"] or {}),
                        "after": dialect_of(conn).log_position(conn)}
            set_execution(conn, execution_id, commit_position=position)
        if position["after"]:
            step.log.info(f"committed between log positions {position['before']} and "
                          f"{position['after']} (point-in-time recovery: README, after a crash)")
        step.context.add_output_metadata(counts)
        return execution_id

    @step_op(
        op_name("verify_commit"), "Check live data after commit; on failure restore from backup."
    )
    def verify_commit(step: Step, execution_id: str) -> None:
        verify_and_complete(step, patch, settings, execution_id)

    @step_op(
        op_name("report_dry_run"),
        "Close a dry run: nothing was committed; the report says what would change.",
    )
    def report_dry_run(step: Step, execution_id: str) -> None:
        held = (step.load(execution_id)["report"] or {}).get("held_for_approval")
        if held:
            step.log.warning(held["reason"])
        complete(step, execution_id,
                 lambda: keep_fingerprint(step.engine, patch, settings, execution_id),
                 "dry_run_reported", "dry_run_completed",
                 f"dry run {execution_id} complete: nothing was committed", keep_work_tables=False,
                 reason=held["reason"] if held else None)

    @step_op(
        op_name("roll_back"),
        "Validation failed: discard staging (nothing reached live tables), fail.",
    )
    def roll_back(step: Step, execution_id: str) -> None:
        ex = step.load(execution_id)
        problems = (ex["report"] or {}).get("validation", {}).get("problems", [])
        reason = "validation failed: " + "; ".join(problems)
        finish_execution(
            step.engine, execution_id, "failed", error=reason, keep_work_tables=False,
            phase="rolled_back",
        )
        step.lifecycle(execution_id).close("rollback", {"reason": reason}, "rolled_back", reason)
        raise Failure(
            description=f"{patch.name}: {reason}"[:500],
            metadata={
                "execution_id": execution_id,
                "impact_report": MetadataValue.md(ex["report_markdown"] or ""),
                "problems": MetadataValue.json(problems),
            },
        )

    tables = ",".join(patch.written_tables())

    @job(
        name=patch.name,
        description=settings.description,
        executor_def=patch_executor,
        tags={"stockrx/patch": patch.name, "stockrx/tables": tables, **table_tags(patch)},
    )
    def patch_job() -> None:
        # The aliases keep node names (run config keys, step keys) the same in every patch
        # job: ops.plan_patch.config, step "validate_changes", ...
        execution_id = transform_batches.alias("transform_batches")(
            take_backup.alias("take_backup")(plan_patch.alias("plan_patch")())
        )
        passed_real, passed_dry, failed = validate_changes.alias("validate_changes")(execution_id)
        verify_commit.alias("verify_commit")(commit_changes.alias("commit_changes")(passed_real))
        report_dry_run.alias("report_dry_run")(passed_dry)
        roll_back.alias("roll_back")(failed)

    return patch_job
