"""Sensors that launch a patch's runs when it is time: release requests (launched once, rejected
with a reason, held until a window, outcome recorded) and paused executions resumed when the next
window opens. The data-condition dry run is in test_work_pending_sensor.py, runs that die in
test_failure_sensor.py, the request CLI in test_request_cli.py."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import RunRequest
from sqlalchemy import insert, text

from patch_ops import windows as win
from patch_ops.state import executions
from resources.notifier import Notifier
from stockrx_patches import requests as rq
from stockrx_patches.definitions import build_definitions
from stockrx_patches.patches.inventory_price_adjustment import InventoryPriceAdjustment
from stockrx_patches.registry import default_registry
from stockrx_patches.sensors import REQUEST_POLL_ENV, REQUEST_SENSOR, RESUME_SENSOR
from tests.conftest import TEST_NOW_ENV, TEST_PYTHONPATH
from tests.support.fake_slack import FakeSlack
from tests.support.sensor_ticks import (
    DRY,
    EXPIRY_JOB,
    MON_1000,
    SUN_0230,
    TOKEN,
    defs_with_patch,
    launch,
    tick,
)
from tests.support.stockrx import (
    PRICE_JOB,
    digest,
    failure_description,
    latest_execution,
    run_patch,
    seeded,
)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------------------------------
# Release requests
# ---------------------------------------------------------------------------------------------


def test_pending_requests_are_launched_once_and_their_outcome_recorded(
    sqlite_url, db, instance, clock
):
    engine = seeded(sqlite_url, items=50)
    defs = build_definitions(default_registry())
    first = rq.submit_request(engine, PRICE_JOB, DRY, "release-bot", "v2.14.0")
    second = rq.submit_request(engine, EXPIRY_JOB, {}, "alice")

    result = tick(defs, REQUEST_SENSOR, instance, db)

    assert [(r.job_name, r.run_key) for r in result.run_requests] == [
        (PRICE_JOB, f"data_patch_request:{first}"),
        (EXPIRY_JOB, f"data_patch_request:{second}"),
    ]
    price = result.run_requests[0]
    assert price.run_config == {
        "ops": {"plan_patch": {"config": {"launched_by": "release-bot", **DRY}}}
    }
    assert price.tags["stockrx/request"] == str(first)
    assert price.tags["stockrx/release"] == "v2.14.0"
    assert rq.get_request(engine, first)["status"] == "launched"
    assert rq.get_request(engine, first)["run_key"] == f"data_patch_request:{first}"

    again = tick(defs, REQUEST_SENSOR, instance, db)
    assert again.run_requests == []
    assert "no request to launch" in again.skip_message

    run = launch(defs, price, instance)
    assert run.success
    tick(defs, REQUEST_SENSOR, instance, db)  # records the outcome
    done = rq.get_request(engine, first)
    assert done["status"] == "succeeded" and done["dagster_run_id"] == run.run_id
    ex = latest_execution(engine, PRICE_JOB)
    assert done["execution_id"] == ex["execution_id"] and ex["launched_by"] == "release-bot"
    assert rq.get_request(engine, second)["status"] == "launched"  # its run is not in yet


def test_insert_by_plain_sql_as_release_tooling_does(sqlite_url, db, instance, clock):
    engine = seeded(sqlite_url, items=20)
    rq.ensure_requests_table(engine)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO data_patch_requests (patch_name, run_config, requested_by, "
                "release_tag) VALUES ('inventory_price_adjustment', "
                '\'{"dry_run": true, "adjustment_type": "percentage", '
                "\"adjustment_value\": 8}', 'release-bot', 'v2.14.0')"
            )
        )
    defs = build_definitions(default_registry())

    [request] = tick(defs, REQUEST_SENSOR, instance, db).run_requests

    assert request.run_config["ops"]["plan_patch"]["config"]["dry_run"] is True
    row = rq.get_request(engine, 1)
    assert row["status"] == "launched" and row["requested_at"] is not None


@pytest.mark.parametrize(
    ("patch", "config", "reason"),
    [
        ("no_such_patch", {}, "unknown patch 'no_such_patch'; known patches: batch_expiry_update"),
        (
            PRICE_JOB,
            {"adjustment_type": "percentage", "adjustment_value": "lots"},
            "invalid run config: ",
        ),
        (PRICE_JOB, {**DRY, "colour": "red"}, "invalid run config: "),
        (
            PRICE_JOB,
            {"adjustment_type": "percentage", "adjustment_value": 5000},
            "invalid run config: ",
        ),
        (PRICE_JOB, ["not", "a", "mapping"], "run_config must be a JSON object"),
    ],
)
def test_bad_requests_are_rejected_with_the_reason(
    sqlite_url, db, instance, clock, patch, config, reason
):
    engine = seeded(sqlite_url, items=10)
    rq.ensure_requests_table(engine)
    with engine.begin() as conn:
        request_id = conn.execute(
            insert(rq.requests).values(patch_name=patch, run_config=config, requested_by="bob")
        ).inserted_primary_key[0]
    defs = build_definitions(default_registry())

    result = tick(defs, REQUEST_SENSOR, instance, db)

    assert result.run_requests == []
    row = rq.get_request(engine, request_id)
    assert row["status"] == "rejected"
    assert reason in row["reason"]
    assert tick(defs, REQUEST_SENSOR, instance, db).run_requests == []  # stays rejected


def test_sensor_preview_decides_and_writes_nothing(sqlite_url, dagster_home):
    """`dagster sensor preview` shows what a tick would launch and reject; only a daemon tick
    writes (stockrx_patches.ticks)."""
    engine = seeded(sqlite_url, items=10)
    rq.ensure_requests_table(engine)
    with engine.begin() as conn:  # as release tooling would, by SQL: one bad, one good
        bad = conn.execute(insert(rq.requests).values(
            patch_name="no_such_patch", run_config={}, requested_by="bob")).inserted_primary_key[0]
        good = conn.execute(insert(rq.requests).values(
            patch_name=PRICE_JOB, run_config={**DRY, "dry_run": True}, requested_by="alice",
        )).inserted_primary_key[0]
    rows = {i: rq.get_request(engine, i) for i in (bad, good)}
    env = dict(os.environ, STOCKRX_DATABASE_URL=sqlite_url, DAGSTER_HOME=str(dagster_home),
               PYTHONPATH=TEST_PYTHONPATH)

    out = subprocess.run(
        [str(BIN / "dagster"), "sensor", "preview", REQUEST_SENSOR,
         "-m", "stockrx_patches.definitions"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )

    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Sensor returning run requests for 1 run(s)" in out.stdout  # the good one's
    assert f"preview: request {bad} (no_such_patch): rejected: unknown patch" in out.stderr
    assert {i: rq.get_request(engine, i) for i in (bad, good)} == rows  # still pending, untouched
    assert rows[bad]["status"] == "pending" and rows[bad]["reason"] is None


def test_the_request_sensor_polls_every_30_s_unless_told_otherwise(monkeypatch):
    def interval() -> int | None:
        defs = build_definitions(default_registry())
        return defs.resolve_sensor_def(REQUEST_SENSOR).minimum_interval_seconds

    monkeypatch.delenv(REQUEST_POLL_ENV, raising=False)
    assert interval() == 30
    monkeypatch.setenv(REQUEST_POLL_ENV, "5")
    assert interval() == 5
    for bad in ("0", "-3", "2.5", "soon"):
        monkeypatch.setenv(REQUEST_POLL_ENV, bad)
        with pytest.raises(ValueError, match=REQUEST_POLL_ENV):
            interval()


def test_rejection_reasons_name_the_problem(sqlite_url, db, instance, clock):
    engine = seeded(sqlite_url, items=10)
    wrong_type = rq.submit_request(engine, PRICE_JOB, {**DRY, "adjustment_value": "lots"}, "bob")
    extra = rq.submit_request(engine, PRICE_JOB, {**DRY, "colour": "red"}, "bob")
    out_of_range = rq.submit_request(engine, PRICE_JOB, {**DRY, "adjustment_value": 5000}, "bob")
    tick(build_definitions(default_registry()), REQUEST_SENSOR, instance, db)

    assert "adjustment_value" in rq.get_request(engine, wrong_type)["reason"]
    assert "colour" in rq.get_request(engine, extra)["reason"]
    assert "-100" in rq.get_request(engine, out_of_range)["reason"]


def test_real_run_requests_are_held_until_the_window_opens(sqlite_url, db, instance, clock):
    engine = seeded(sqlite_url, items=30)
    defs = build_definitions(default_registry())
    clock(MON_1000)
    real = rq.submit_request(engine, PRICE_JOB, {**DRY, "dry_run": False}, "release-bot")
    dry = rq.submit_request(engine, PRICE_JOB, DRY, "release-bot")
    override = rq.submit_request(
        engine, PRICE_JOB, {**DRY, "dry_run": False, "allow_outside_window": True}, "ops"
    )

    result = tick(defs, REQUEST_SENSOR, instance, db)

    assert [r.run_key for r in result.run_requests] == [
        f"data_patch_request:{dry}",
        f"data_patch_request:{override}",
    ]
    held = rq.get_request(engine, real)
    assert held["status"] == "held"
    assert held["reason"] == (
        "real run held until the next maintenance window (Wed 2026-12-02 02:00-04:00 Asia/Tokyo)"
    )
    assert tick(defs, REQUEST_SENSOR, instance, db).run_requests == []

    # The window opens 40 hours after the dry run that approved it (valid 24 hours): a fresh
    # dry run re-confirms the plan first, then the real run starts.
    approving = launch(defs, tick_request(defs, instance, db, dry), instance)
    assert approving.success, failure_description(approving)
    clock("2026-12-02T02:00:30+09:00")
    [reconfirm] = tick(defs, REQUEST_SENSOR, instance, db).run_requests
    assert reconfirm.run_key == f"data_patch_request:{real}:reconfirm"
    assert reconfirm.run_config["ops"]["plan_patch"]["config"]["dry_run"] is True
    assert rq.get_request(engine, real)["status"] == "reconfirming"
    assert launch(defs, reconfirm, instance).success

    [request] = tick(defs, REQUEST_SENSOR, instance, db).run_requests
    assert request.run_key == f"data_patch_request:{real}"
    assert request.run_config["ops"]["plan_patch"]["config"]["dry_run"] is False
    assert rq.get_request(engine, real)["status"] == "launched"
    before = digest(engine)
    result = launch(defs, request, instance)
    assert result.success, failure_description(result)  # approved by the fresh dry run
    assert digest(engine) != before


def tick_request(defs, instance, db, request_id: int) -> RunRequest:  # type: ignore[no-untyped-def]
    """The run request of an already launched request (the sensor gave it before)."""
    engine = db.get_engine()
    req = rq.get_request(engine, request_id)
    config = {"ops": {"plan_patch": {"config": {"launched_by": req["requested_by"],
                                                **json.loads(json.dumps(req["run_config"]))}}}}
    return RunRequest(run_key=req["run_key"], job_name=req["patch_name"], run_config=config,
                      tags={rq.REQUEST_TAG: str(request_id)})


def test_a_real_request_under_the_product_fixed_clock_is_held_not_launched(
    sqlite_url, db, instance, clock, monkeypatch
):
    """STOCKRX_PATCHES_CLOCK inside a window is an override (patch_ops.windows): a real request
    without allow_outside_window would be refused at plan, so the sensor holds it and says why."""
    engine = seeded(sqlite_url, items=10)
    monkeypatch.setenv(win.CLOCK_ENV, SUN_0230)
    request_id = rq.submit_request(engine, PRICE_JOB, {**DRY, "dry_run": False}, "release-bot")

    result = tick(build_definitions(default_registry()), REQUEST_SENSOR, instance, db)

    assert result.run_requests == []
    row = rq.get_request(engine, request_id)
    assert row["status"] == "held"
    assert f"the clock is fixed by {win.CLOCK_ENV}" in row["reason"]
    assert "needs allow_outside_window" in row["reason"]


def test_a_held_request_whose_plan_changed_is_held_again_and_the_requester_told(
    sqlite_url, db, instance, clock
):
    engine = seeded(sqlite_url, items=30)
    defs = build_definitions(default_registry())
    clock(MON_1000)
    assert run_patch(sqlite_url, PRICE_JOB, DRY).success  # the dry run that approved it
    real = rq.submit_request(engine, PRICE_JOB, {**DRY, "dry_run": False}, "release-bot")
    tick(defs, REQUEST_SENSOR, instance, db)
    assert rq.get_request(engine, real)["status"] == "held"
    with engine.begin() as conn:  # the application adds an item meanwhile: another plan
        conn.exec_driver_sql(
            "INSERT INTO inventories (name, price, quantity, status, inventory_logs_count, "
            "created_at, updated_at) VALUES ('new', 100, 1, 0, 0, '2026-12-01', '2026-12-01')"
        )

    clock("2026-12-02T02:00:30+09:00")
    [reconfirm] = tick(defs, REQUEST_SENSOR, instance, db).run_requests
    assert launch(defs, reconfirm, instance).success
    before = digest(engine)
    with FakeSlack(token=TOKEN) as slack:
        notifier = Notifier(channels=["slack"], slack_token=TOKEN, slack_base_url=slack.base_url)
        result = tick(defs, REQUEST_SENSOR, instance, db, notifier=notifier)
        [message] = slack.messages
    assert result.run_requests == []
    held = rq.get_request(engine, real)
    assert held["status"] == "held"
    assert held["reason"].startswith("held: the plan changed since it was approved")
    assert "planned 30 rows, the re-confirming dry run" in held["reason"] and " 31 (" in (
        held["reason"])
    assert "HELD" in message["text"] and not message["text"].startswith(":rotating_light:")
    assert "release-bot" in message["text"]
    assert tick(defs, REQUEST_SENSOR, instance, db).run_requests == []  # until a person acts
    assert digest(engine) == before

    with engine.begin() as conn:  # a person read the new dry run's report: go
        conn.exec_driver_sql(f"UPDATE data_patch_requests SET status = 'pending' WHERE id = {real}")
    [request] = tick(defs, REQUEST_SENSOR, instance, db).run_requests
    assert request.run_key == f"data_patch_request:{real}"
    run = launch(defs, request, instance)
    assert run.success, failure_description(run)  # approved by the re-confirming dry run


def test_failed_request_run_records_the_reason(sqlite_url, db, instance, clock):
    engine = seeded(sqlite_url, items=30)
    defs = build_definitions(default_registry())
    request_id = rq.submit_request(engine, PRICE_JOB, {**DRY, "dry_run": False}, "bob")
    [request] = tick(defs, REQUEST_SENSOR, instance, db).run_requests

    run = launch(defs, request, instance)  # a real run without an approving dry run

    assert not run.success
    tick(defs, REQUEST_SENSOR, instance, db)
    row = rq.get_request(engine, request_id)
    assert row["status"] == "failed" and row["dagster_run_id"] == run.run_id
    assert row["reason"] == latest_execution(engine)["error_message"]
    assert "dry run" in row["reason"]


# ---------------------------------------------------------------------------------------------
# Resuming paused executions
# ---------------------------------------------------------------------------------------------


class PausingPatch(InventoryPriceAdjustment):
    """The price patch; its clock passes the window end after the second batch (test only)."""

    name = "pausing_patch"
    calls = 0

    def transform(self, batch, config, ctx):  # type: ignore[no-untyped-def]
        PausingPatch.calls += 1
        if PausingPatch.calls == 2:
            os.environ[TEST_NOW_ENV] = "2026-11-29T04:00:05+09:00"
        return super().transform(batch, config, ctx)


def test_resume_sensor_continues_paused_executions_when_a_window_opens(
    sqlite_url, db, instance, clock
):
    engine = seeded(sqlite_url, items=100)
    defs = defs_with_patch(PausingPatch)
    PausingPatch.calls = 0
    clock("2026-11-29T03:59:00+09:00")
    first = run_patch(
        sqlite_url,
        PausingPatch.name,
        {**DRY, "dry_run": False},
        defs=defs,
        instance=instance,
        approve=False,
    )
    assert first.success, failure_description(first)
    paused = latest_execution(engine)
    assert paused["status"] == "paused"

    outside = tick(defs, RESUME_SENSOR, instance, db)
    assert outside.run_requests == []

    clock("2026-12-02T02:00:20+09:00")
    [request] = tick(defs, RESUME_SENSOR, instance, db).run_requests
    assert request.job_name == PausingPatch.name
    assert request.run_key == (f"resume:{paused['execution_id']}:2026-12-02T02:00:00+09:00")
    config = request.run_config["ops"]["plan_patch"]["config"]
    assert config["resume_execution_id"] == paused["execution_id"]
    assert config["adjustment_value"] == 8

    run = launch(defs, request, instance)
    assert run.success, failure_description(run)
    done = latest_execution(engine)
    assert done["execution_id"] == paused["execution_id"] and done["status"] == "completed"
    assert done["batches_done"] == 5
    assert tick(defs, RESUME_SENSOR, instance, db).run_requests == []


def test_resume_sensor_leaves_the_scheduled_config_to_the_schedule(sqlite_url, db, instance, clock):
    engine = seeded(sqlite_url, items=20)
    registry = default_registry()
    defs = build_definitions(registry)
    cfg = registry.get(EXPIRY_JOB).config_class(dry_run=False, launched_by="x").model_dump()
    with engine.begin() as conn:
        from patch_ops.state import ensure_framework_tables

        ensure_framework_tables(engine)
        for i, c in enumerate([cfg, {**cfg, "grace_days": 3}]):
            conn.execute(
                insert(executions).values(
                    execution_id=f"00000000-0000-0000-0000-00000000000{i}",
                    patch_name=EXPIRY_JOB,
                    kind="patch",
                    status="paused",
                    phase="paused_window_end",
                    dry_run=False,
                    config=c,
                    started_at=dt.datetime(2026, 11, 28, 18, 0),
                )
            )

    [request] = tick(defs, RESUME_SENSOR, instance, db).run_requests

    config = request.run_config["ops"]["plan_patch"]["config"]
    assert config["grace_days"] == 3  # the other one is the schedule's own config
