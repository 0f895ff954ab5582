"""Schedules from the maintenance windows (stockrx_patches.schedules)."""

from __future__ import annotations

from stockrx_patches.definitions import defs


def test_one_window_start_is_one_cron_expression_not_a_list() -> None:
    # A one-item list showed in the UI and CLI as "['0 2 * * 0,3']".
    schedule = defs.resolve_schedule_def("batch_expiry_update_at_window_start")
    assert schedule.cron_schedule == "0 2 * * 0,3"
    assert schedule.execution_timezone == "Asia/Tokyo"

