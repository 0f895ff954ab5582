"""Builds one Dagster job per patch from the generic steps in ``patch_ops.engine``.

plan_patch → take_backup → transform_batches → validate_changes ─┬→ commit_changes → verify_commit
                                                                 ├→ report_dry_run
                                                                 └→ roll_back

Ops pass only the execution id; every op re-reads its state from the database, so it runs in
its own process (the multiprocess executor) and can be re-executed from failure.

Executor: by default every op still gets its own process, but forked from a fork server that has
already imported Dagster, pandas, pandera, SQLAlchemy, the code location and the Dagster
instance's modules (``start_method: forkserver``, PRELOAD_MODULES), instead of a fresh
interpreter per op (``spawn``, Dagster's default), which costs ~5 s of CPU per op before it
does any work. A run can still choose, in its run config,
``execution: {config: {in_process: {}}}`` or ``{multiprocess: {start_method: {spawn: {}}}}``.
"""

# No `from __future__ import annotations` here: Dagster reads the op signatures' annotations
# (the config class of each patch is chosen at runtime).

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from dagster import (
    DagsterInstance,
    Executor,
    ExecutorDefinition,
    Failure,
    In,
    InitExecutorContext,
    JobDefinition,
    MetadataValue,
    OpExecutionContext,
    Out,
    Output,
    job,
    multi_or_in_process_executor,
    op,
)

from patch_ops import engine as eng
from patch_ops.approval import require_approved_plan
from patch_ops.lifecycle import AUDIT, NOTIFIER, Lifecycle, require_audit_key
from patch_ops.patch import Patch, PatchSettings
from patch_ops.windows import check_maintenance_window
from patch_ops.database import DatabaseUnavailable, write_transaction
from resources.database import StockRxDatabase
from resources.memory import MemoryGuard, MemoryLimitExceeded

DB = "stockrx_db"
MEMORY = "memory_guard"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


@contextlib.contextmanager
def patch_step(
    context: OpExecutionContext, db: StockRxDatabase, execution_id: str
) -> Iterator[None]:
    """Run one step of an execution: take over the execution for this run, record failures."""
    engine = db.get_engine()
    try:
        with write_transaction(engine) as conn:
            ex = eng.load_execution(conn, execution_id)
            if ex["status"] != "running" or ex["dagster_run_id"] != context.run_id:
                # Re-execution of a failed run: the execution continues under the new run id.
                eng.set_execution(
                    conn,
                    execution_id,
                    status="running",
                    dagster_run_id=context.run_id,
                    completed_at=None,
                    error_message=None,
                )
            eng.acquire_locks(
                conn,
                ex["declaration"]["tables"],
                execution_id,
                context.run_id,
                run_finished(context.instance),
                context.log,
            )
        yield
    except Failure:
        raise
    except (eng.PatchError, MemoryLimitExceeded, DatabaseUnavailable, ValueError) as exc:
        eng.finish_execution(engine, execution_id, "failed", error=eng._describe(exc))
        _failed(context, engine, execution_id, exc)
        details = getattr(exc, "details", {}) or {}
        raise Failure(
            description=_one_line(exc),
            metadata={
                "execution_id": execution_id,
                "error": MetadataValue.text(str(exc)),
                **{k: MetadataValue.json(v) for k, v in details.items()},
            },
        ) from exc
    except Exception as exc:
        eng.finish_execution(engine, execution_id, "failed", error=eng._describe(exc))
        _failed(context, engine, execution_id, exc)
        raise


def _failed(context: OpExecutionContext, engine, execution_id: str, exc: BaseException) -> None:  # type: ignore[no-untyped-def]
    lc = Lifecycle(context.resources, engine, execution_id, context.log)
    try:
        lc.audit("failed", {"step": context.op.name, "error": eng._describe(exc)})
    except Exception as audit_exc:  # noqa: BLE001 - report the original failure, not this one
        context.log.error(f"could not write the audit event: {audit_exc}")
    lc.notify("failed", reason=eng._describe(exc))


#: One run tag per table a patch locks; dagster.yaml limits each to one run in progress, so the
#: run queue holds a second run on an overlapping table (the lock in the StockRx database is the
#: guarantee; this keeps the second run waiting instead of failing). Dagster allows one '/' in a
#: tag key, hence "stockrx-table/<table>".
TABLE_TAG_PREFIX = "stockrx-table/"


def table_tags(patch: Patch) -> dict[str, str]:
    return {f"{TABLE_TAG_PREFIX}{t}": "locked" for t in patch.tables()}


def run_finished(instance: DagsterInstance) -> eng.RunFinished:
    """For stale lock detection: the status of a finished Dagster run of this instance."""

    def status(run_id: str) -> str | None:
        run = instance.get_run_by_id(run_id)
        return run.status.value if run is not None and run.is_finished else None

    return status


#: What the fork server imports before forking op processes: the framework (which brings
#: Dagster, pandas, pandera, SQLAlchemy), the database drivers, and Dagster's command line
#: (every op process re-runs the parent's main script, ``dagster``, which imports it: 0.45 s of
#: each op's start otherwise); the code location's own module is added per run.
PRELOAD_MODULES = ("patch_ops.jobs", "patch_ops.restore", "psycopg", "psycopg2", "dagster._cli")


#: The environment this process had when its fork server was first chosen (None: not yet).
_forkserver_environ: frozenset[tuple[str, str]] | None = None


def instance_modules(instance: DagsterInstance) -> list[str]:
    """The modules of the Dagster instance's parts (run, event log and schedule storage, compute
    log manager, run coordinator...), as dagster.yaml names them. Every op process first builds
    the instance from its ref, and importing these there took ~0.5 s of each op's start (the
    SQLite storages bring alembic, mako, rich, pygments, watchdog)."""
    if instance.is_ephemeral:  # it has no ref: it cannot run ops in other processes anyway
        return []
    ref = instance.get_ref()
    names = (getattr(part, "module_name", None) for part in ref)  # ConfigurableClassData
    return list(dict.fromkeys(n for n in names if isinstance(n, str)))


def _default_start_method(init_context: InitExecutorContext) -> dict[str, Any]:
    """forkserver, unless this process's fork server was started under another environment.

    A fork server lives as long as the process that started it, and every op process forked
    from it gets *its* environment (STOCKRX_DATABASE_URL, secrets), not the caller's current one.
    A run worker (``dagster job execute``, the daemon's runs) runs one job and exits, so this only
    matters in a long-lived process that executes several runs (``execute_job`` in a script or a
    test): there, once the environment has changed, op processes are spawned afresh.
    """
    global _forkserver_environ
    environ = frozenset(os.environ.items())
    if _forkserver_environ is None:
        _forkserver_environ = environ
    elif _forkserver_environ != environ:
        return {"spawn": {}}
    preload = [*PRELOAD_MODULES, *instance_modules(init_context.instance)]
    pointer = init_context.job.get_python_origin().get_repo_pointer()  # type: ignore[attr-defined]
    if getattr(pointer, "module", None):  # -m stockrx_patches.definitions, workspace.yaml
        preload.append(pointer.module)
    return {"forkserver": {"preload_modules": preload}}


def _forkserver_by_default(init_context: InitExecutorContext) -> Executor:
    config = dict(init_context.executor_config)
    multiprocess = config.get("multiprocess")
    if isinstance(multiprocess, dict) and not multiprocess.get("start_method"):
        start = _default_start_method(init_context)
        config = {"multiprocess": {**multiprocess, "start_method": start}}
    create = multi_or_in_process_executor.executor_creation_fn
    assert create is not None
    return create(init_context._replace(executor_config=config))


#: Dagster's default executor (same run config: ``multiprocess`` or ``in_process``), except that
#: op processes start with ``forkserver`` (preloading PRELOAD_MODULES and the code location's
#: module) unless the run config names a start method.
patch_executor = ExecutorDefinition(
    name="multi_or_in_process_executor",
    config_schema=multi_or_in_process_executor.config_schema,  # type: ignore[arg-type]
    executor_creation_fn=_forkserver_by_default,
    requirements=multi_or_in_process_executor.get_requirements,
    description="One process per op, forked from a preloaded fork server (or in_process).",
)


def build_patch_job(
    patch: Patch,
    settings: PatchSettings,
    plan_checks: tuple[eng.PlanCheck, ...] = (
        require_audit_key,
        check_maintenance_window,
        require_approved_plan,
    ),
) -> JobDefinition:
    config_class = patch.config_class
    tables = ",".join(settings.target_tables)

    @op(
        name=f"{patch.name}__plan_patch",
        description="Validate config, lock the tables, freeze the target set, open the execution.",
        required_resource_keys={DB, AUDIT, NOTIFIER},
        out=Out(str, description="execution id"),
    )
    def plan_patch(context: OpExecutionContext, config: config_class) -> str:  # type: ignore[valid-type]
        db: StockRxDatabase = getattr(context.resources, DB)
        engine = None
        try:
            engine = db.get_engine()
            execution_id = eng.plan_execution(
                engine,
                patch,
                settings,
                config,
                dagster_run_id=context.run_id,
                root_run_id=context.run.root_run_id or context.run_id,
                log=context.log,
                checks=plan_checks,
                resources=context.resources,
                run_finished=run_finished(context.instance),
            )
        except (eng.PatchError, DatabaseUnavailable, LookupError, ValueError) as exc:
            failed_id = getattr(exc, "execution_id", None)
            if failed_id and engine is not None:
                _failed(context, engine, failed_id, exc)
            raise Failure(
                description=f"{patch.name} refused before any write: {_one_line(exc)}",
                metadata={"error": MetadataValue.text(str(exc)), "database": db.safe_url},
            ) from exc
        lc = Lifecycle(context.resources, engine, execution_id, context.log)
        with engine.connect() as conn:
            ex = eng.load_execution(conn, execution_id)
        lc.audit("started", {"launched_by": ex["launched_by"]}, {"config": ex["config"]})
        lc.audit("plan", {"targets": (ex["report"] or {}).get("targets", {}),
                          "estimated_seconds": ex["estimated_seconds"]})
        audit = getattr(context.resources, AUDIT, None)
        if audit is None or not audit.active:
            context.log.warning("audit trail is off for this run (no key, or log_encryption off)")
        context.add_output_metadata({"execution_id": execution_id, "database": db.safe_url})
        return execution_id

    @op(
        name=f"{patch.name}__take_backup",
        description="Copy the before-image of every targeted row (all columns), set-based.",
        required_resource_keys={DB, AUDIT, NOTIFIER},
        ins={"execution_id": In(str)},
        out=Out(str),
    )
    def take_backup(context: OpExecutionContext, execution_id: str) -> str:
        db: StockRxDatabase = getattr(context.resources, DB)
        with patch_step(context, db, execution_id):
            counts = eng.take_backup(db.get_engine(), execution_id, log=context.log)
            Lifecycle(context.resources, db.get_engine(), execution_id).audit(
                "backup_taken", {"rows": counts}
            )
        context.add_output_metadata({f"backup_{t}": n for t, n in counts.items()})
        return execution_id

    @op(
        name=f"{patch.name}__transform_batches",
        description="Keyset batches over the frozen set: transform, validate, stage; resumable.",
        required_resource_keys={DB, MEMORY, AUDIT, NOTIFIER},
        ins={"execution_id": In(str)},
        out=Out(str),
    )
    def transform_batches(context: OpExecutionContext, execution_id: str) -> str:
        db: StockRxDatabase = getattr(context.resources, DB)
        memory: MemoryGuard = getattr(context.resources, MEMORY)
        with patch_step(context, db, execution_id):
            counts = eng.run_transform(db.get_engine(), patch, execution_id, memory, log=context.log)
        if counts.get("paused"):
            Lifecycle(context.resources, db.get_engine(), execution_id, context.log).audit(
                "paused", {"reason": "maintenance window ended", "processed": counts["processed"]}
            )
            context.instance.add_run_tags(context.run_id, {"stockrx/paused": "window-end"})
        context.add_output_metadata(counts)
        return execution_id

    @op(
        name=f"{patch.name}__validate_changes",
        description="Whole-set invariants and failure ratio on the would-be result; impact report.",
        required_resource_keys={DB, AUDIT, NOTIFIER},
        ins={"execution_id": In(str)},
        out={
            "passed_real": Out(str, is_required=False, description="validated, real run"),
            "passed_dry": Out(str, is_required=False, description="validated, dry run"),
            "failed": Out(str, is_required=False, description="validation failed"),
        },
    )
    def validate_changes(context: OpExecutionContext, execution_id: str):  # type: ignore[no-untyped-def]
        db: StockRxDatabase = getattr(context.resources, DB)
        engine = db.get_engine()
        with engine.connect() as conn:
            ex = eng.load_execution(conn, execution_id)
        if ex["status"] == "paused":
            # Stopped at the end of its maintenance window: no output, so commit/report/rollback
            # are skipped and the run succeeds; a later run continues the execution.
            context.log.info(f"execution {execution_id} is paused: validation waits for the rest")
            return
        with patch_step(context, db, execution_id):
            passed, report = eng.validate_execution(
                engine, patch, settings, execution_id, log=context.log
            )
            with engine.connect() as conn:
                ex = eng.load_execution(conn, execution_id)
            validation = report.get("validation", {})
            Lifecycle(context.resources, engine, execution_id).audit(
                "validation",
                {"passed": passed, "problems": validation.get("problems", []),
                 "rows_changed": int(ex["staged_updates"]), "rows_rejected": int(ex["failed_records"])},
                {"report": report},
            )
        markdown = ex["report_markdown"]
        context.log.info("\n" + markdown)
        metadata: dict[str, Any] = {
            "impact_report": MetadataValue.md(markdown),
            "rows_selected": int(ex["target_count"]),
            "rows_changed": int(ex["staged_updates"]),
            "rows_rejected": int(ex["failed_records"]),
            "execution_id": execution_id,
        }
        if not passed:
            yield Output(execution_id, "failed", metadata=metadata)
        elif ex["dry_run"]:
            yield Output(execution_id, "passed_dry", metadata=metadata)
        else:
            yield Output(execution_id, "passed_real", metadata=metadata)

    @op(
        name=f"{patch.name}__commit_changes",
        description="One transaction: refuse on conflicts with the backup, apply staged changes.",
        required_resource_keys={DB, AUDIT, NOTIFIER},
        ins={"execution_id": In(str)},
        out=Out(str),
    )
    def commit_changes(context: OpExecutionContext, execution_id: str) -> str:
        db: StockRxDatabase = getattr(context.resources, DB)
        with patch_step(context, db, execution_id):
            counts = eng.commit_execution(db.get_engine(), patch.name, execution_id, log=context.log)
            Lifecycle(context.resources, db.get_engine(), execution_id).audit("commit", {"rows": counts})
        context.add_output_metadata(counts)
        return execution_id

    @op(
        name=f"{patch.name}__verify_commit",
        description="Check live data after commit; on failure restore from backup.",
        required_resource_keys={DB, AUDIT, NOTIFIER},
        ins={"execution_id": In(str)},
    )
    def verify_commit(context: OpExecutionContext, execution_id: str) -> None:
        db: StockRxDatabase = getattr(context.resources, DB)
        engine = db.get_engine()
        with patch_step(context, db, execution_id):
            problems = eng.verify_execution(
                engine,
                patch,
                execution_id,
                timeout_s=settings.query_timeout_seconds,
                connections=settings.check_connections,
            )
            if problems:
                with write_transaction(engine) as conn:
                    restored = eng.restore_rows(
                        conn, engine, execution_id, skip_conflicts=True, apply=True
                    )
                reason = "post-verification failed: " + "; ".join(problems)
                eng.finish_execution(
                    engine, execution_id, "failed", error=reason, rollback_performed=True,
                    phase="restored",
                )
                Lifecycle(context.resources, engine, execution_id, context.log).close(
                    "rollback",
                    {"reason": reason, "restored": restored.updated, "deleted": restored.deleted,
                     "conflicts_left": restored.conflicts},
                    "rolled_back", reason,
                )
                raise Failure(
                    description=f"{patch.name}: verification failed, restored from backup",
                    metadata={
                        "execution_id": execution_id,
                        "problems": MetadataValue.json(problems),
                        "restored": MetadataValue.json(
                            {"updated": restored.updated, "deleted": restored.deleted,
                             "conflicts_left": restored.conflicts}
                        ),
                    },
                )
            eng.finish_execution(engine, execution_id, "completed", phase="verified")
        Lifecycle(context.resources, engine, execution_id, context.log).close(
            "verified", {}, "completed"
        )
        context.log.info(f"execution {execution_id} committed and verified")

    @op(
        name=f"{patch.name}__report_dry_run",
        description="Close a dry run: nothing was committed; the report says what would change.",
        required_resource_keys={DB, AUDIT, NOTIFIER},
        ins={"execution_id": In(str)},
    )
    def report_dry_run(context: OpExecutionContext, execution_id: str) -> None:
        db: StockRxDatabase = getattr(context.resources, DB)
        with patch_step(context, db, execution_id):
            eng.finish_execution(
                db.get_engine(), execution_id, "completed", keep_work_tables=False,
                phase="dry_run_reported",
            )
        Lifecycle(context.resources, db.get_engine(), execution_id, context.log).close(
            "dry_run_completed", {}, "completed"
        )
        context.log.info(f"dry run {execution_id} complete: nothing was committed")

    @op(
        name=f"{patch.name}__roll_back",
        description="Validation failed: discard staging (nothing reached live tables), fail.",
        required_resource_keys={DB, AUDIT, NOTIFIER},
        ins={"execution_id": In(str)},
    )
    def roll_back(context: OpExecutionContext, execution_id: str) -> None:
        db: StockRxDatabase = getattr(context.resources, DB)
        engine = db.get_engine()
        with engine.connect() as conn:
            ex = eng.load_execution(conn, execution_id)
        problems = (ex["report"] or {}).get("validation", {}).get("problems", [])
        reason = "validation failed: " + "; ".join(problems)
        eng.finish_execution(
            engine, execution_id, "failed", error=reason, keep_work_tables=False,
            phase="rolled_back",
        )
        Lifecycle(context.resources, engine, execution_id, context.log).close(
            "rollback", {"reason": reason}, "rolled_back", reason
        )
        raise Failure(
            description=f"{patch.name}: {reason}"[:500],
            metadata={
                "execution_id": execution_id,
                "impact_report": MetadataValue.md(ex["report_markdown"] or ""),
                "problems": MetadataValue.json(problems),
            },
        )

    @job(
        name=patch.name,
        description=settings.description,
        executor_def=patch_executor,
        tags={"stockrx/patch": patch.name, "stockrx/tables": tables, **table_tags(patch)},
    )
    def patch_job() -> None:
        # Op definition names must be unique in a code location, so each patch's ops are named
        # "<patch>__<step>"; the aliases keep node names (run config keys, step keys) the same
        # in every patch job: ops.plan_patch.config, step "validate_changes", ...
        execution_id = transform_batches.alias("transform_batches")(
            take_backup.alias("take_backup")(plan_patch.alias("plan_patch")())
        )
        passed_real, passed_dry, failed = validate_changes.alias("validate_changes")(execution_id)
        verify_commit.alias("verify_commit")(commit_changes.alias("commit_changes")(passed_real))
        report_dry_run.alias("report_dry_run")(passed_dry)
        roll_back.alias("roll_back")(failed)

    return patch_job
