"""A job whose ops report what their process started with (tests/patch_ops/test_executor.py).

Its own module, importing no test support: the fork server preloads the job's module, so what
this module imports would be in every op process whatever the executor preloads.
"""

from __future__ import annotations

import gc
import sys

from dagster import job, op

from patch_ops import executor
from stockrx_patches.patches.inventory_price_adjustment import InventoryPriceAdjustment


@op
def freeze_count() -> int:
    return gc.get_freeze_count()


@op
def preloaded() -> str:
    """What the op process had before the op ran: its garbage collector on (the fork server
    paused its own while preloading), pandas and pandera imported and the patches' lazy schemas
    read, by the fork server (the code location's process never imports them)."""
    made = vars(InventoryPriceAdjustment)["schemas"].made  # read in this process yet?
    have = [m for m in ("pandas", "pandera", "stockrx_patches.schemas") if m in sys.modules]
    return " ".join([f"gc-enabled={gc.isenabled()}", f"schemas-made={made}", *have])


@op
def frozen_drivers() -> str:
    """Whether the op process shares these modules, frozen, with the fork server (the module's
    dict is in no collected generation), imported them itself, or has none: upath.core (every op
    process's instance imports it) and the StockRx database's drivers (the probe's URL names
    pymysql, so psycopg has no business there)."""
    collected = {id(o) for o in gc.get_objects()}
    names = ("upath.core", "pymysql", "psycopg")
    return " ".join(
        f"{n}={'frozen' if id(vars(sys.modules[n])) not in collected else 'imported'}"
        if n in sys.modules else f"{n}=absent"
        for n in names
    )


@job(executor_def=executor.patch_executor)
def gc_probe() -> None:
    freeze_count()
    preloaded()
    frozen_drivers()
