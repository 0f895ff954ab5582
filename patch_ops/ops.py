"""One op factory for every job (patches, restore, purge): resources, execution take-over, table
locks, the mapping of errors to Dagster ``Failure``, and the audit + notification of a failure.

An op body is a plain function of a :class:`Step` (the op's context, database engine and
lifecycle) and its input (the execution id, or the op's config for the first op of a job). The
factory wraps it:

- ``take_over=True`` (every patch step after plan): the execution continues under this run (a
  re-executed run takes it over), its table locks are held by this process, and a failure closes
  the execution as failed, audits and notifies it, and fails the step with a one-line reason.
- a stop request (Ctrl-C, SIGTERM, Terminate in the UI; ``patch_ops.stopping``) in any op closes
  the executions its run has open as cancelled (or unverified, had the commit committed), with
  who, why and the progress, releases their locks at once, audits it and sends an ordinary
  message; the step then ends interrupted, as Dagster expects.
- ``refused=(what, audit_event)`` (ops that open or check an execution: plan, restore, purge): a
  refusal fails the op with "what: reason"; if an execution was opened, it is audited under
  ``audit_event`` and notified.
"""

# No `from __future__ import annotations` here: Dagster reads the op signatures' annotations
# (the config class of each op is chosen at runtime).

import contextlib
import datetime as dt
import functools
from collections.abc import Callable, Iterator
from typing import Any

from dagster import (
    DagsterExecutionInterruptedError,
    DagsterInstance,
    DagsterRunStatus,
    Failure,
    In,
    MetadataValue,
    OpDefinition,
    OpExecutionContext,
    Out,
    op,
)
from sqlalchemy.engine import Engine

from patch_ops.audit import audit_head
from patch_ops.audit.anchors import ANCHOR_TAG, append_to_file, current_head
from patch_ops.database import (
    DatabaseUnavailable,
    catalog_scope,
    table_exists,
    write_transaction,
)
from patch_ops.dialects import MissingPrivilege
from patch_ops.execution import (
    PatchError,
    RunFinished,
    default_user,
    describe,
    finish_execution,
    load_execution,
    running_executions,
    set_execution,
    stop_execution,
)
from patch_ops.failpoints import failpoint
from patch_ops.lifecycle import AUDIT, NOTIFIER, Lifecycle
from patch_ops.state import executions
from patch_ops.steps.locks import acquire_locks
from patch_ops.stopping import StopRequest, stoppable
from resources.database import StockRxDatabase
from resources.memory import MemoryGuard, MemoryLimitExceeded

DB = "stockrx_db"
MEMORY = "memory_guard"
#: Errors of a step that fail it with their own one-line message (anything else: a traceback).
STEP_ERRORS = (PatchError, MemoryLimitExceeded, DatabaseUnavailable, MissingPrivilege, ValueError)
#: Errors of an op that opens or checks an execution: a refusal, before any write.
REFUSALS = (PatchError, DatabaseUnavailable, MissingPrivilege, LookupError, ValueError)
#: What a stop request raises in a step (patch_ops.stopping; Dagster's own error, should its
#: handler fire before ours is in place).
STOPS = (KeyboardInterrupt, DagsterExecutionInterruptedError)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def run_finished(instance: DagsterInstance) -> RunFinished:
    """For stale lock detection: the status of a finished Dagster run of this instance."""

    def status(run_id: str) -> str | None:
        run = instance.get_run_by_id(run_id)
        return run.status.value if run is not None and run.is_finished else None

    return status


class Step:
    """What an op body works with: its Dagster context, the StockRx database, the lifecycle."""

    def __init__(self, context: OpExecutionContext):
        self.context = context
        self.log = context.log
        self.db: StockRxDatabase = getattr(context.resources, DB)
        self._lifecycles: dict[str, Lifecycle] = {}

    @functools.cached_property
    def engine(self) -> Engine:
        return self.db.get_engine()

    @property
    def memory(self) -> MemoryGuard:
        return getattr(self.context.resources, MEMORY)  # type: ignore[no-any-return]

    @property
    def run_finished(self) -> RunFinished:
        return run_finished(self.context.instance)

    def anchor_audit(self) -> None:
        """Copy the audit head outside the StockRx database (patch_ops.audit.anchors): a tag of
        this Dagster run and a line of the anchor file. Never raises: an op's own error is what
        the operator needs to see; a missed anchor is made by the next op."""
        try:
            audit = getattr(self.context.resources, AUDIT, None)
            if audit is None or not audit.active or not table_exists(self.engine, audit_head):
                return
            head = current_head(self.engine)
            if head is not None and head.seq > 0:
                self.set_tags({ANCHOR_TAG: head.tag_value})
                append_to_file(head)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            self.log.warning(f"could not anchor the audit head: {exc}")

    def set_tags(self, tags: dict[str, str]) -> None:
        """Add or update tags of this Dagster run (the Runs page filters and shows them)."""
        self.context.instance.add_run_tags(self.context.run_id, tags)

    def lifecycle(self, execution_id: str) -> Lifecycle:
        """The execution's lifecycle, one per op (it reads the execution's header once)."""
        lc = self._lifecycles.get(execution_id)
        if lc is None:
            lc = Lifecycle(self.context.resources, self.engine, execution_id, self.log)
            self._lifecycles[execution_id] = lc
        return lc

    def load(self, execution_id: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            return load_execution(conn, execution_id)

    def report_metadata(self, execution_id: str) -> dict[str, Any]:
        """The execution's id and Markdown report, for the op's metadata."""
        report = self.load(execution_id)["report_markdown"] or ""
        return {"execution_id": execution_id, "report": MetadataValue.md(report)}

    def record_failure(self, execution_id: str, exc: BaseException, audit_event: str) -> None:
        """Audit and notify the failure of an execution; a failing audit is logged, not raised
        (the original failure is what the operator needs to see)."""
        reason = describe(exc)
        if audit_event == "failed":
            public = {"step": self.context.op.name, "error": reason}
        else:
            public = {"stage": "refused", "error": reason}
        lc = self.lifecycle(execution_id)
        try:
            lc.audit(audit_event, public)
        except Exception as audit_exc:  # noqa: BLE001 - report the original failure, not this one
            self.log.error(f"could not write the audit event: {audit_exc}")
        lc.notify("failed", reason=reason)

    def who_and_why(self, stop: StopRequest) -> tuple[str, str]:
        """Who stopped the run and why: a terminate request through Dagster (the run is
        CANCELING: the UI's Terminate, GraphQL terminateRun) or a signal to the run's processes
        (Ctrl-C, kill), which only the OS user the run runs as (or root) can send."""
        run = self.context.instance.get_run_by_id(self.context.run_id)
        if run is not None and run.status in (DagsterRunStatus.CANCELING,
                                              DagsterRunStatus.CANCELED):
            return ("a Dagster UI/API user (Dagster records no name for a terminate request)",
                    "terminated from the UI (Dagster run termination request)")
        return (f"OS user {default_user()} (the run's user)",
                f"stopped by {stop.signal or 'SIGINT'}")

    def record_stop(self, stop: StopRequest) -> list[str]:
        """A stop request reached this op: close every execution its run has open (patch_ops.
        execution.stop_execution: cancelled, or unverified after a commit; locks released), audit
        it and send the message. Returns the executions closed; never raises (the stop goes on
        whatever happens here)."""
        closed: list[str] = []
        try:
            if not table_exists(self.engine, executions):
                return closed
            by, reason = self.who_and_why(stop)
            at = f"{stop.at or dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S}"
            info = {"by": by, "reason": reason, "step": self.context.op.name, "at": at,
                    "signal": stop.signal, "dagster_run_id": self.context.run_id}
            for execution_id in running_executions(self.engine, self.context.run_id):
                ex = stop_execution(self.engine, execution_id, info)
                closed.append(execution_id)
                self.log.warning(f"execution {execution_id}: {ex['error_message']}")
                lc = self.lifecycle(execution_id)
                try:
                    lc.audit("cancelled", {**info, **ex["report"]["stops"][-1],
                                           "status": ex["status"]})
                except Exception as exc:  # noqa: BLE001 - still send the message
                    self.log.error(f"could not write the audit event: {exc}")
                lc.notify("cancelled", reason=ex["error_message"])
        except Exception as exc:  # noqa: BLE001 - see the docstring
            self.log.error(f"could not record the stop of this run: {describe(exc)}")
        return closed

    @contextlib.contextmanager
    def taking_over(self, execution_id: str) -> Iterator[None]:
        """Run one step of an execution: take it over for this run, hold its table locks, and
        record a failure (execution failed, audit, notification, one-line Failure)."""
        engine = self.engine
        try:
            with write_transaction(engine) as conn:
                ex = load_execution(conn, execution_id)
                if ex["status"] != "running" or ex["dagster_run_id"] != self.context.run_id:
                    # Re-execution of a failed run: the execution continues under the new run id.
                    set_execution(
                        conn,
                        execution_id,
                        status="running",
                        dagster_run_id=self.context.run_id,
                        completed_at=None,
                        error_message=None,
                    )
                acquire_locks(
                    conn,
                    ex["declaration"]["tables"],
                    execution_id,
                    self.context.run_id,
                    self.run_finished,
                    self.log,
                )
            # Committed: the execution runs under this Dagster run now.
            self.lifecycle(execution_id).know({**ex, "dagster_run_id": self.context.run_id})
            yield
        except Failure:
            raise
        except STEP_ERRORS as exc:
            finish_execution(engine, execution_id, "failed", error=describe(exc))
            self.record_failure(execution_id, exc, "failed")
            details = getattr(exc, "details", {}) or {}
            raise Failure(
                description=one_line(exc),
                metadata={
                    "execution_id": execution_id,
                    "error": MetadataValue.text(str(exc)),
                    **{k: MetadataValue.json(v) for k, v in details.items()},
                },
            ) from exc
        except Exception as exc:
            finish_execution(engine, execution_id, "failed", error=describe(exc))
            self.record_failure(execution_id, exc, "failed")
            raise

    @contextlib.contextmanager
    def refusing(self, what: str, audit_event: str) -> Iterator[None]:
        """Turn a refusal into a Failure "what: reason" with the refused execution's report;
        the execution, if one was opened (``exc.execution_id`` or ``details``), is audited under
        ``audit_event`` and notified."""
        try:
            yield
        except REFUSALS as exc:
            details = dict(getattr(exc, "details", {}) or {})
            execution_id = details.pop("execution_id", None) or getattr(exc, "execution_id", None)
            meta: dict[str, Any] = {
                "error": MetadataValue.text(str(exc)),
                "database": self.db.safe_url,
            }
            if execution_id:
                self.record_failure(execution_id, exc, audit_event)
                meta.update(self.report_metadata(execution_id))
            meta.update({k: MetadataValue.json(v) for k, v in details.items()})
            raise Failure(description=f"{what}: {one_line(exc)}"[:1000], metadata=meta) from exc


def step_op(
    name: str,
    description: str,
    *,
    config_class: type | None = None,
    ins: dict[str, In] | None = None,
    out: Out | dict[str, Out] | None = None,
    required: tuple[str, ...] = (),
    take_over: bool = False,
    refused: tuple[str, str] | None = None,
) -> Callable[[Callable[..., Any]], OpDefinition]:
    """The op factory: ``@step_op(...)`` over ``body(step, input)``, where input is the op's
    config (``config_class``) or its execution id (``ins``). With several optional outputs
    (``out`` a dict) the body returns the one ``Output`` it takes, or None for none; otherwise
    its return value is the op's output.
    """
    keys = {DB, AUDIT, NOTIFIER, *required}

    def decorate(body: Callable[..., Any]) -> OpDefinition:
        def run(context: OpExecutionContext, value: Any) -> Any:
            step = Step(context)
            # The op reads the database's catalog once (patch_ops.database.Catalog).
            with catalog_scope(), stoppable() as stop:
                try:
                    try:
                        with contextlib.ExitStack() as stack:
                            if refused is not None:
                                stack.enter_context(step.refusing(*refused))
                            if take_over:
                                stack.enter_context(step.taking_over(value))
                            result = body(step, value)
                    finally:
                        step.anchor_audit()
                    failpoint(f"after:{name}")
                except STOPS:
                    # The open transaction has rolled back on the way here.
                    if step.record_stop(stop):
                        step.anchor_audit()
                    raise
            return result

        def branch(result: Any) -> Iterator[Any]:
            if result is not None:  # the one optional output taken (None: none, e.g. paused)
                yield result

        # Dagster reads the input's name and the config class from the signature.
        compute: Callable[..., Any]
        if config_class is not None and isinstance(out, dict):

            def compute(context, config):  # type: ignore[no-untyped-def]
                yield from branch(run(context, config))

        elif config_class is not None:

            def compute(context, config):  # type: ignore[no-untyped-def]
                return run(context, config)

        elif isinstance(out, dict):

            def compute(context, execution_id):  # type: ignore[no-untyped-def]
                yield from branch(run(context, execution_id))

        else:

            def compute(context, execution_id):  # type: ignore[no-untyped-def]
                return run(context, execution_id)

        compute.__annotations__ = {"context": OpExecutionContext}
        if config_class is not None:
            compute.__annotations__["config"] = config_class
        if out is None:
            compute.__annotations__["return"] = None
        return op(
            name=name,
            description=description,
            required_resource_keys=keys,
            ins=None if config_class is not None else (ins or {"execution_id": In(str)}),
            out=out,
        )(compute)

    return decorate
