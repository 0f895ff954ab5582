"""What the outside world hears about an execution: audit events and notifications.

Ops call ``Lifecycle`` at each milestone. Audit events go to the encrypted, hash-chained trail
(resources.audit); notifications (resources.notifier) go out at the end of an execution and never
fail or roll back a patch: undeliverable ones are retried by the notifier within its time budget,
recorded in the execution history (``data_patch_executions.notifications``) and in the audit
trail, and kept in the outbox (patch_ops.outbox), which every notification flushes first.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import update
from sqlalchemy.engine import Connection, Engine

from patch_ops import outbox
from patch_ops.audit import audit_metadata, ensure_audit_tables, ensure_head_row
from patch_ops.database import catalog, table_exists, write_transaction
from patch_ops.execution import load_execution, utcnow
from patch_ops.state import executions
from patch_ops.steps.report import impact_lines
from resources.audit import AuditLog
from resources.notifier import Notifier, PatchNotification

#: Phases whose execution had changed the live tables.
COMMITTED_PHASES = frozenset({"committed", "verified", "restored"})

AUDIT = "audit_log"
NOTIFIER = "notifier"
#: The execution row's fields in every audit event (fixed once an op runs the execution).
HEADER = ("patch_name", "dry_run", "dagster_run_id", "launched_by")


def _resource(resources: Any, key: str) -> Any:
    return getattr(resources, key, None) if resources is not None else None


def secret_values(resources: Any) -> list[str]:
    """Every secret a resource holds, so audit payloads can be scrubbed of them."""
    found: list[str] = []
    notifier = _resource(resources, NOTIFIER)
    if notifier is not None:
        found += [v for v in (notifier.slack_token, notifier.smtp_password) if v]
    return found


def prepare_audit(resources: Any, engine: Engine) -> None:
    """Create the audit tables, if the trail is on, before any transaction that audits: created
    inside one (the plan's freezing transaction, the commit), MySQL would commit it halfway
    (DDL commits implicitly)."""
    audit: AuditLog | None = _resource(resources, AUDIT)
    if audit is not None and audit.active:
        _ensure_audit_tables(engine)


def _ensure_audit_tables(bind: Engine | Connection) -> None:
    """``ensure_audit_tables``, once per op (the catalog's scope: a new op, or a re-execution
    after a kill, ensures them again, the genesis head row included); when the op's catalog
    already lists the three tables, only the head row is looked for."""
    known = catalog(bind)

    def ensure() -> None:
        listed = known.cached and all(table_exists(bind, t) for t in audit_metadata.sorted_tables)
        (ensure_head_row if listed else ensure_audit_tables)(bind)

    known.once("audit tables", ensure)


class Lifecycle:
    """Audit + notify for one execution, from inside an op."""

    def __init__(self, resources: Any, engine: Engine, execution_id: str, log: Any = None):
        self.resources = resources
        self.engine = engine
        self.execution_id = execution_id
        self.log = log
        #: What every audit event says of the execution (``know``), read once.
        self._header: dict[str, Any] | None = None

    def know(self, ex: dict[str, Any]) -> None:
        """Take the execution row as just read by the op (the run it is now under), so its
        audit events need not read it again. Only fields that never change once the op has
        taken the execution over are kept: patch, mode, launcher, Dagster run."""
        self._header = {k: ex[k] for k in HEADER}

    @property
    def audit_log(self) -> AuditLog | None:
        return _resource(self.resources, AUDIT)

    def _execution(self) -> dict[str, Any]:
        with self.engine.connect() as conn:
            return load_execution(conn, self.execution_id)

    def audit(
        self,
        event_type: str,
        public: dict[str, Any],
        secret: dict[str, Any] | None = None,
        conn: Connection | None = None,
    ) -> None:
        """Append an audit event (in ``conn``'s transaction if given). Off without a key."""
        audit = self.audit_log
        if audit is None or not audit.active:
            return
        if self._header is None:
            self.know(self._execution() if conn is None else load_execution(conn, self.execution_id))
        ex = self._header
        assert ex is not None
        _ensure_audit_tables(conn if conn is not None else self.engine)
        body = {"patch": ex["patch_name"], "dry_run": bool(ex["dry_run"]),
                "dagster_run_id": ex["dagster_run_id"], **public}
        audit.append(
            conn if conn is not None else self.engine,
            self.execution_id,
            event_type,
            ex["launched_by"] or "unknown",
            body,
            secret,
            known_secrets=secret_values(self.resources),
        )

    def close(
        self, event_type: str, public: dict[str, Any], outcome: str, reason: str | None = None
    ) -> None:
        """After the execution's final state is written: its last audit event, then the
        end-of-execution notification."""
        self.audit(event_type, public)
        self.notify(outcome, reason=reason)

    def notify(self, outcome: str, reason: str | None = None) -> None:
        """Send the end-of-execution notification (after what the outbox kept that is due);
        record the outcome; keep what was not delivered in the outbox; never raise."""
        notifier: Notifier | None = _resource(self.resources, NOTIFIER)
        if notifier is None:
            return
        try:
            # One budget for the older messages and this one; a channel that fails to take an
            # older message is not tried again now (a dead endpoint costs one timeout).
            deadline = time.monotonic() + notifier.budget_seconds
            down = outbox.down_channels(self.flush_outbox(notifier, deadline))
            ex = self._execution()
            end = ex["completed_at"] or utcnow()
            committed = ex["phase"] in COMMITTED_PHASES or bool(ex["rollback_performed"])
            n = PatchNotification(
                patch_name=ex["patch_name"],
                execution_id=self.execution_id,
                outcome=outcome,
                dry_run=bool(ex["dry_run"]),
                rows_changed=int(ex["staged_updates"] or 0),
                duration_seconds=(end - ex["started_at"]).total_seconds(),
                dagster_run_id=ex["dagster_run_id"],
                reason=reason or ex["error_message"],
                committed=committed,
                # The impact is shown when it is what happened or what would happen.
                impact=tuple(impact_lines(ex["report"]))
                if outcome == "completed" or committed else (),
            )
            results = notifier.notify(n, down=down, deadline=deadline)
            kept = outbox.keep(self.engine, n, results)
            record = [
                {"channel": r.channel, "delivered": r.delivered, "attempts": r.attempts,
                 "error": r.error, "at": utcnow().isoformat(),
                 **({"kept_in_outbox": True} if r.configured and not r.delivered else {})}
                for r in results
            ]
            self.record_notifications(ex.get("notifications") or [], record, outcome)
            for r in record:
                if not r["delivered"] and r["error"] != "not configured" and self.log:
                    self.log.warning(f"notification via {r['channel']} not delivered: {r['error']}")
            if kept and self.log:
                self.log.warning(f"{kept} undelivered message(s) kept in the outbox, sent later")
        except Exception as exc:  # noqa: BLE001 - a notification must never fail a patch
            if self.log:
                self.log.warning(f"notification failed: {type(exc).__name__}: {exc}")

    def record_notifications(self, earlier: list[dict[str, Any]], record: list[dict[str, Any]],
                             outcome: str) -> None:
        """Add ``record`` to the execution's notification history, audited in the same
        transaction (one commit). Should the audit fail, the history is still written, then
        the audit's error raised (``notify`` logs it)."""
        prepare_audit(self.resources, self.engine)  # no table made inside the transaction

        def write(conn: Connection) -> None:
            conn.execute(
                update(executions)
                .where(executions.c.execution_id == self.execution_id)
                .values(notifications=earlier + record)
            )

        try:
            with write_transaction(self.engine) as conn:
                write(conn)
                self.audit("notification", {"outcome": outcome, "deliveries": record}, conn=conn)
        except Exception:
            with write_transaction(self.engine) as conn:
                write(conn)
            raise

    def flush_outbox(self, notifier: Notifier, deadline: float | None = None) -> list[dict[str, Any]]:
        """Send every message the outbox kept (due or not: a notification is going out anyway);
        what happened to each; a failure is logged, never raised."""
        try:
            tried = outbox.flush(self.engine, notifier, due_only=False, deadline=deadline)
        except Exception as exc:  # noqa: BLE001 - a notification must never fail a patch
            if self.log:
                self.log.warning(f"outbox flush failed: {type(exc).__name__}: {exc}")
            return []
        for sent in tried:
            if self.log:
                what = "delivered" if sent["delivered"] else f"still undelivered: {sent['error']}"
                self.log.info(f"outbox: {sent['channel']} message of execution "
                              f"{sent['execution_id']} {what}")
        return tried
