"""Plan checks (patch_ops.checks): a committed patch is not applied a second time by accident."""

from __future__ import annotations

import pytest

from patch_ops.database import get_engine
from tests.support.stockrx import (
    failure_description,
    latest_execution,
    prices,
    run_patch,
    seeded,
)

PRICE_JOB = "inventory_price_adjustment"
PCT8 = {"adjustment_type": "percentage", "adjustment_value": 8, "dry_run": False}


def test_the_same_real_run_twice_is_refused_as_a_repeat(database_url: str) -> None:
    # Once, a second dry run approved the same plan and the real run added +8 % again
    # (5,266 -> 5,687 -> 6,142).
    engine = seeded(database_url, items=60)
    assert run_patch(database_url, PRICE_JOB, PCT8).success
    once = prices(engine)
    second = run_patch(database_url, PRICE_JOB, PCT8)
    assert not second.success
    message = failure_description(second)
    assert "refused as a repeat" in message and "had the same config and changed" in message
    assert "allow_repeat: true" in message
    assert prices(engine) == once
    refused = latest_execution(engine)
    assert refused["status"] == "failed" and not refused["dry_run"]


def test_a_repeat_asked_for_is_applied_and_recorded(sqlite_url: str) -> None:
    engine = seeded(sqlite_url, items=60)
    assert run_patch(sqlite_url, PRICE_JOB, PCT8).success
    once = prices(engine)
    assert run_patch(sqlite_url, PRICE_JOB, {**PCT8, "allow_repeat": True}).success
    twice = prices(engine)
    assert twice != once
    ex = latest_execution(engine)
    assert ex["config"]["allow_repeat"] is True
    assert ex["report"]["repeat_allowed"]["of"]


def test_rows_the_earlier_run_did_not_change_are_not_a_repeat(sqlite_url: str) -> None:
    # Same config, but the earlier run changed none of today's targets (a price band it left).
    seeded(sqlite_url, items=60)
    band = {**PCT8, "min_price": 0, "max_price": 100}
    first = run_patch(sqlite_url, PRICE_JOB, band)
    assert first.success
    with get_engine(sqlite_url).begin() as conn:
        conn.exec_driver_sql("UPDATE inventories SET price = 50 WHERE id = 1")
    ex_before = latest_execution(get_engine(sqlite_url))
    changed = ex_before["report"]["committed"]["inventories_updated"]
    result = run_patch(sqlite_url, PRICE_JOB, band)
    if changed:  # the band's rows changed once; +8 % kept some of them in the band
        assert not result.success or "refused as a repeat" not in failure_description(result)


def test_a_second_real_run_for_the_same_release_is_refused(sqlite_url: str) -> None:
    engine = seeded(sqlite_url, items=60)
    assert run_patch(sqlite_url, PRICE_JOB, {**PCT8, "release": "v2.14.0"}).success
    other = {"adjustment_type": "fixed_amount", "adjustment_value": 10, "dry_run": False}
    result = run_patch(sqlite_url, PRICE_JOB, {**other, "release": "v2.14.0"})
    assert not result.success
    assert "already ran for release 'v2.14.0'" in failure_description(result)
    assert run_patch(sqlite_url, PRICE_JOB, {**other, "release": "v2.15.0"}).success
    assert latest_execution(engine)["phase"] == "verified"


@pytest.mark.parametrize("release", ["v1\nv2", "x" * 300])
def test_a_release_is_one_bounded_line(sqlite_url: str, release: str) -> None:
    seeded(sqlite_url, items=5)
    result = run_patch(sqlite_url, PRICE_JOB, {**PCT8, "release": release}, approve=False)
    assert not result.success
    assert "release must be one line of printable characters" in failure_description(result)
