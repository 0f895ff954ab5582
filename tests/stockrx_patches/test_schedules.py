"""Schedules from the maintenance windows (stockrx_patches.schedules)."""

from __future__ import annotations

import datetime as dt

from dagster import DagsterInstance, build_schedule_context
from sqlalchemy import select, update

from stockrx_patches.definitions import build_definitions, defs
from stockrx_patches.registry import default_registry
from stockrx_patches.schedules import schedule_name
from stockrx_patches.tables import batches
from tests.support.fake_slack import FakeSlack
from tests.support.stockrx import digest, failure_description, latest_execution, run_patch, seeded

EXPIRY = "batch_expiry_update"


def jst(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=dt.timezone(dt.timedelta(hours=9)))


def test_one_window_start_is_one_cron_expression_not_a_list() -> None:
    # A one-item list showed in the UI and CLI as "['0 2 * * 0,3']".
    schedule = defs.resolve_schedule_def("batch_expiry_update_at_window_start")
    assert schedule.cron_schedule == "0 2 * * 0,3"
    assert schedule.execution_timezone == "Asia/Tokyo"



def scheduled_run(url: str, monkeypatch, instance):  # type: ignore[no-untyped-def]
    """The scheduled batch_expiry_update run of the window start, as the daemon launches it."""
    monkeypatch.setenv("STOCKRX_DATABASE_URL", url)
    defs_now = build_definitions(default_registry())
    schedule = defs_now.resolve_schedule_def(schedule_name(EXPIRY))
    ctx = build_schedule_context(instance=instance, scheduled_execution_time=jst(2026, 11, 29, 2, 0))
    [request] = schedule.evaluate_tick(ctx).run_requests
    return defs_now.resolve_job_def(EXPIRY).execute_in_process(
        run_config=request.run_config, instance=instance, tags=request.tags, raise_on_error=False
    )


def expire(engine, lots: int) -> None:  # type: ignore[no-untyped-def]
    """Only the first ``lots`` lots with stock are expired; every other lot expires in 2099."""
    with engine.begin() as conn:
        conn.execute(update(batches).values(expires_on=dt.date(2099, 1, 1)))
        first = select(batches.c.id).where(batches.c.quantity > 0).order_by(batches.c.id)
        ids = list(conn.execute(first.limit(lots)).scalars())
        conn.execute(update(batches).where(batches.c.id.in_(ids))
                     .values(expires_on=dt.date(2000, 1, 1)))


def test_a_scheduled_run_far_outside_its_history_is_held_as_a_dry_run(
    sqlite_url, monkeypatch, dagster_home
):
    engine = seeded(sqlite_url, items=300)
    instance = DagsterInstance.get()
    expire(engine, 3)
    first = scheduled_run(sqlite_url, monkeypatch, instance)
    assert first.success, failure_description(first)
    done = latest_execution(engine, EXPIRY)
    assert (done["dry_run"], done["status"], done["phase"]) == (False, "completed", "verified")

    expire(engine, 60)  # 20x the targets of the only completed run
    before = digest(engine)
    with FakeSlack(token="xoxb-test") as slack:
        monkeypatch.setenv("STOCKRX_SLACK_TOKEN", "xoxb-test")
        monkeypatch.setenv("STOCKRX_SLACK_BASE_URL", slack.base_url)
        held = scheduled_run(sqlite_url, monkeypatch, instance)
        [message] = slack.messages
    assert held.success, failure_description(held)
    ex = latest_execution(engine, EXPIRY)
    assert ex["dry_run"] is True and ex["status"] == "completed"
    assert ex["report"]["held_for_approval"]["targets"] > 3 * done["target_count"]
    assert digest(engine) == before  # nothing committed
    assert "held for approval" in message["text"] and "URGENT" not in message["text"]
    assert not message["text"].startswith(":rotating_light:")

    # A person launches the real run by hand: it is not held.
    monkeypatch.setenv("STOCKRX_DATABASE_URL", sqlite_url)
    by_hand = run_patch(sqlite_url, EXPIRY, {"dry_run": False, "launched_by": "alice"})
    assert by_hand.success, failure_description(by_hand)
    assert latest_execution(engine, EXPIRY)["dry_run"] is False
    assert digest(engine) != before
