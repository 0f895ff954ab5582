"""The dialect layer: every SQL difference between the databases, behind one interface.

``dialect_of(bind)`` gives the :class:`DatabaseDialect` of an engine, a connection or a
SQLAlchemy dialect: one implementation per database, registered by SQLAlchemy's dialect name.
Nothing outside this package reads a dialect's name, driver or flavour flags (a test checks).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import URL, Connection, Dialect, Engine

from patch_ops.dialects.base import (
    DatabaseDialect,
    Features,
    MissingPrivilege,
    StagedInserts,
    UnsupportedServer,
)
from patch_ops.dialects.mysql import MariaDBDialect, MySQLDialect
from patch_ops.dialects.postgresql import PostgreSQLDialect
from patch_ops.dialects.sqlite import SQLiteDialect

__all__ = [
    "DatabaseDialect",
    "Features",
    "MissingPrivilege",
    "StagedInserts",
    "UnsupportedServer",
    "dialect_of",
    "dialect_for_url",
]

_DIALECTS: dict[str, DatabaseDialect] = {
    d.name: d for d in (SQLiteDialect(), PostgreSQLDialect(), MySQLDialect(), MariaDBDialect())
}
_DEFAULT = DatabaseDialect()


def dialect_for_url(url: URL) -> DatabaseDialect:
    """The dialect implementation of a database URL (before any engine exists)."""
    return _DIALECTS.get(url.get_backend_name(), _DEFAULT)


def dialect_of(bind: Engine | Connection | Dialect | Any) -> DatabaseDialect:
    """The dialect implementation of an engine, a connection or a SQLAlchemy dialect."""
    sa_dialect = bind if isinstance(bind, Dialect) else bind.dialect
    return _DIALECTS.get(sa_dialect.name, _DEFAULT)
