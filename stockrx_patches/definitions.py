"""The one Definitions object of the StockRx Patches code location.

Resources come from the environment (README, "Configuration from the environment"), read when a
run or a sensor starts: they have no config of their own, so the launchpad shows none and no run
config freezes them (least of all a secret). A patch job's launchpad opens with the patch's
``example_config`` as a dry run, a valid config to edit rather than an error banner.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from dagster import Definitions, JobDefinition, ResourceDefinition

from patch_ops.executor import DATABASE_URL_ENV
from patch_ops.jobs import build_patch_job
from patch_ops.lifecycle import AUDIT, NOTIFIER
from patch_ops.ops import DB, MEMORY
from patch_ops.patch import Patch
from patch_ops.restore_jobs import build_purge_job, build_restore_job
from resources.audit import AuditLog
from resources.database import StockRxDatabase
from resources.memory import MemoryGuard
from resources.notifier import notifier_from_env
from stockrx_patches.outbox_sensor import build_outbox_sensor
from stockrx_patches.registry import ProjectConfig, Registry, default_registry
from stockrx_patches.schedules import build_schedules
from stockrx_patches.sensors import build_sensors


class MissingEnvironment(RuntimeError):
    """A variable the code location needs is not set."""


def from_environment(build: Callable[[], Any], description: str) -> ResourceDefinition:
    """A resource built from ``os.environ`` when a run or sensor starts; no config schema."""
    return ResourceDefinition(resource_fn=lambda _context: build(), description=description)


def database_from_env() -> StockRxDatabase:
    url = os.environ.get(DATABASE_URL_ENV)
    if not url:
        raise MissingEnvironment(
            f"{DATABASE_URL_ENV} is not set: it names the StockRx database (README, "
            "'Configuration from the environment')"
        )
    return StockRxDatabase(url=url)


def default_resources(config: ProjectConfig) -> dict[str, Any]:
    security = config.security
    channels = list(security.get("notification_channels", ["slack", "email"]))
    enabled = bool(security.get("log_encryption", True))
    return {
        DB: from_environment(database_from_env, f"The StockRx database ({DATABASE_URL_ENV})."),
        MEMORY: from_environment(MemoryGuard, "Memory guard of the transform step."),
        AUDIT: from_environment(
            lambda: AuditLog(
                enabled=enabled,
                audit_keys=os.environ.get("STOCKRX_AUDIT_KEYS") or None,
                key_file=os.environ.get("STOCKRX_AUDIT_KEY_FILE") or None,
            ),
            "The audit trail (STOCKRX_AUDIT_KEYS / STOCKRX_AUDIT_KEY_FILE).",
        ),
        NOTIFIER: from_environment(
            lambda: notifier_from_env(os.environ, channels),
            "Slack and email notifications (STOCKRX_SLACK_*, STOCKRX_SMTP_*, STOCKRX_NOTIFY_*).",
        ),
    }


def with_launchpad_defaults(job: JobDefinition, patch: Patch) -> JobDefinition:
    """``job`` whose run config defaults to the patch's example config as a dry run: the
    launchpad opens valid. A real run still needs ``dry_run: false`` and (for most patches) an
    approving dry run of the same plan, so a default value never reaches live data unseen."""
    return job.graph.to_job(
        name=job.name,
        description=job.description,
        tags=job.tags,
        executor_def=job.executor_def,
        config={"ops": {"plan_patch": {"config": {"dry_run": True, **patch.example_config}}}},
    )


def build_definitions(
    registry: Registry, resources: dict[str, Any] | None = None
) -> Definitions:
    jobs = [
        with_launchpad_defaults(build_patch_job(p, registry.settings(n)), p)
        for n, p in sorted(registry.patches.items())
    ]
    retention = int(registry.config.security.get("audit_retention_days", 90))
    jobs += [build_restore_job(), build_purge_job(retention)]
    return Definitions(
        jobs=jobs,
        schedules=build_schedules(registry),
        sensors=[*build_sensors(registry, jobs), build_outbox_sensor()],
        resources={**default_resources(registry.config), **(resources or {})},
    )


defs = build_definitions(default_registry())
