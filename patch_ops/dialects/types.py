"""Column types and table options whose storage differs by database, so the tables that use them
need not ask.

``UTCDateTime`` keeps timestamps timezone-aware UTC in Python, with microseconds, everywhere:
PostgreSQL stores the offset (``features.stores_utc_offset``), the others store naive UTC
(never local time); MySQL/MariaDB need ``DATETIME(6)`` for the microseconds
(``DatabaseDialect.utc_datetime_type``). ``DATETIME_US`` is a naive UTC datetime with
microseconds (the framework's own timestamps; Rails' ``datetime(6)``). ``LONG_TEXT`` is unbounded
text (MySQL's ``TEXT`` stops at 64 KB). ``key_string`` is a short text key (an execution's id, a
table's name) compared byte for byte; ``EXECUTION_KEY`` an execution's id in the bulk tables'
keys. ``TABLE_OPTIONS`` are the keyword arguments every table
the framework (or the demo schema) creates passes to ``Table``: InnoDB and utf8mb4 on MySQL and
MariaDB, ignored elsewhere. Column types are fixed when a ``Table`` is defined, before any
connection, so the MySQL choices here are SQLAlchemy type variants. ``UTC_NOW`` is the server's
current time in UTC, for column defaults (rows that release tooling inserts by hand).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, String, Table, Text
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator

from patch_ops.dialects import MissingPrivilege, dialect_of
from patch_ops.dialects.names import URL_PARAMETER, framework_schema

_MYSQL = ("mysql", "mariadb")

#: Text of any length: ``LONGTEXT`` on MySQL/MariaDB, plain ``TEXT`` elsewhere.
LONG_TEXT = Text().with_variant(mysql.LONGTEXT(), *_MYSQL)

#: A naive (UTC) datetime with microseconds: ``DATETIME(6)`` on MySQL/MariaDB (plain
#: ``DATETIME`` drops the fraction), ``DateTime`` elsewhere.
DATETIME_US = DateTime().with_variant(mysql.DATETIME(fsp=6), *_MYSQL)


def key_string(length: int) -> Any:
    """A short text key of the framework's tables (an execution's id, a table's name, an action),
    compared byte for byte: ``utf8mb4_bin`` on MySQL/MariaDB, whose linguistic collations slow
    every key comparison of a bulk insert (benchmarks/README.md, session 24). PostgreSQL and
    SQLite keep their database's collation: PostgreSQL refuses to compare two columns of
    different collations, as a database whose tables were made before this would hold."""
    return String(length).with_variant(
        mysql.VARCHAR(length, charset="utf8mb4", collation="utf8mb4_bin"), *_MYSQL
    )


#: An execution's id where it leads the key of the framework's bulk tables (the frozen targets,
#: the backup and stage mirrors): PostgreSQL's 16-byte ``uuid`` (bound and read as text), a
#: third cheaper to write than ``varchar(36)`` (benchmarks/README.md, session 30); elsewhere
#: ``key_string(36)``. Tables an earlier version made get it at their next use
#: (``patch_ops.state.narrow_execution_keys``).
EXECUTION_KEY: Any = key_string(36).with_variant(postgresql.UUID(as_uuid=False), "postgresql")


#: ``Table(..., **TABLE_OPTIONS)``: InnoDB (transactions, row locks, foreign keys) and utf8mb4 on
#: MySQL and MariaDB (SQLAlchemy reads each dialect's own prefix); other databases ignore them.
TABLE_OPTIONS: dict[str, Any] = {
    f"{prefix}_{option}": value
    for prefix in _MYSQL
    for option, value in (("engine", "InnoDB"), ("charset", "utf8mb4"))
}


class UTCNow(FunctionElement[Any]):
    """The current time as naive UTC with microseconds, whatever the session's time zone (the
    SQL standard's CURRENT_TIMESTAMP is local time on PostgreSQL and MySQL)."""

    type = DateTime()
    inherit_cache = True


@compiles(UTCNow)
def _utc_now(element: UTCNow, compiler: SQLCompiler, **kw: Any) -> str:
    return "CURRENT_TIMESTAMP"  # SQLite: always UTC


@compiles(UTCNow, "postgresql")
def _utc_now_postgresql(element: UTCNow, compiler: SQLCompiler, **kw: Any) -> str:
    return "timezone('UTC', now())"


@compiles(UTCNow, *_MYSQL)
def _utc_now_mysql(element: UTCNow, compiler: SQLCompiler, **kw: Any) -> str:
    return "UTC_TIMESTAMP(6)"  # as a column default: DEFAULT (UTC_TIMESTAMP(6)), 8.0.13+


@contextmanager
def framework_ddl(bind: Any) -> Iterator[None]:
    """Around the DDL that makes or widens framework tables: a missing privilege becomes one
    line that says where the tables go and what to grant, instead of the server's SQL dump."""
    try:
        yield
    except DBAPIError as exc:
        if not dialect_of(bind).is_privilege_error(exc):
            raise
        schema = framework_schema(bind)
        where = f"schema {schema!r}" if schema else "the StockRx database's default schema"
        reason = str(exc.orig).strip().splitlines()[0]
        raise MissingPrivilege(
            f"the database user may not create the framework's tables in {where} ({reason}): "
            "grant it CREATE there, or give the framework a schema of its own with "
            f"{URL_PARAMETER} in the URL (README, 'Against MySQL')"
        ) from None


def mirror_table_options(live: Table) -> dict[str, Any]:
    """``TABLE_OPTIONS`` for a table that mirrors the reflected table ``live``, with ``live``'s
    own character set and collation: its text columns then compare with the live ones (MySQL
    refuses to compare columns of two collations: "Illegal mix of collations")."""
    options = dict(TABLE_OPTIONS)
    found = {k.split("_", 1)[1]: v for k, v in live.kwargs.items() if k.split("_", 1)[0] in _MYSQL}
    charset = found.get("default charset") or found.get("charset")
    for prefix in _MYSQL:
        if charset:
            options[f"{prefix}_charset"] = charset
        if found.get("collate"):
            options[f"{prefix}_collate"] = found["collate"]
    return options


def to_utc(value: datetime) -> datetime:
    """Aware UTC; a naive datetime is taken to be UTC already (that is how it is stored)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes in and out, with microseconds, on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        return dialect_of(dialect).utc_datetime_type()

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = to_utc(value)
        if dialect_of(dialect).features.stores_utc_offset:
            return value
        return value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else to_utc(value)
