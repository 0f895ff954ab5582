"""Is this sensor evaluation a daemon tick, or a preview that must not write?

``dagster sensor preview`` and the UI's "Test sensor" evaluate a sensor exactly as the daemon
does, but nothing they decide is kept: no tick, no cursor, no run. A sensor that wrote its
decisions (a request marked rejected or launched, a message sent from the outbox) during a
preview would change state for an evaluation that never happened. So sensors with side effects
ask ``is_preview`` and, in a preview, only say what they would do.

The daemon evaluates a sensor under the log key ``[repository, sensor, tick id]`` of the tick it
has just recorded in the instance's schedule storage; a preview gets no log key, and Dagster
makes one from the time of day. An evaluation counts as a tick only when its log key names a
tick of this sensor that the instance holds. A context built in code (``build_sensor_context``,
no log key) is its caller's to judge: not a preview.
"""

from __future__ import annotations

from dagster import SensorEvaluationContext


def is_preview(context: SensorEvaluationContext) -> bool:
    key = context.log_key
    if not key:
        return False
    sensor_name, tick_id = str(key[-2]) if len(key) > 1 else "", str(key[-1])
    if not tick_id.isdigit():
        return True
    storage = context.instance.schedule_storage
    if storage is None:
        return True
    ticks = storage.get_ticks_by_ids([int(tick_id)])
    return not (ticks and ticks[0].instigator_name == sensor_name)
