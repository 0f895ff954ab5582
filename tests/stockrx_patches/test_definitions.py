"""The code location (stockrx_patches.definitions) loads cleanly."""

from __future__ import annotations

import subprocess
import sys


def test_loading_the_code_location_gives_no_beta_warning() -> None:
    # Every op process loads the code location: Dagster's `owners` BetaWarning came once per
    # step of every run.
    code = (
        "import warnings, dagster\n"
        "warnings.filterwarnings('error', category=dagster.BetaWarning)\n"
        "import stockrx_patches.definitions\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "BetaWarning" not in done.stderr
