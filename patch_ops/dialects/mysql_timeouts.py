"""Statement time limits on MySQL 8 and MariaDB: a watchdog that cancels a connection's statement
once it has run past the limit.

Neither server has one way to limit every statement of a transaction: MySQL 8's
``MAX_EXECUTION_TIME`` (milliseconds) covers read-only SELECTs only, MariaDB's
``max_statement_time`` (seconds) is a session variable that would outlive the transaction in
the pool. So the limit is kept on the client: before each statement of the watched
``Connection`` a timer starts; when it expires, a second connection sends
``KILL QUERY <connection id>`` (a user may kill its own connections' statements without any
privilege) and the statement fails with error 1317. A statement the timer fired for always
fails, also when the server finished it in the same instant, or when MySQL lets an interrupted
``SLEEP()`` return 1 instead of failing: whatever reached the limit counts as timed out.
"""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

#: Query execution was interrupted (``KILL QUERY``).
ER_QUERY_INTERRUPTED = 1317
#: MariaDB: max_statement_time exceeded.
ER_STATEMENT_TIMEOUT = 1969
#: MySQL 8: maximum statement execution time exceeded (MAX_EXECUTION_TIME).
ER_QUERY_TIMEOUT = 3024
TIMEOUT_CODES = frozenset({ER_QUERY_INTERRUPTED, ER_STATEMENT_TIMEOUT, ER_QUERY_TIMEOUT})


class StatementWatchdog:
    """Cancels any statement of one connection (server id ``connection_id``) that runs longer
    than ``seconds``, until the connection's transaction ends."""

    def __init__(self, engine: Engine, connection_id: int, seconds: float, dbapi_error: Any):
        self.engine = engine
        self.connection_id = int(connection_id)
        self.seconds = seconds
        self.dbapi_error = dbapi_error  # the driver's OperationalError class
        self.active = True
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._statement = 0  # number of the statement running (or last run)
        self._fired = -1  # number of the last statement the timer fired for

    def watch(self, conn: Connection) -> None:
        """Listen to ``conn``'s statements until its transaction commits or rolls back."""
        event.listen(conn, "before_cursor_execute", self._before)
        event.listen(conn, "after_cursor_execute", self._after)
        event.listen(conn, "commit", self._end)
        event.listen(conn, "rollback", self._end)

    # -- events ----------------------------------------------------------------------------------
    def _before(self, *_: Any) -> None:
        with self._lock:
            if not self.active:
                return
            if self._timer is not None:  # the last statement failed: no after-event came
                self._timer.cancel()
            self._statement += 1
            timer = threading.Timer(self.seconds, self._expire, (self._statement,))
            timer.daemon = True
            self._timer = timer
            timer.start()

    def _after(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if self._stop():
            raise self.dbapi_error(
                ER_QUERY_INTERRUPTED,
                f"Query execution was interrupted (statement time limit of {self.seconds:g} s)",
            )

    def _end(self, _conn: Any) -> None:
        with self._lock:
            self.active = False
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    # -- the timer -------------------------------------------------------------------------------
    def _stop(self) -> bool:
        """The running statement has ended: cancel its timer; True if the timer fired for it."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return self._fired == self._statement

    def _expire(self, statement: int) -> None:
        # The lock is held while KILL QUERY is sent, so the kill can only reach this statement:
        # the next one cannot start (its before-event waits for the lock) until the kill is done.
        with self._lock:
            if not self.active or statement != self._statement or self._timer is None:
                return
            self._fired = statement
            kill_query(self.engine, self.connection_id)


def kill_query(engine: Engine, connection_id: int) -> None:
    """Cancel the statement the server's connection ``connection_id`` runs, from a connection
    of its own (none running, or no connection to be had: nothing happens)."""
    try:
        raw = engine.raw_connection()
    except Exception:  # no connection for the kill: the statement runs on
        return
    try:
        cursor = raw.cursor()
        cursor.execute(f"KILL QUERY {int(connection_id)}")
        cursor.close()
    except Exception:  # the statement already ended (1094): nothing to kill
        pass
    finally:
        raw.close()
