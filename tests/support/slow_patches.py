"""Test-only patches that misbehave on purpose, and a code location that serves them.

`dagster job execute -m tests.support.slow_patches -j slow_price_adjustment` runs them in
subprocesses like the real code location.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

from sqlalchemy import func, literal, select, update

from patch_ops.database import get_engine
from patch_ops.patch import Invariant, PatchSettings
from stockrx_patches.patches.inventory_price_adjustment import InventoryPriceAdjustment
from stockrx_patches.tables import inventories
from tests.support.stockrx import defs_with

SETTINGS = PatchSettings(
    description="test patch",
    estimated_records=100,
    batch_size=50,
    # Some of these patches fail their dry run on purpose: their real runs are launched without
    # one (run_patch(..., approve=False)), so the approval gate is off for them.
    require_approved_plan=False,
)


class NegativePricePatch(InventoryPriceAdjustment):
    """Sets a negative price on every third item: its schema must reject them."""

    name = "negative_price_patch"

    def transform(self, batch, config, ctx):  # type: ignore[no-untyped-def]
        changes = super().transform(batch, config, ctx)
        upd = changes.updates["inventories"]
        upd.loc[upd["id"] % 3 == 0, "price"] = -5.0
        return changes


class ForgetfulCounterPatch(InventoryPriceAdjustment):
    """Forgets to bump inventory_logs_count: the invariant must catch it."""

    name = "forgetful_counter_patch"

    def transform(self, batch, config, ctx):  # type: ignore[no-untyped-def]
        changes = super().transform(batch, config, ctx)
        upd = changes.updates["inventories"]
        upd["inventory_logs_count"] = upd["inventory_logs_count"] - 1
        return changes


class FailsAfterCommitPatch(InventoryPriceAdjustment):
    """An invariant that holds before commit and breaks after: post-verification must restore."""

    name = "fails_after_commit_patch"

    def invariants(self, result, config):  # type: ignore[no-untyped-def]
        items = result.updated("inventories")
        extra = Invariant(
            "checked_after_commit",
            "fails only on live data",
            select(items.c.id).where(literal(result.committed)),
        )
        return [*super().invariants(result, config), extra]


class ConcurrentAppPatch(InventoryPriceAdjustment):
    """While the patch transforms, 'the application' edits item 2 (another connection)."""

    name = "concurrent_app_patch"

    def transform(self, batch, config, ctx):  # type: ignore[no-untyped-def]
        engine = get_engine(os.environ["STOCKRX_DATABASE_URL"])
        with engine.begin() as conn:
            conn.execute(
                update(inventories).where(inventories.c.id == 2).values(name="renamed by the app")
            )
        return super().transform(batch, config, ctx)


class SlowPricePatch(InventoryPriceAdjustment):
    """The price patch, slowed down so a test can kill it in the middle of the transform.

    ``SLOW_PATCH_SECONDS`` per batch; with ``SLOW_PATCH_GATE`` (a path), every batch after the
    first also waits until that file exists: the run holds its lock until the test opens the gate,
    however slow the machine."""

    name = "slow_price_adjustment"
    _batches = 0  # in the transform's process

    def transform(self, batch, config, ctx):  # type: ignore[no-untyped-def]
        time.sleep(float(os.environ.get("SLOW_PATCH_SECONDS", "0.4")))
        gate = os.environ.get("SLOW_PATCH_GATE")
        SlowPricePatch._batches += 1
        if gate and SlowPricePatch._batches > 1:
            deadline = time.monotonic() + 300
            while not os.path.exists(gate):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"test gate {gate} never opened")
                time.sleep(0.1)
        return super().transform(batch, config, ctx)


class SlowInvariantPatch(InventoryPriceAdjustment):
    """An invariant whose query sleeps 3 s on PostgreSQL: before commit, or only after it when
    ``after_commit``. Its settings allow invariant queries 0.5 s."""

    name = "slow_invariant_patch"
    after_commit = False

    def invariants(self, result, config):  # type: ignore[no-untyped-def]
        sleeps = select(func.pg_sleep(3).label("slept"))
        if self.after_commit:
            sleeps = sleeps.where(literal(result.committed))
        slow = Invariant("slow_check", "takes 3 s", sleeps)
        return [*super().invariants(result, config), slow]


class MemoryHogPatch(InventoryPriceAdjustment):
    """Grabs ``hog_mb`` of real memory in its first batch and keeps it until the step ends."""

    name = "memory_hog_patch"
    hog_mb = 0
    held: list[bytearray] = []

    def transform(self, batch, config, ctx):  # type: ignore[no-untyped-def]
        if not self.held and self.hog_mb:
            # bytearray * n writes every page, so all of it is resident (not just reserved)
            self.held.append(bytearray(b"\x01") * (self.hog_mb * 1024 * 1024))
        return super().transform(batch, config, ctx)


ALL = (NegativePricePatch, ForgetfulCounterPatch, FailsAfterCommitPatch, ConcurrentAppPatch,
       SlowPricePatch, MemoryHogPatch)

defs = defs_with(
    *[(cls(), SETTINGS) for cls in ALL],
    (SlowInvariantPatch(), replace(SETTINGS, query_timeout_seconds=0.5)),
)


def slow_job():  # type: ignore[no-untyped-def]
    """Module-level, so `dagster.reconstructable(slow_job)` can rebuild it in other processes."""
    return defs.resolve_job_def("slow_price_adjustment")
