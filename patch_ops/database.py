"""Engines and transactions for the StockRx database: one engine per URL per process, write
transactions that hold their lock from the first statement, clear password-free errors.

The password is never shown: only ``redact_url``'s form of the URL goes into messages. The URL's
``framework_schema`` parameter (``patch_ops.dialects.names``) is the engine's, not the driver's.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import MetaData, create_engine, inspect, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from patch_ops.dialects import UnsupportedServer, dialect_for_url, dialect_of
from patch_ops.dialects.names import URL_PARAMETER, framework_schema, translate_map
from patch_ops.dialects.types import framework_ddl

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def _forget_pooled_connections() -> None:
    """In a forked child: the parent's pooled connections are the parent's (sharing a socket
    corrupts both); the child opens its own (SQLAlchemy's advice for os.fork)."""
    global _engines_lock
    _engines_lock = threading.Lock()
    for engine in _engines.values():
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_pooled_connections)


class DatabaseUnavailable(RuntimeError):
    """The StockRx database cannot be reached or its URL is malformed."""


def redact_url(url: str) -> str:
    """The URL with its password masked, safe for logs and error messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<malformed database URL>"


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that will write: on SQLite it holds the write lock from its first statement."""
    with engine.connect() as conn:
        conn.execution_options(sqlite_begin="IMMEDIATE")
        with conn.begin():
            yield conn


def create_tables(engine: Engine, metadata: MetaData) -> None:
    """Create ``metadata``'s missing framework tables (``framework_ddl``: a missing privilege
    is one line) in a write transaction: on SQLite a deferred one that looked for a table and
    then creates it fails at once ("database is locked") when the application wrote between."""
    with framework_ddl(engine), write_transaction(engine) as conn:
        metadata.create_all(conn, checkfirst=True)


def get_engine(url: str) -> Engine:
    """One engine per URL per process (ops run in their own processes and rebuild resources)."""
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            try:
                parsed = make_url(url)
            except ArgumentError as exc:
                raise DatabaseUnavailable(f"invalid database URL {redact_url(url)}") from exc
            schema = parsed.query.get(URL_PARAMETER)
            parsed = parsed.difference_update_query([URL_PARAMETER])
            dialect = dialect_for_url(parsed)
            scheme = redact_url(url).split("://", 1)[0]
            if schema is not None and not (
                isinstance(schema, str) and schema.strip() and dialect.features.schemas
            ):
                raise DatabaseUnavailable(
                    f"{URL_PARAMETER} in the URL {redact_url(url)}: "
                    + ("give one schema name" if dialect.features.schemas
                       else f"{scheme} has no schemas (use PostgreSQL or MySQL/MariaDB)")
                )
            try:
                engine = create_engine(parsed, future=True, **dialect.engine_options())
            except NoSuchModuleError:
                raise DatabaseUnavailable(
                    f"unknown kind of database {scheme!r} in the URL "
                    f"{redact_url(url)} (supported: sqlite, postgresql+psycopg, mysql+pymysql)"
                ) from None
            except ImportError as exc:
                raise DatabaseUnavailable(
                    f"the database driver for {scheme!r} is not installed "
                    f"(No module named {exc.name!r}); URL {redact_url(url)}"
                ) from None
            dialect.configure(engine)
            engine = engine.execution_options(schema_translate_map=translate_map(schema))
            _engines[url] = engine
        return engine


def require_database(engine: Engine) -> None:
    """Fail, before anything connects, when the database plainly does not exist: connecting
    would create it (a SQLite file)."""
    problem = dialect_of(engine).missing_database(engine.url)
    if problem:
        raise DatabaseUnavailable(
            f"the StockRx database {engine.url.render_as_string(True)}: {problem}"
        )


def check_connection(engine: Engine, create: bool = False) -> None:
    """Fail with a clear, password-free message if the database does not exist (unless
    ``create``: seeding a new demo database), cannot be reached, or its server cannot run
    patches safely (``DatabaseDialect.check_server``)."""
    if not create:
        require_database(engine)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            dialect_of(conn).check_server(conn)
            schema = framework_schema(conn)
            if schema and schema not in inspect(conn).get_schema_names():
                raise UnsupportedServer(
                    f"the framework schema {schema!r} ({URL_PARAMETER} in the URL) does not "
                    "exist: create it and grant the patch user its privileges (README, "
                    "'Against MySQL'), or leave the parameter out"
                )
    except UnsupportedServer as exc:
        raise DatabaseUnavailable(
            f"the StockRx database {engine.url.render_as_string(True)}: {exc}"
        ) from None
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        password = engine.url.password
        if password:
            reason = reason.replace(str(password), "***")
        raise DatabaseUnavailable(
            f"cannot connect to the StockRx database {engine.url.render_as_string(True)}: "
            f"{reason}"
        ) from None
