"""A run that dies outside the patch's steps (its op process killed, as by the OOM killer): the
run failure sensor closes the execution and notifies once, and the next run releases its locks as
stale and closes it as abandoned."""

from __future__ import annotations

import os
import signal

from dagster import (
    DagsterEventType,
    DagsterInstance,
    build_run_status_sensor_context,
    execute_job,
    reconstructable,
)
from sqlalchemy import select

from patch_ops.state import executions, locks
from resources.audit import AuditLog
from resources.notifier import Notifier
from stockrx_patches.patches.inventory_price_adjustment import InventoryPriceAdjustment
from stockrx_patches.sensors import FAILURE_SENSOR
from tests.conftest import TEST_AUDIT_KEY
from tests.support.fake_slack import FakeSlack
from tests.support.fake_smtp import FakeSmtp
from tests.support.sensor_ticks import DRY, TOKEN, defs_with_patch
from tests.support.stockrx import (
    PRICE_JOB,
    failure_description,
    latest_execution,
    run_patch,
    seeded,
)


class DyingPatch(InventoryPriceAdjustment):
    """Its op process is killed (think: the OOM killer) in the second batch (test only)."""

    name = "dying_patch"

    def transform(self, batch, config, ctx):  # type: ignore[no-untyped-def]
        if os.environ.get("DYING_PATCH_KILL") and int(batch["inventories"]["id"].min()) > 20:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().transform(batch, config, ctx)


def dying_job():  # type: ignore[no-untyped-def]
    """Module level, so the multiprocess executor can rebuild it in the op processes."""
    return defs_with_patch(DyingPatch).resolve_job_def(DyingPatch.name)


def run_dying_patch(url: str, instance: DagsterInstance):  # type: ignore[no-untyped-def]
    os.environ["DYING_PATCH_KILL"] = "1"
    os.environ["STOCKRX_DATABASE_URL"] = url
    try:
        return execute_job(
            reconstructable(dying_job),
            instance=instance,
            run_config={"ops": {"plan_patch": {"config": DRY}}},
        )
    finally:
        os.environ.pop("DYING_PATCH_KILL")


def test_dry_run_that_dies_is_closed_with_an_ordinary_notification(sqlite_url, db, instance, clock):
    engine = seeded(sqlite_url, items=100)
    result = run_dying_patch(sqlite_url, instance)
    assert not result.success
    died = latest_execution(engine)
    assert died["status"] == "running"  # the step never got to record anything
    with engine.connect() as conn:
        assert (
            conn.execute(select(locks.c.execution_id)).scalars().all() == [died["execution_id"]] * 2
        )

    [failure] = instance.get_records_for_run(
        result.run_id, of_type=DagsterEventType.RUN_FAILURE
    ).records
    with FakeSlack(token=TOKEN) as slack, FakeSmtp() as smtp:
        notifier = Notifier(
            slack_token=TOKEN,
            slack_base_url=slack.base_url,
            smtp_host="127.0.0.1",
            smtp_port=smtp.port,
            smtp_recipients=["ops@stockrx.test"],
            smtp_security="none",
            retry_delay_seconds=0.01,
        )
        audit = AuditLog(audit_keys=TEST_AUDIT_KEY)
        defs = defs_with_patch(DyingPatch)
        ctx = build_run_status_sensor_context(
            sensor_name=FAILURE_SENSOR,
            dagster_instance=instance,
            dagster_run=instance.get_run_by_id(result.run_id),
            dagster_event=failure.event_log_entry.dagster_event,
            resources={"stockrx_db": db, "notifier": notifier, "audit_log": audit},
            repository_def=defs.get_repository_def(),
        ).for_run_failure()
        defs.resolve_sensor_def(FAILURE_SENSOR)(ctx)

        [message] = slack.messages
        [mail] = smtp.messages
    closed = latest_execution(engine)
    assert closed["status"] == "failed"
    assert closed["error_message"].startswith("the Dagster run failed outside the patch steps")
    with engine.connect() as conn:
        assert conn.execute(select(locks)).all() == []
    assert message["text"].startswith(":warning:")  # a dry run: urgent is for real runs
    assert "dying_patch FAILED (DRY RUN)" in message["text"]
    assert f"Execution id: {died['execution_id']}" in message["text"]
    assert "Reason: the Dagster run failed outside the patch steps" in message["text"]
    assert str(mail["Subject"]).strip() == "[StockRx] Patch dying_patch FAILED (DRY RUN)"
    assert "Rows changed: none (a dry run commits nothing)" in message["text"]
    assert died["execution_id"] in mail.get_content()
    assert [n["delivered"] for n in closed["notifications"]] == [True, True]

    # A second evaluation (or a failure the steps had reported) sends nothing more.
    with FakeSlack(token=TOKEN) as slack2:
        notifier2 = Notifier(channels=["slack"], slack_token=TOKEN, slack_base_url=slack2.base_url)
        ctx2 = build_run_status_sensor_context(
            sensor_name=FAILURE_SENSOR,
            dagster_instance=instance,
            dagster_run=instance.get_run_by_id(result.run_id),
            dagster_event=failure.event_log_entry.dagster_event,
            resources={"stockrx_db": db, "notifier": notifier2, "audit_log": audit},
            repository_def=defs.get_repository_def(),
        ).for_run_failure()
        defs.resolve_sensor_def(FAILURE_SENSOR)(ctx2)
        assert slack2.messages == []


def test_dead_run_lock_is_released_as_stale_by_the_next_run(sqlite_url, instance, clock):
    engine = seeded(sqlite_url, items=100)
    result = run_dying_patch(sqlite_url, instance)
    died = latest_execution(engine)
    assert died["status"] == "running"

    nxt = run_patch(sqlite_url, PRICE_JOB, DRY, instance=instance)

    assert nxt.success, failure_description(nxt)
    with engine.connect() as conn:
        row = (
            conn.execute(
                select(executions).where(executions.c.execution_id == died["execution_id"])
            )
            .mappings()
            .one()
        )
    assert row["status"] == "failed"
    assert "abandoned: its table locks were released as stale by a new run of" in (
        row["error_message"])
    assert f"its Dagster run {result.run_id} is FAILURE" in row["error_message"]
    logs = [e.user_message for e in instance.all_logs(nxt.run_id)]
    assert any(f"released stale lock of execution {died['execution_id']}" in m for m in logs)
