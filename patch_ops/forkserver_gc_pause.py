"""Imported first by the op fork server (``patch_ops.executor``): pauses the automatic garbage
collector while the fork server imports its preloads; ``patch_ops.forkserver_gc``, imported
last, freezes what they made and turns it back on, so every op process forked from it has it on.

The preloads make ~400k tracked objects, nearly all of them alive until the fork server ends;
left on, the collector walked them 4-5 times while they were being made (0.4-0.8 s of CPU before
the first op could start, measured on this project's preloads), and what it could free was
a few thousand objects. Python's own advice for a process that forks without exec (``gc.freeze``
docs) is the same: disable early, freeze before forking, enable in the children.

Every process forked from here turns it on at its start as well (``os.register_at_fork``), so no
op process runs without it even if the fork server never reached FREEZE_MODULE (it skips a
preload that fails to import).

Nothing else imports this module: a long-lived process (webserver, daemon, tests) keeps its
ordinary garbage collection.
"""

from __future__ import annotations

import gc
import os

gc.disable()
os.register_at_fork(after_in_child=gc.enable)
