"""How the audit functions get a connection: the caller's, or one of their own.

Every public function takes a ``Bind``. On a Connection it works in the caller's transaction
(an event commits or rolls back with the change it records); on an Engine it opens its own.
Reads take one consistent snapshot where the database offers it (the dialect layer decides).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import Connection, Engine

from patch_ops.database import write_transaction
from patch_ops.dialects import dialect_of

Bind = Engine | Connection


@contextmanager
def transaction(bind: Bind) -> Iterator[Connection]:
    """The caller's connection as is, or a new write transaction on the engine (committed on
    exit; on SQLite it holds the write lock from its first statement, so reading the chain's
    head and then appending cannot fail when the application wrote in between)."""
    if isinstance(bind, Engine):
        with write_transaction(bind) as conn:
            yield conn
    else:
        yield bind


@contextmanager
def read_snapshot(bind: Bind) -> Iterator[Connection]:
    """For reads: the caller's connection as is, or a read transaction on the engine that sees
    one consistent snapshot where the backend offers it (``DatabaseDialect.snapshot``)."""
    if isinstance(bind, Connection):
        yield bind
        return
    with bind.connect() as conn:
        conn = dialect_of(conn).snapshot(conn)
        with conn.begin():
            yield conn
