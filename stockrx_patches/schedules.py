"""Schedules, derived from the maintenance windows (never written twice).

Every patch with ``scheduled: true`` in config/data_patches.yml runs at the start of every
maintenance window (one cron expression per distinct start time, in the windows' time zone),
with its ``schedule_config`` (default: a real run). One-off patches get no schedule. A scheduled
run whose config equals a paused execution's continues it, so the
schedule also resumes what the previous window could not finish (patch_ops.steps.plan).

Whether schedules and sensors start running by themselves is one switch, ``STOCKRX_AUTOMATION``
(``on`` by default; ``make ui`` sets ``off``, so a demo never starts a real run on its own). It
only sets their default: a schedule or sensor turned on or off in the UI stays so.
"""

from __future__ import annotations

import os
from typing import Any

from dagster import DefaultScheduleStatus, DefaultSensorStatus, ScheduleDefinition

from patch_ops.checks import SCHEDULED_BY
from patch_ops.patch import PatchSettings
from patch_ops.windows import cron_schedules, schedule_timezone
from stockrx_patches.registry import Registry

TRIGGER_TAG = "stockrx/trigger"
AUTOMATION_ENV = "STOCKRX_AUTOMATION"


def automation_on() -> bool:
    """Schedules and sensors run by default unless STOCKRX_AUTOMATION is off."""
    value = (os.environ.get(AUTOMATION_ENV) or "on").strip().lower()
    if value not in ("on", "off"):
        raise ValueError(f"{AUTOMATION_ENV} must be on or off, got {value!r}")
    return value == "on"


def schedule_default_status() -> DefaultScheduleStatus:
    return DefaultScheduleStatus.RUNNING if automation_on() else DefaultScheduleStatus.STOPPED


def sensor_default_status() -> DefaultSensorStatus:
    return DefaultSensorStatus.RUNNING if automation_on() else DefaultSensorStatus.STOPPED


def schedule_name(patch_name: str) -> str:
    return f"{patch_name}_at_window_start"


def scheduled_run_config(patch_name: str, settings: PatchSettings) -> dict[str, Any]:
    config = {"launched_by": f"{SCHEDULED_BY}{schedule_name(patch_name)}", **settings.schedule_config}
    return {"ops": {"plan_patch": {"config": config}}}


def build_schedules(registry: Registry) -> list[ScheduleDefinition]:
    schedules = []
    for name in sorted(registry.patches):
        settings = registry.settings(name)
        if not settings.scheduled:
            continue
        windows = settings.maintenance_windows
        crons = cron_schedules(windows)
        schedules.append(
            ScheduleDefinition(
                name=schedule_name(name),
                job_name=name,
                # One expression as a string: a one-item list shows as "['0 2 * * 0,3']".
                cron_schedule=crons[0] if len(crons) == 1 else crons,
                execution_timezone=schedule_timezone(windows),
                run_config=scheduled_run_config(name, settings),
                tags={TRIGGER_TAG: "schedule"},
                description=f"{name} at the start of every maintenance window "
                f"({'; '.join(w.describe() for w in windows)})",
                default_status=schedule_default_status(),
            )
        )
    return schedules
