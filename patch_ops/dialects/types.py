"""Column types whose storage differs by database, so the tables that use them need not ask.

``UTCDateTime`` keeps timestamps timezone-aware UTC in Python, with microseconds, everywhere:
PostgreSQL stores the offset (``features.stores_utc_offset``), the others store naive UTC
(never local time); MySQL/MariaDB need ``DATETIME(6)`` for the microseconds. ``LONG_TEXT`` is
unbounded text (MySQL's ``TEXT`` stops at 64 KB). MySQL has no dialect class here, so its
choices are SQLAlchemy type variants, kept in this file with the other dialect differences.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, Text
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from patch_ops.dialects import dialect_of

_MYSQL = ("mysql", "mariadb")

#: Text of any length: ``LONGTEXT`` on MySQL/MariaDB, plain ``TEXT`` elsewhere.
LONG_TEXT = Text().with_variant(mysql.LONGTEXT(), *_MYSQL)


def to_utc(value: datetime) -> datetime:
    """Aware UTC; a naive datetime is taken to be UTC already (that is how it is stored)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes in and out, with microseconds, on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        # Returned untranslated: TypeDecorator resolves the variant for ``dialect`` itself.
        portable = dialect_of(dialect).utc_datetime_type()
        return portable.with_variant(mysql.DATETIME(fsp=6), *_MYSQL)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = to_utc(value)
        if dialect_of(dialect).features.stores_utc_offset:
            return value
        return value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else to_utc(value)
