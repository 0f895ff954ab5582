"""The restore and purge jobs, from the op factory of ``patch_ops.ops``.

    restore_patch:          plan_restore ──(real run)──> apply_restore
    purge_expired_backups:  purge_backups
"""

# No `from __future__ import annotations`: Dagster reads the op signatures' annotations.

from typing import Any

from dagster import Config, JobDefinition, Out, Output, job
from pydantic import Field
from sqlalchemy.engine import Connection

from patch_ops.checks import missing_audit_key
from patch_ops.execution import RestoreRefused
from patch_ops.executor import patch_executor
from patch_ops.failpoints import failpoint
from patch_ops.ops import Step, step_op
from patch_ops.steps.purge import PURGE_NAME, purge_backups
from patch_ops.steps.restore import apply_restore, plan_restore


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




def require_audit_key(resources: Any, what: str) -> None:
    """A real restore or purge changes data: like a real patch run, it needs the audit trail."""
    reason = missing_audit_key(resources, what)
    if reason:
        raise RestoreRefused(reason)


def restore_summary(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "restores": report.get("restores"),
        "rows": report.get("restored") or report.get("would_restore"),
        "conflicts": {t: c["count"] for t, c in report.get("conflicts", {}).items()},
        "skipped_sources": report.get("skipped_sources", 0),
    }


def log_line(what: str, execution_id: str, summary: dict[str, Any]) -> str:
    """One event-log line for a restore or purge: the event log shows text; the rendered
    report is the step's ``report`` metadata."""
    parts = ", ".join(f"{k}: {v}" for k, v in summary.items() if v not in (None, {}, []))
    return f"{what} {execution_id}: {parts} (the full report: report in the metadata)"


def build_restore_job() -> JobDefinition:
    @step_op(
        "plan_restore",
        "Check the execution can be restored, lock its tables, report what would be "
        "restored and the conflicts; a dry run ends here.",
        config_class=RestoreConfig,
        out={
            "execution_id": Out(str, is_required=False, description="real run: the restore id"),
            "dry_run_execution_id": Out(
                str, is_required=False, description="dry run: the restore id (nothing to apply)"
            ),
        },
        refused=("restore refused, nothing changed", "restore"),
    )
    def plan_restore_op(step: Step, config: RestoreConfig) -> Output:
        if not config.dry_run:
            require_audit_key(step.context.resources, "restore")
        restore_id = plan_restore(
            step.engine,
            config.execution_id,
            dry_run=config.dry_run,
            skip_conflicts=config.skip_conflicts,
            dagster_run_id=step.context.run_id,
            launched_by=config.launched_by,
            log=step.log,
            run_finished=step.run_finished,
        )
        meta = step.report_metadata(restore_id)
        summary = restore_summary(step.load(restore_id)["report"])
        step.log.info(log_line("restore plan", restore_id, summary))
        lc = step.lifecycle(restore_id)
        lc.audit("restore", {"stage": "planned", **summary})
        if config.dry_run:
            step.log.info(f"dry run {restore_id}: nothing was changed")
            lc.notify("completed")
            return Output(restore_id, "dry_run_execution_id", metadata=meta)
        return Output(restore_id, "execution_id", metadata=meta)

    @step_op(
        "apply_restore",
        "One transaction: put back the before-values, delete the inserted rows, "
        "link the restore to the execution it undoes.",
        refused=("restore failed, nothing changed", "restore"),
    )
    def apply_restore_op(step: Step, execution_id: str) -> None:
        lc = step.lifecycle(execution_id)

        def on_applied(conn: Connection, report: dict[str, Any]) -> None:
            lc.audit("restore", {"stage": "applied", **restore_summary(report)}, conn=conn)
            failpoint("restore:inside")

        apply_restore(
            step.engine, execution_id, log=step.log, run_finished=step.run_finished,
            on_applied=on_applied,
        )
        meta = step.report_metadata(execution_id)
        step.log.info(log_line("restore", execution_id,
                               restore_summary(step.load(execution_id)["report"])))
        step.context.add_output_metadata(meta)
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
    @step_op(
        "purge_backups",
        f"Remove backups older than the retention ({default_retention_days} days by "
        "default); dry run by default.",
        config_class=PurgeConfig,
        refused=("purge failed", "purge"),
    )
    def purge_backups_op(step: Step, config: PurgeConfig) -> None:
        days = (
            config.retention_days if config.retention_days is not None else default_retention_days
        )
        if not config.dry_run:
            require_audit_key(step.context.resources, "purge")
        purge_id = purge_backups(
            step.engine,
            days,
            dry_run=config.dry_run,
            dagster_run_id=step.context.run_id,
            launched_by=config.launched_by,
            log=step.log,
        )
        meta = step.report_metadata(purge_id)
        step.context.add_output_metadata(meta)
        report = step.load(purge_id)["report"]
        step.log.info(log_line("purge", purge_id,
                               {"cutoff": report["cutoff"], "rows": report["rows"]}))
        step.lifecycle(purge_id).audit(
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
