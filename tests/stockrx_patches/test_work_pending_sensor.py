"""The data-condition sensor: expired lots with stock start one dry run a day outside the
maintenance windows (inside them the schedule runs the patch), so the report of what the next
scheduled run will write is there to read; no expired lots, no dry run."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import update

from stockrx_patches.definitions import build_definitions
from stockrx_patches.registry import default_registry
from stockrx_patches.sensors import work_pending_sensor_name
from stockrx_patches.tables import batches
from tests.support.sensor_ticks import EXPIRY_JOB, MON_1000, launch, tick
from tests.support.stockrx import digest, failure_description, latest_execution, seeded


def test_expired_lots_start_one_dry_run_a_day_outside_the_windows(sqlite_url, db, instance, clock):
    engine = seeded(sqlite_url, items=100)  # lots expire around 2026-11-29
    before = digest(engine)
    defs = build_definitions(default_registry())
    name = work_pending_sensor_name(EXPIRY_JOB)

    inside = tick(defs, name, instance, db)
    assert inside.run_requests == [] and "inside the maintenance window" in inside.skip_message

    clock(MON_1000)
    result = tick(defs, name, instance, db)
    [request] = result.run_requests
    assert request.run_key == "batch_expiry_update:work-pending:2026-11-30"
    config = request.run_config["ops"]["plan_patch"]["config"]
    assert config["dry_run"] is True and config["business_date"] == "2026-11-30"
    assert result.cursor == "2026-11-30"
    later = tick(defs, name, instance, db, cursor=result.cursor)
    assert later.run_requests == [] and "already started" in later.skip_message

    run = launch(defs, request, instance)
    assert run.success, failure_description(run)
    ex = latest_execution(engine, EXPIRY_JOB)
    assert ex["dry_run"] is True and ex["status"] == "completed" and ex["target_count"] > 0
    assert digest(engine) == before

    clock("2026-12-01T10:00:00+09:00")
    assert tick(defs, name, instance, db, cursor=result.cursor).run_requests  # a new day


def test_no_expired_lots_no_dry_run(sqlite_url, db, instance, clock):
    engine = seeded(sqlite_url, items=50)
    with engine.begin() as conn:
        conn.execute(update(batches).values(expires_on=dt.date(2030, 1, 1)))
    clock(MON_1000)

    result = tick(
        build_definitions(default_registry()), work_pending_sensor_name(EXPIRY_JOB), instance, db
    )

    assert result.run_requests == []
    assert result.skip_message == "batch_expiry_update has nothing to do for 2026-11-30"
