"""The one Definitions object of the StockRx Patches code location.

Resources come from the environment (see README, "Configuration"): secrets only through
``dagster.EnvVar`` (read at run time, never stored in run config); optional secrets are bound
only when their variable exists, so a machine without Slack or SMTP still runs patches.
"""

from __future__ import annotations

import os
from typing import Any

from dagster import Definitions, EnvVar

from patch_ops.jobs import build_patch_job
from patch_ops.lifecycle import AUDIT, NOTIFIER
from patch_ops.ops import DB, MEMORY
from patch_ops.restore_jobs import build_purge_job, build_restore_job
from resources.audit import AuditLog
from resources.database import StockRxDatabase
from resources.memory import MemoryGuard
from resources.notifier import Notifier
from stockrx_patches.registry import ProjectConfig, Registry, default_registry
from stockrx_patches.schedules import build_schedules
from stockrx_patches.sensors import build_sensors


def _optional_secret(name: str) -> Any:
    return EnvVar(name) if os.environ.get(name) else None


def default_resources(config: ProjectConfig) -> dict[str, Any]:
    security = config.security
    env = os.environ
    recipients = [r.strip() for r in env.get("STOCKRX_SMTP_RECIPIENTS", "").split(",") if r.strip()]
    return {
        DB: StockRxDatabase(url=EnvVar("STOCKRX_DATABASE_URL")),
        MEMORY: MemoryGuard(),
        AUDIT: AuditLog(
            enabled=bool(security.get("log_encryption", True)),
            audit_keys=_optional_secret("STOCKRX_AUDIT_KEYS"),
            key_file=env.get("STOCKRX_AUDIT_KEY_FILE") or None,
        ),
        NOTIFIER: Notifier(
            channels=list(security.get("notification_channels", ["slack", "email"])),
            slack_token=_optional_secret("STOCKRX_SLACK_TOKEN"),
            slack_channel=env.get("STOCKRX_SLACK_CHANNEL", "#data-patches"),
            slack_base_url=env.get("STOCKRX_SLACK_BASE_URL") or None,
            smtp_host=env.get("STOCKRX_SMTP_HOST") or None,
            smtp_port=int(env.get("STOCKRX_SMTP_PORT", "25")),
            smtp_sender=env.get("STOCKRX_SMTP_SENDER", "stockrx-patches@localhost"),
            smtp_recipients=recipients,
            smtp_username=env.get("STOCKRX_SMTP_USERNAME") or None,
            smtp_password=_optional_secret("STOCKRX_SMTP_PASSWORD"),
            ui_base_url=env.get("STOCKRX_UI_BASE_URL", "http://127.0.0.1:3000"),
        ),
    }


def build_definitions(
    registry: Registry, resources: dict[str, Any] | None = None
) -> Definitions:
    jobs = [build_patch_job(p, registry.settings(n)) for n, p in sorted(registry.patches.items())]
    retention = int(registry.config.security.get("audit_retention_days", 90))
    jobs += [build_restore_job(), build_purge_job(retention)]
    return Definitions(
        jobs=jobs,
        schedules=build_schedules(registry),
        sensors=build_sensors(registry, jobs),
        resources={**default_resources(registry.config), **(resources or {})},
    )


defs = build_definitions(default_registry())
