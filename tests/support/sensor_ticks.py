"""The code location's sensors evaluated in-process, as the daemon would: one tick, the launch of
a run request it returned, definitions with a test-only patch added, and the clock times and run
config the sensor tests share (tests/stockrx_patches/test_*sensor*.py; their ``clock``,
``instance`` and ``db`` fixtures are in tests/stockrx_patches/conftest.py). In-process, so a test
sees each decision without a daemon's polling."""

from __future__ import annotations

from dataclasses import replace

from dagster import ExecuteInProcessResult, RunRequest, build_sensor_context

from resources.notifier import Notifier
from stockrx_patches.definitions import build_definitions
from stockrx_patches.registry import Registry, default_registry
from tests.support.stockrx import PRICE_JOB

EXPIRY_JOB = "batch_expiry_update"
SUN_0230 = "2026-11-29T02:30:00+09:00"
MON_1000 = "2026-11-30T10:00:00+09:00"
DRY = {"adjustment_type": "percentage", "adjustment_value": 8}
TOKEN = "xoxb-sensor-test"


def tick(defs, name: str, instance, db, cursor: str | None = None, notifier=None):  # type: ignore[no-untyped-def]
    sensor = defs.resolve_sensor_def(name)
    ctx = build_sensor_context(
        instance=instance,
        cursor=cursor,
        repository_def=defs.get_repository_def(),
        resources={"stockrx_db": db, "notifier": notifier or Notifier(channels=[])},
    )
    return sensor.evaluate_tick(ctx)


def launch(defs, request: RunRequest, instance) -> ExecuteInProcessResult:  # type: ignore[no-untyped-def]
    """What the daemon does with a run request (in-process here)."""
    job = defs.resolve_job_def(request.job_name or EXPIRY_JOB)  # a one-job sensor names none
    return job.execute_in_process(
        run_config=request.run_config, instance=instance, tags=request.tags, raise_on_error=False
    )


def defs_with_patch(patch_cls: type, **overrides):  # type: ignore[no-untyped-def]
    base = default_registry()
    settings = replace(
        base.settings(PRICE_JOB), batch_size=20, batch_seconds=0, require_approved_plan=False,
        **overrides
    )
    patches = {**base.patches, patch_cls.name: patch_cls()}
    config = replace(base.config, patches={**base.config.patches, patch_cls.name: settings})
    return build_definitions(Registry(patches, config))
