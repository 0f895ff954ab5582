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


#: Imported only by the op processes (from the fork server's preload), never by the processes
#: that load the code location to build and launch jobs: the CLI, the webserver, the daemon.
OPS_ONLY = ("pandas", "numpy", "pandera", "pyarrow")

#: Loads the code location as `dagster job execute -m stockrx_patches.definitions` does, and
#: prints, for every OPS_ONLY module it imports, the chain of our modules that imported it.
LOAD_AND_TRACE = """
import importlib.abc, sys, traceback
OPS_ONLY = %r
class Tracer(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in OPS_ONLY and name not in sys.modules:
            ours = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()[:-1]
                    if "site-packages" not in f.filename and "<" not in f.filename]
            print(name, "imported by", " <- ".join(reversed(ours)))
        return None
sys.meta_path.insert(0, Tracer())
import stockrx_patches.definitions
defs = stockrx_patches.definitions.defs
defs.resolve_all_job_defs()  # nor does resolving its jobs
print("loaded:", *[m for m in OPS_ONLY if m in sys.modules])
"""


def test_loading_the_code_location_imports_no_pandas_or_pandera() -> None:
    # ~1 s of every `dagster job execute` and of the webserver's and daemon's loads: they only
    # build jobs. A patch imports pandas/numpy inside transform() and declares its pandera
    # schemas with lazy_declaration (README, "Writing a patch").
    done = subprocess.run([sys.executable, "-c", LOAD_AND_TRACE % (OPS_ONLY,)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "loaded:", done.stdout
