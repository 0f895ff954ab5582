"""Bad input on MySQL/MariaDB, through a patch run as the release script starts it: a server that
refuses the connection, a wrong password, a database without the StockRx tables, a server with
``local_infile`` off. Each is one clear line (password masked) with nothing written, or a
documented fallback. (Lock wait timeouts and servers too old to enforce CHECK constraints:
test_mysql_dialect.py; a MySQL URL whose driver is missing: test_database.py.)"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import func, inspect, select
from sqlalchemy.engine import make_url

from patch_ops.database import get_engine
from patch_ops.dialects import mysql_rows
from stockrx_patches.tables import inventory_logs
from tests.support.mysql import MySQLServer
from tests.support.postgres import free_port
from tests.support.stockrx import (
    PRICE_JOB,
    failure_description,
    hand_built,
    latest_execution,
    prices,
    run_patch,
)

pytestmark = pytest.mark.mysql

PCT8 = {"adjustment_type": "percentage", "adjustment_value": 8, "dry_run": False}


def refused_in_one_line(url: str, *secrets: str) -> str:
    result = run_patch(url, PRICE_JOB, PCT8)
    assert not result.success
    message = failure_description(result)
    assert "\n" not in message.strip()
    for secret in secrets:
        assert secret not in message
        assert all(secret not in str(event) for event in result.all_events)
    return message


def test_a_server_that_refuses_the_connection() -> None:
    url = f"mysql+pymysql://patcher:s3cret-pw@127.0.0.1:{free_port()}/stockrx"
    message = refused_in_one_line(url, "s3cret-pw")
    assert "cannot connect to the StockRx database" in message
    assert "mysql+pymysql://patcher:***@127.0.0.1" in message


def test_a_wrong_password(mysql_url: str) -> None:
    right = str(make_url(mysql_url).password)
    wrong = make_url(mysql_url).set(password="not-the-password-42").render_as_string(False)
    message = refused_in_one_line(wrong, "not-the-password-42", right)
    assert "cannot connect to the StockRx database" in message and "Access denied" in message


def test_a_database_without_the_stockrx_tables_is_left_empty(mysql_url: str) -> None:
    message = refused_in_one_line(mysql_url, str(make_url(mysql_url).password))
    assert "table(s) not found in the StockRx database" in message
    assert "inventories" in message and "is this the StockRx database?" in message
    assert inspect(get_engine(mysql_url)).get_table_names() == []


@pytest.fixture
def local_infile_off(mysql_server: MySQLServer, mysql_url: str) -> Iterator[str]:
    """The server with LOAD DATA LOCAL disabled (MySQL 8's default), for this test only."""
    with mysql_server.admin_connection() as conn, conn.cursor() as cur:
        cur.execute("SET GLOBAL local_infile = 0")
    try:
        yield mysql_url
    finally:
        with mysql_server.admin_connection() as conn, conn.cursor() as cur:
            cur.execute("SET GLOBAL local_infile = 1")


def test_a_server_with_local_infile_off_gets_multi_row_inserts(local_infile_off: str) -> None:
    engine = hand_built(local_infile_off, [100, 200, 300])
    logs = select(func.count()).select_from(inventory_logs)
    with engine.connect() as conn:
        assert not mysql_rows.local_infile_ready(conn)
        logs_before = conn.execute(logs).scalar_one()
    result = run_patch(local_infile_off, PRICE_JOB, PCT8)
    assert result.success, failure_description(result)
    assert latest_execution(engine)["phase"] == "verified"
    assert sorted(prices(engine).values()) == [108.0, 216.0, 324.0]
    with engine.connect() as conn:
        assert conn.execute(logs).scalar_one() == logs_before + 3  # one log row per item
