"""Validation's trial apply in slices (``patch_ops.steps.holdback.sliced_trial``): each slice is
its own rolled-back transaction, so the application's writes wait for one slice's row locks,
never for the whole stage's; a refusal in any slice is found and named as before."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
from sqlalchemy import make_url, select, text

from patch_ops.database import get_engine
from patch_ops.steps.backup import take_backup
from patch_ops.steps.plan import plan_execution
from patch_ops.steps.transform import run_transform
from patch_ops.steps.validate import trial_apply
from resources.memory import MemoryGuard
from stockrx_patches.patches.inventory_price_adjustment import InventoryPriceAdjustment
from stockrx_patches.registry import default_registry
from tests.support.production import PRICE_CAP, priced_items
from tests.support.stockrx import (
    defs_with,
    digest,
    failure_description,
    hand_built,
    latest_execution,
    run_patch,
)

PRICE_JOB = "inventory_price_adjustment"
DRY = {"adjustment_type": "percentage", "adjustment_value": 8, "dry_run": True}
TABLES = ("inventories", "batches", "inventory_logs")
#: Slices of 4 changed items (and their 4 log rows) each.
SLICED = {"trial_slice_rows": 4, "trial_slice_seconds": 0.0}


def sliced_settings(**kw):  # type: ignore[no-untyped-def]
    return dataclasses.replace(default_registry().settings(PRICE_JOB), **SLICED, **kw)


def test_a_dry_run_tries_its_stage_slice_by_slice_and_says_so(database_url):
    engine, _ = priced_items(database_url, 18)
    before = digest(engine, TABLES)
    defs = defs_with((InventoryPriceAdjustment(), sliced_settings()))
    result = run_patch(database_url, PRICE_JOB, DRY, defs=defs)
    assert result.success, failure_description(result)
    assert digest(engine, TABLES) == before
    ex = latest_execution(engine, PRICE_JOB)
    trial = ex["report"]["validation"]["trial_apply"]
    assert trial.startswith("passed in 5 slices of the stage, each its own rolled-back "), trial
    assert ex["staged_updates"] == 18


def test_a_refusal_in_a_late_slice_is_found_and_held_back(database_url):
    engine, md = priced_items(database_url, 20, capped=(6, 19))
    before = digest(engine, TABLES)
    defs = defs_with((InventoryPriceAdjustment(), sliced_settings(on_refused_rows="hold_back")))
    result = run_patch(database_url, PRICE_JOB, DRY, defs=defs)
    assert result.success, failure_description(result)
    assert digest(engine, TABLES) == before
    ex = latest_execution(engine, PRICE_JOB)
    held = ex["report"]["held_back"]
    assert [r["source_id"] for r in held["sample"]] == [6, 19]
    assert all(PRICE_CAP in r["refusal"] for r in held["sample"])
    assert ex["report"]["validation"]["trial_apply"] == "passed with 2 driving row(s) held back"
    assert ex["staged_updates"] == 18


def test_a_refusal_fails_the_run_by_default_naming_the_row(database_url):
    engine, _ = priced_items(database_url, 20, capped=(19,))
    defs = defs_with((InventoryPriceAdjustment(), sliced_settings()))
    result = run_patch(database_url, PRICE_JOB, DRY, defs=defs)
    assert not result.success
    message = failure_description(result)
    assert PRICE_CAP in message and "rows 19 (" in message and "price 250 → 270" in message


def test_two_slices_giving_two_rows_one_unique_value_are_refused(database_url):
    # items 1 (100 yen) and 6 (100.4) both become 108: in two slices, each passes alone
    engine = hand_built(database_url, [100, 200, 300, 400, 500, 100.4])
    with engine.begin() as conn:
        conn.execute(text("CREATE UNIQUE INDEX ux_inventories_price ON inventories (price)"))
    before = digest(engine, TABLES)
    defs = defs_with((InventoryPriceAdjustment(), sliced_settings()))
    result = run_patch(database_url, PRICE_JOB, DRY, defs=defs)
    assert not result.success
    assert digest(engine, TABLES) == before
    message = failure_description(result)
    assert "two staged inventories rows would share the unique key ux_inventories_price (price = " \
        in message, message
    assert "no single driving row is refused on its own" in message


def lock_waits(conn) -> bool:  # type: ignore[no-untyped-def]
    """Whether a session of this server waits for a row lock now (MariaDB's INNODB_TRX may show
    a multi-table UPDATE that waits as RUNNING; its InnoDB status says LOCK WAIT)."""
    if conn.dialect.name == "postgresql":
        waiting = bool(conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()")).scalar_one())
    else:
        waiting = "LOCK WAIT" in conn.execute(text("SHOW ENGINE INNODB STATUS")).one()[2]
    conn.rollback()  # PostgreSQL shows pg_stat_activity as of the transaction's first look
    return waiting


@pytest.mark.parametrize("server", ["pg_url", "mysql_url"])
def test_the_application_waits_for_one_slice_not_the_whole_stage(server, request):
    url = request.getfixturevalue(server)
    # who waits for a lock: the administrator's to see on MariaDB (PROCESS)
    watcher = get_engine(url if server == "pg_url" else request.getfixturevalue(
        "mysql_server").root_url(make_url(url).database))
    engine, md = priced_items(url, 12)
    settings = sliced_settings()
    patch = InventoryPriceAdjustment()
    config = patch.config_class(**DRY)
    x = plan_execution(engine, patch, settings, config)
    take_backup(engine, x)
    run_transform(engine, patch, x, MemoryGuard())
    inv = md.tables["inventories"]
    found: dict[str, object] = {}
    app = engine.connect()
    try:
        app.begin()
        app.execute(select(inv.c.id).where(inv.c.id == 10).with_for_update())  # in slice 3
        worker = threading.Thread(target=lambda: found.update(trial=trial_apply(engine, settings, x)))
        worker.start()
        with watcher.connect() as watch:
            deadline = time.monotonic() + 120
            while not lock_waits(watch):  # the trial now waits for item 10, in its 3rd slice
                assert time.monotonic() < deadline and worker.is_alive(), found
                time.sleep(0.05)
        with engine.connect() as other:
            other.begin()  # item 2 (slice 1) is free: its slice was rolled back
            assert other.execute(
                select(inv.c.id).where(inv.c.id == 2).with_for_update(nowait=True)
            ).scalar_one() == 2
            other.rollback()
    finally:
        app.rollback()
        app.close()
    worker.join(120)
    trial = found["trial"]
    assert trial.refusal is None and trial.slices == 3  # type: ignore[attr-defined]
