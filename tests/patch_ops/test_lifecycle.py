"""What an execution's notification leaves in the database (patch_ops.lifecycle.Lifecycle):
its delivery record and its audit event commit together, and an audit that fails still leaves
the record (the failure is logged, never raised)."""

from __future__ import annotations

from types import SimpleNamespace

from sqlalchemy import event, func, select, update
from sqlalchemy.engine import Engine

from patch_ops.audit import audit_events, audit_head
from patch_ops.database import catalog_scope
from patch_ops.lifecycle import Lifecycle
from resources.audit import AuditLog
from resources.notifier import Notifier
from tests.conftest import TEST_AUDIT_KEY
from tests.support.stockrx import PRICE_JOB, latest_execution, run_patch, seeded

DRY = {"dry_run": True, "adjustment_type": "percentage", "adjustment_value": 8}


class Log:
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warning(self, message: str) -> None:
        self.warnings.append(message)

    def info(self, message: str) -> None:
        pass


def executed(url: str) -> tuple[Engine, Lifecycle, Log]:
    engine = seeded(url, items=20)
    assert run_patch(url, PRICE_JOB, DRY).success
    log = Log()
    resources = SimpleNamespace(audit_log=AuditLog(audit_keys=TEST_AUDIT_KEY),
                                notifier=Notifier(channels=["slack"]))
    return engine, Lifecycle(resources, engine, latest_execution(engine)["execution_id"], log), log


def notifications(engine: Engine) -> int:
    return len(latest_execution(engine)["notifications"] or [])


def audited(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(
            select(func.count()).where(audit_events.c.event_type == "notification")
        ).scalar_one()


def test_the_record_and_its_audit_event_commit_together(database_url: str) -> None:
    engine, lc, log = executed(database_url)
    with catalog_scope():  # as in an op: the audit tables are looked for once
        lc.notify("completed")
        records, events = notifications(engine), audited(engine)
        commits: list[object] = []
        event.listen(engine, "commit", commits.append)
        lc.notify("completed")

    assert (notifications(engine), audited(engine)) == (records + 1, events + 1)
    assert len(commits) == 1 and log.warnings == []


def test_an_audit_that_fails_still_leaves_the_record(database_url: str) -> None:
    engine, lc, log = executed(database_url)
    records, events = notifications(engine), audited(engine)
    with engine.begin() as conn:  # the next event's seq is taken: its append fails
        conn.execute(update(audit_head).values(seq=0))

    lc.notify("completed")

    assert (notifications(engine), audited(engine)) == (records + 1, events)
    assert any(w.startswith("notification failed") for w in log.warnings)
