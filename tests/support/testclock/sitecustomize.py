"""The test suite's frozen clock, set below the product.

``STOCKRX_TEST_NOW`` (an ISO 8601 instant with its UTC offset) replaces the system clock that
``patch_ops.windows.now()`` reads, in the pytest process (tests/conftest.py calls ``install``) and
in every Python process the tests start (CLI runs, the daemon, the webserver's code servers,
Dagster's step processes): this folder is first on their PYTHONPATH, so Python imports this
module at start-up. The product's own fixed clock (``STOCKRX_PATCHES_CLOCK``) is an override a
real run must declare (``allow_outside_window``); the tests' clock is not the product's to see,
as a frozen system clock would not be. Tests move it by setting the variable; it is read on
every call.
"""

from __future__ import annotations

import datetime as dt
import os

ENV = "STOCKRX_TEST_NOW"


def frozen_now() -> dt.datetime:
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return dt.datetime.now(dt.UTC)
    return dt.datetime.fromisoformat(raw).astimezone(dt.UTC)


def install() -> bool:
    """Freeze ``patch_ops.windows.system_now``; False where the project is not importable."""
    try:
        from patch_ops import windows
    except ImportError:
        return False
    windows.system_now = frozen_now  # type: ignore[assignment]
    return True


if os.environ.get(ENV):
    install()
