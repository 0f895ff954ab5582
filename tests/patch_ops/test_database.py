"""Engines for the StockRx database (patch_ops.database): bad URLs are one clear line."""

from __future__ import annotations

import pytest

from patch_ops.database import DatabaseUnavailable, get_engine, redact_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("foo://bar", "unknown kind of database 'foo'"),
        ("mssql+pymssql://u:s3cr3t@127.0.0.1/x", "driver for 'mssql+pymssql' is not installed"),
        ("not a url", "invalid database URL"),
    ],
)
def test_a_url_that_cannot_make_an_engine_is_one_clear_line(url: str, expected: str) -> None:
    with pytest.raises(DatabaseUnavailable) as info:
        get_engine(url)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert "s3cr3t" not in message


def test_the_password_is_masked() -> None:
    assert redact_url("postgresql+psycopg://u:s3cr3t@h/db") == "postgresql+psycopg://u:***@h/db"


def test_a_mysql_url_whose_driver_is_missing_is_one_clear_line() -> None:
    """mysqlclient (mysql+mysqldb) is optional: PyMySQL is the default driver."""
    try:
        import MySQLdb  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("mysqlclient is installed here")
    with pytest.raises(DatabaseUnavailable) as info:
        get_engine("mysql+mysqldb://patcher:s3cr3t@127.0.0.1/stockrx")
    message = str(info.value)
    assert "the database driver for 'mysql+mysqldb' is not installed" in message
    assert "s3cr3t" not in message and "\n" not in message
