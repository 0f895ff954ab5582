"""Imported last by the op fork server (``patch_ops.executor``), after everything it preloads:
the patches' lazy declarations are read (``patch_ops.patch.resolve_declarations``: their pandera
schemas, which loading the code location leaves unread), so every op process shares them instead
of importing pandera itself; then the objects alive are frozen out of the garbage collector's
reach (``gc.freeze``) and the collector, paused while the preloads were imported
(``patch_ops.forkserver_gc_pause``), is turned back on for the op processes.

An op process is forked from the fork server and shares its heap (Dagster, pandas, SQLAlchemy,
the code location: about a million objects) copy-on-write. Unfrozen, the op process's first full
collection (an automatic one, or the memory guard's ``gc.collect``) walks that whole heap and,
by writing each object's GC header, copies it page by page: measured 0.3-0.4 s of every op of a
0-row run on SQLite (benchmarks/README.md, issue 22). Frozen, a collection walks only what the
op made. Nothing is lost: the preloaded objects live as long as the op process anyway.

No collection before the freeze: of ~400k objects, a few thousand (under 2 MB) were garbage,
and finding them took 0.15-0.3 s of every run's first op start.

Nothing else imports this module: a long-lived process (webserver, daemon, tests) keeps its
ordinary garbage collection.
"""

from __future__ import annotations

import gc
import os

from patch_ops.patch import resolve_declarations
from resources.memory import FROZEN_ENV

resolve_declarations()
gc.freeze()
os.environ[FROZEN_ENV] = "1"  # the op processes' memory budgets need not count what is frozen
gc.enable()
