"""The code location (stockrx_patches.definitions) loads cleanly.

Both tests read one fresh interpreter's load of it (``load``): a Python start and the import of
dagster and the code location cost seconds; the load is the same for both questions."""

from __future__ import annotations

import subprocess
import sys

import pytest

#: Imported only by the op processes (from the fork server's preload), never by the processes
#: that load the code location to build and launch jobs: the CLI, the webserver, the daemon.
OPS_ONLY = ("pandas", "numpy", "pandera", "pyarrow")

#: Loads the code location as `dagster job execute -m stockrx_patches.definitions` does; prints
#: each BetaWarning the import gives (``beta:``; then IMPORTED on stderr: resolving the jobs
#: afterwards is not part of that test), and for every OPS_ONLY module it imports, the chain of
#: our modules that imported it.
IMPORTED = "--- stockrx_patches.definitions imported ---"
LOAD_AND_TRACE = """
import importlib.abc, sys, traceback, warnings
OPS_ONLY = %r
IMPORTED = %r
class Tracer(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in OPS_ONLY and name not in sys.modules:
            ours = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()[:-1]
                    if "site-packages" not in f.filename and "<" not in f.filename]
            print(name, "imported by", " <- ".join(reversed(ours)))
        return None
sys.meta_path.insert(0, Tracer())
import dagster
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", dagster.BetaWarning)
    import stockrx_patches.definitions
for w in caught:
    if issubclass(w.category, dagster.BetaWarning):
        print("beta:", w.filename, w.lineno, str(w.message).replace(chr(10), " "))
print(IMPORTED, file=sys.stderr, flush=True)
defs = stockrx_patches.definitions.defs
defs.resolve_all_job_defs()  # nor does resolving its jobs
print("loaded:", *[m for m in OPS_ONLY if m in sys.modules])
"""


@pytest.fixture(scope="module")
def load() -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", LOAD_AND_TRACE % (OPS_ONLY, IMPORTED)],
                          capture_output=True, text=True)


def test_loading_the_code_location_gives_no_beta_warning(
    load: subprocess.CompletedProcess[str],
) -> None:
    # Every op process loads the code location: Dagster's `owners` BetaWarning came once per
    # step of every run.
    assert load.returncode == 0, load.stderr[-2000:]
    assert [line for line in load.stdout.splitlines() if line.startswith("beta:")] == []
    assert IMPORTED in load.stderr
    assert "BetaWarning" not in load.stderr.split(IMPORTED)[0]  # the import's, not the jobs'


def test_loading_the_code_location_imports_no_pandas_or_pandera(
    load: subprocess.CompletedProcess[str],
) -> None:
    # ~1 s of every `dagster job execute` and of the webserver's and daemon's loads: they only
    # build jobs. A patch imports pandas/numpy inside transform() and declares its pandera
    # schemas with lazy_declaration (README, "Writing a patch").
    assert load.returncode == 0, load.stderr[-2000:]
    assert load.stdout.strip().splitlines()[-1] == "loaded:", load.stdout
