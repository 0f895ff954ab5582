"""The one Definitions object of the StockRx Patches code location."""

from __future__ import annotations

from dagster import Definitions, EnvVar

from patch_ops.jobs import DB, MEMORY, build_patch_job
from resources.database import StockRxDatabase
from resources.memory import MemoryGuard
from stockrx_patches.registry import Registry, default_registry


def build_definitions(registry: Registry) -> Definitions:
    jobs = [build_patch_job(p, registry.settings(n)) for n, p in sorted(registry.patches.items())]
    return Definitions(
        jobs=jobs,
        resources={
            DB: StockRxDatabase(url=EnvVar("STOCKRX_DATABASE_URL")),
            MEMORY: MemoryGuard(),
        },
    )


defs = build_definitions(default_registry())
