"""The StockRx database as a Dagster resource.

The URL comes from ``STOCKRX_DATABASE_URL`` through ``dagster.EnvVar`` (bound in definitions.py),
so it is read at run time and never stored in run config. Only the password-free form of the URL
is ever logged.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from dagster import ConfigurableResource
from pydantic import Field
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


class DatabaseUnavailable(RuntimeError):
    """The StockRx database cannot be reached or its URL is malformed."""


def redact_url(url: str) -> str:
    """The URL with its password masked, safe for logs and error messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<malformed database URL>"


def _configure_sqlite(engine: Engine) -> None:
    # pysqlite's own transaction handling is replaced by explicit BEGINs. Reads use a deferred
    # BEGIN (WAL: readers never block). Write transactions (write_transaction) take the write
    # lock up front with BEGIN IMMEDIATE and wait for it, instead of failing at once with
    # "database is locked" when a read lock cannot be upgraded.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys = ON")
        cur.execute("PRAGMA busy_timeout = 60000")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # type: ignore[no-untyped-def]
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {'IMMEDIATE' if mode == 'IMMEDIATE' else 'DEFERRED'}")


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that will write: on SQLite it holds the write lock from its first statement."""
    with engine.connect() as conn:
        conn.execution_options(sqlite_begin="IMMEDIATE")
        with conn.begin():
            yield conn


def get_engine(url: str) -> Engine:
    """One engine per URL per process (ops run in their own processes and rebuild resources)."""
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            try:
                parsed = make_url(url)
            except ArgumentError as exc:
                raise DatabaseUnavailable(f"invalid database URL {redact_url(url)}") from exc
            kwargs: dict = {"future": True}
            if parsed.get_backend_name() != "sqlite":
                kwargs.update(pool_pre_ping=True, pool_size=5, max_overflow=5)
            engine = create_engine(parsed, **kwargs)
            if parsed.get_backend_name() == "sqlite":
                _configure_sqlite(engine)
            _engines[url] = engine
        return engine


def check_connection(engine: Engine) -> None:
    """Fail with a clear, password-free message if the database cannot be reached."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        password = engine.url.password
        if password:
            reason = reason.replace(str(password), "***")
        raise DatabaseUnavailable(
            f"cannot connect to the StockRx database {engine.url.render_as_string(True)}: "
            f"{reason}"
        ) from None


class StockRxDatabase(ConfigurableResource):
    """The StockRx database that patches read and change (SQLite, PostgreSQL or MySQL)."""

    url: str = Field(
        description="SQLAlchemy URL of the StockRx database, e.g. "
        "postgresql+psycopg://user:pass@host/stockrx. Bind it with EnvVar('STOCKRX_DATABASE_URL').",
    )

    def get_engine(self) -> Engine:
        return get_engine(self.url)

    @property
    def safe_url(self) -> str:
        return redact_url(self.url)
