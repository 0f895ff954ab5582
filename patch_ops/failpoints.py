"""Failpoints: named places where a test may stop a run to kill it there (as FoundationDB's
and TiKV's failpoints do), for the crash tests' fault matrix.

Off unless ``STOCKRX_FAILPOINT`` names a point: the process reaching it writes its pid to the
file ``STOCKRX_FAILPOINT_FILE`` and waits to be killed (``SIGKILL``: no cleanup code runs) or
stopped (SIGINT, Terminate: tests/test_stop.py), so the test acts exactly there instead of
guessing with timing. Points: ``after:<op name>`` (an op's work done, its output not yet handed
on), ``transform:batch:<n>`` (batch n handed to the stage writer), ``validate:inside`` (the
whole-set checks done and recorded, the step not finished), ``commit:inside`` (data applied and
audited, transaction not committed), ``commit:after`` (committed, nothing recorded after it
yet), ``restore:inside``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

FAILPOINT_ENV = "STOCKRX_FAILPOINT"
FAILPOINT_FILE_ENV = "STOCKRX_FAILPOINT_FILE"
#: How long a process waits at its failpoint for the kill before going on (a test that forgot
#: to kill it must not hang forever).
WAIT_SECONDS = 600.0


def failpoint(name: str) -> None:
    """Stop here (until killed) if the environment names this failpoint; else nothing."""
    if os.environ.get(FAILPOINT_ENV) != name:
        return
    path = Path(os.environ[FAILPOINT_FILE_ENV])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(os.getpid()))
    tmp.replace(path)  # the test sees the whole pid or nothing
    time.sleep(WAIT_SECONDS)
