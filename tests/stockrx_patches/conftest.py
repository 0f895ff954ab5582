"""Fixtures of the sensor tests (test_sensors.py, test_work_pending_sensor.py,
test_failure_sensor.py): a clock the test moves, the Dagster instance of the test's DAGSTER_HOME,
and the StockRx database resource on the test's SQLite file. Here so the three modules share one
definition; the tick and launch helpers are in tests/support/sensor_ticks.py."""

from __future__ import annotations

import pytest
from dagster import DagsterInstance

from resources.database import StockRxDatabase
from tests.conftest import TEST_NOW_ENV
from tests.support.sensor_ticks import SUN_0230


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch):
    def set_clock(iso: str) -> None:
        monkeypatch.setenv(TEST_NOW_ENV, iso)

    set_clock(SUN_0230)
    return set_clock


@pytest.fixture
def instance(dagster_home):
    with DagsterInstance.get() as inst:
        yield inst


@pytest.fixture
def db(sqlite_url, monkeypatch):
    monkeypatch.setenv("STOCKRX_DATABASE_URL", sqlite_url)  # run config validation reads it
    return StockRxDatabase(url=sqlite_url)
