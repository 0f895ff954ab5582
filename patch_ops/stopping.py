"""Stop requests: Ctrl-C on ``dagster job execute`` (SIGINT), SIGTERM, Terminate in the Dagster UI.

Dagster delivers every one of them to a step's process as SIGINT (the run worker forwards the
stop to its step processes; a terminal's Ctrl-C also reaches them directly), and its own handler
raises at whatever line the step is on. ``stoppable`` replaces that handler while an op runs:

- the first signal raises ``KeyboardInterrupt`` where the step is, so the open transaction rolls
  back (the transform's last finished batch and its cursor are already committed). Dagster treats
  it as it does its own ``DagsterExecutionInterruptedError`` (the step is interrupted); psycopg,
  unlike with Dagster's error, also cancels the statement running in the server, so the
  connection rolls back at once instead of leaving a busy transaction behind;
- later signals are ignored: the stop is under way, and recording it (execution closed, locks
  released, audit, message) must not be cut short by the second SIGINT that a Ctrl-C always
  brings (the terminal's and the run worker's).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

#: The signals that stop a step (Dagster maps SIGTERM to its SIGINT handler; so do we).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class StopRequest:
    """The first stop signal an op received (None: none yet)."""

    signal: str | None = None
    at: dt.datetime | None = None


@contextlib.contextmanager
def stoppable() -> Iterator[StopRequest]:
    """While inside: the first SIGINT/SIGTERM raises ``KeyboardInterrupt`` and is recorded in
    the yielded ``StopRequest``; later ones are ignored. The previous handlers come back on
    exit. Outside the main thread (no signal handlers there) it records nothing."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signo: int, _frame: FrameType | None) -> None:
        if stop.signal is None:
            stop.signal = signal.Signals(signo).name
            stop.at = dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0)
            raise KeyboardInterrupt(f"stopped by {stop.signal}")

    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        for s in STOP_SIGNALS:
            signal.signal(s, handler)
        yield stop
    finally:
        for s, old in previous.items():
            if old is not None:
                signal.signal(s, old)
