"""The outbox sensor: sends again the notifications a channel could not take (patch_ops.outbox),
so a message waiting for Slack or SMTP to come back goes out even when no patch runs."""

from __future__ import annotations

from dagster import SensorDefinition, SensorEvaluationContext, SkipReason, sensor

from patch_ops.dialects.names import has_table
from patch_ops.outbox import flush, outbox, pending
from resources.database import StockRxDatabase
from resources.notifier import Notifier
from stockrx_patches.schedules import sensor_default_status
from stockrx_patches.ticks import is_preview

OUTBOX_SENSOR = "notification_outbox_sensor"


def flush_outbox(context: SensorEvaluationContext | None, db: StockRxDatabase,
                 notifier: Notifier) -> SkipReason:
    """Send what the outbox kept that is due; says what happened (never raises on delivery).
    A preview (``stockrx_patches.ticks``) sends nothing: it says how many messages wait."""
    engine = db.get_engine()
    if not has_table(engine, outbox):
        return SkipReason("no outbox yet: every notification was delivered")
    if context is not None and is_preview(context):
        return SkipReason(f"preview, nothing sent: {len(pending(engine))} message(s) kept")
    tried = flush(engine, notifier)
    if not tried:
        return SkipReason("nothing due in the outbox")
    sent = sum(t["delivered"] for t in tried)
    text = f"outbox: {sent} of {len(tried)} message(s) delivered"
    if context is not None:
        context.log.info(text)
    return SkipReason(text)


def build_outbox_sensor() -> SensorDefinition:
    @sensor(
        name=OUTBOX_SENSOR,
        minimum_interval_seconds=60,
        default_status=sensor_default_status(),
        description="Sends again the notifications Slack or SMTP could not take (the outbox "
        "table data_patch_outbox), with growing waits, until they are delivered.",
    )
    def notification_outbox_sensor(
        context: SensorEvaluationContext, stockrx_db: StockRxDatabase, notifier: Notifier
    ) -> SkipReason:
        return flush_outbox(context, stockrx_db, notifier)

    return notification_outbox_sensor
