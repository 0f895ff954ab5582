"""Maintenance windows: parsing, schedules derived from them, the window guard, the fit-in-window
refusal, stop at the window end and resume in the next window, the 3x-estimate failure."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import replace
from zoneinfo import ZoneInfo

import pytest
from dagster import DagsterInstance, build_schedule_context, validate_run_config
from sqlalchemy import func, select, update

from patch_ops import windows as win
from patch_ops.state import executions, locks
from stockrx_patches.cli import main as cli_main
from stockrx_patches.definitions import build_definitions
from stockrx_patches.patches.batch_expiry_update import BatchExpiryUpdate
from stockrx_patches.patches.inventory_price_adjustment import InventoryPriceAdjustment
from stockrx_patches.registry import (
    DEFAULT_CONFIG,
    Registry,
    RegistryError,
    default_registry,
    load_project_config,
)
from stockrx_patches.schedules import build_schedules, schedule_name
from stockrx_patches.tables import inventory_logs
from tests.conftest import TEST_NOW_ENV
from tests.support.stockrx import (
    PRICE_JOB,
    digest,
    failure_description,
    latest_execution,
    prices,
    run_patch,
    seeded,
)

JST = ZoneInfo("Asia/Tokyo")
WINDOWS = load_project_config().patches[PRICE_JOB].maintenance_windows
SUN_0230 = "2026-11-29T02:30:00+09:00"  # inside the Sunday window (ends 04:00)
MON_1000 = "2026-11-30T10:00:00+09:00"  # outside every window
WED_0200 = "2026-12-02T02:00:10+09:00"  # the next window opened 10 s ago
SUN_0359 = "2026-11-29T03:59:00+09:00"  # a minute left
AFTER_SUNDAY_WINDOW = "2026-11-29T04:00:05+09:00"
REAL = {"dry_run": False, "adjustment_type": "percentage", "adjustment_value": 8}


def at(iso: str) -> dt.datetime:
    return dt.datetime.fromisoformat(iso)


def jst(y: int, m: int, d: int, hh: int, mm: int = 0, ss: int = 0) -> dt.datetime:
    return dt.datetime(y, m, d, hh, mm, ss, tzinfo=JST)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch):
    def set_clock(iso: str) -> None:
        monkeypatch.setenv(TEST_NOW_ENV, iso)

    return set_clock


# ---------------------------------------------------------------------------------------------
# Windows and schedules
# ---------------------------------------------------------------------------------------------


def test_configured_window_is_sunday_and_wednesday_2_to_4_tokyo():
    [w] = WINDOWS
    assert (w.start, w.end, set(w.days), w.timezone) == (
        dt.time(2),
        dt.time(4),
        {"sunday", "wednesday"},
        "Asia/Tokyo",
    )
    assert win.cron_schedules(WINDOWS) == ["0 2 * * 0,3"]


@pytest.mark.parametrize(
    ("instant", "inside"),
    [
        (jst(2026, 11, 29, 2, 0), True),  # Sunday, first second
        (jst(2026, 11, 29, 3, 59, 59), True),
        (jst(2026, 11, 29, 4, 0), False),  # the end is not in the window
        (jst(2026, 11, 29, 1, 59, 59), False),
        (jst(2026, 12, 2, 3, 0), True),  # Wednesday
        (jst(2026, 11, 30, 2, 30), False),  # Monday
        (dt.datetime(2026, 11, 28, 17, 30, tzinfo=dt.UTC), True),  # = Sunday 02:30 JST
    ],
)
def test_current_window(instant, inside):
    assert (win.current_window(WINDOWS, instant) is not None) is inside


def test_next_window_after_sunday_is_wednesday():
    nxt = win.next_window(WINDOWS, jst(2026, 11, 29, 4, 0))
    assert (nxt.start, nxt.end) == (jst(2026, 12, 2, 2), jst(2026, 12, 2, 4))
    assert nxt.describe() == "Wed 2026-12-02 02:00-04:00 Asia/Tokyo"


def test_window_over_midnight_and_several_windows():
    ws = win.parse_windows(
        {
            "default_timezone": "Asia/Tokyo",
            "maintenance_windows": [
                {"start": "23:30", "end": "01:00", "days": ["saturday"]},
                {"start": "02:00", "end": "04:00", "days": ["sunday", "wednesday"]},
                {"start": "02:00", "end": "03:00", "days": ["friday"]},
            ],
        }
    )
    assert win.cron_schedules(ws) == ["0 2 * * 0,3,5", "30 23 * * 6"]
    occ = win.current_window(ws, jst(2026, 11, 29, 0, 30))  # Sunday 00:30: Saturday's window
    assert occ is not None and occ.start == jst(2026, 11, 28, 23, 30)
    assert occ.end == jst(2026, 11, 29, 1, 0)
    assert win.next_window(ws, jst(2026, 11, 29, 1, 0)).start == jst(2026, 11, 29, 2, 0)


@pytest.mark.parametrize(
    ("window", "message"),
    [
        ({"start": "2am", "end": "04:00", "days": ["sunday"]}, "must be a time HH:MM"),
        ({"start": "02:00", "end": "04:00", "days": ["sundae"]}, "unknown day"),
        ({"start": "02:00", "end": "04:00", "days": "sunday"}, "must be a list"),
        ({"start": "02:00", "end": "02:00", "days": ["sunday"]}, "start and end"),
    ],
)
def test_malformed_windows_are_refused(tmp_path, window, message):
    import yaml

    raw = yaml.safe_load(open(DEFAULT_CONFIG))
    raw["scheduling"]["maintenance_windows"] = [window]
    path = tmp_path / "data_patches.yml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RegistryError, match=message):
        load_project_config(path)


def test_scheduled_real_runs_need_the_approval_gate_off(tmp_path):
    import yaml

    raw = yaml.safe_load(open(DEFAULT_CONFIG))
    raw["patches"]["batch_expiry_update"]["require_approved_plan"] = True
    path = tmp_path / "data_patches.yml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RegistryError, match="no dry run approves"):
        load_project_config(path)


def test_only_the_scheduled_patch_has_a_schedule_at_every_window_start():
    defs = build_definitions(default_registry())
    [schedule] = defs.schedules
    assert schedule.name == schedule_name("batch_expiry_update")
    assert schedule.job_name == "batch_expiry_update"
    assert schedule.cron_schedule == "0 2 * * 0,3"
    assert schedule.execution_timezone == "Asia/Tokyo"
    assert not any(s.job_name == PRICE_JOB for s in defs.schedules)


def test_scheduled_run_config_is_a_valid_real_run(dagster_home, sqlite_url, monkeypatch):
    monkeypatch.setenv("STOCKRX_DATABASE_URL", sqlite_url)  # resources are validated too
    defs = build_definitions(default_registry())
    schedule = defs.resolve_schedule_def(schedule_name("batch_expiry_update"))
    with DagsterInstance.get() as instance:
        ctx = build_schedule_context(
            instance=instance, scheduled_execution_time=jst(2026, 12, 2, 2, 0)
        )
        [request] = schedule.evaluate_tick(ctx).run_requests
    config = request.run_config["ops"]["plan_patch"]["config"]
    assert config["dry_run"] is False
    assert config["launched_by"] == "schedule:batch_expiry_update_at_window_start"
    assert request.tags["stockrx/trigger"] == "schedule"
    validate_run_config(defs.resolve_job_def("batch_expiry_update"), request.run_config)


def test_schedules_follow_the_windows_of_the_settings_file():
    base = default_registry()
    other = win.parse_windows(
        {
            "default_timezone": "Europe/Paris",
            "maintenance_windows": [{"start": "22:15", "end": "23:45", "days": ["monday"]}],
        }
    )
    settings = {n: replace(s, maintenance_windows=other) for n, s in base.config.patches.items()}
    registry = Registry(base.patches, replace(base.config, patches=settings))
    [schedule] = build_schedules(registry)
    assert schedule.cron_schedule == "15 22 * * 1"
    assert schedule.execution_timezone == "Europe/Paris"


# ---------------------------------------------------------------------------------------------
# The window guard and the fit-in-window check (through real patch runs)
# ---------------------------------------------------------------------------------------------


def test_real_run_outside_the_window_is_refused(sqlite_url, clock):
    engine = seeded(sqlite_url, items=60)
    before = digest(engine)
    clock(MON_1000)

    result = run_patch(sqlite_url, PRICE_JOB, REAL)

    assert not result.success
    reason = failure_description(result)
    assert "outside the maintenance windows (Sun, Wed 02:00-04:00 Asia/Tokyo)" in reason
    assert "the next one opens Wed 2026-12-02 02:00-04:00" in reason
    assert "allow_outside_window" in reason
    assert digest(engine) == before
    refused = latest_execution(engine)
    assert (
        refused["status"] == "failed"
        and "outside the maintenance windows" in refused["error_message"]
    )


def test_dry_run_outside_the_window_is_allowed(sqlite_url, clock):
    engine = seeded(sqlite_url, items=60)
    clock(MON_1000)

    result = run_patch(sqlite_url, PRICE_JOB, {**REAL, "dry_run": True})

    assert result.success
    ex = latest_execution(engine)
    assert ex["status"] == "completed" and ex["deadline_at"] is None


def test_explicit_override_runs_outside_the_window_and_is_recorded(sqlite_url, clock):
    engine = seeded(sqlite_url, items=60)
    old = prices(engine)
    clock(MON_1000)

    result = run_patch(sqlite_url, PRICE_JOB, {**REAL, "allow_outside_window": True})

    assert result.success, failure_description(result)
    assert prices(engine) != old
    ex = latest_execution(engine)
    assert ex["dry_run"] is False and ex["status"] == "completed"
    assert ex["config"]["allow_outside_window"] is True
    timing = ex["report"]["timing"]
    assert timing["outside_window_override"] is True and timing["window"] is None
    assert timing["override_reason"] == "outside every maintenance window"
    assert timing["clock"] == "2026-11-30T01:00:00+00:00" and timing["clock_fixed"] is False
    assert ex["deadline_at"] is None  # no window to end


def test_the_product_fixed_clock_is_an_override_a_real_run_must_declare(
    sqlite_url, clock, monkeypatch, capsys
):
    """STOCKRX_PATCHES_CLOCK inside a window let a real run commit with no override on record.
    A fixed clock asserts the time, it does not show it: a real run under it needs
    allow_outside_window, and the history says it was an override."""
    engine = seeded(sqlite_url, items=30)
    old = prices(engine)
    clock(MON_1000)  # the real time: outside every window
    monkeypatch.setenv(win.CLOCK_ENV, SUN_0230)  # the product's clock says: inside one

    refused = run_patch(sqlite_url, PRICE_JOB, REAL)

    assert not refused.success
    reason = failure_description(refused)
    assert f"the clock is fixed by {win.CLOCK_ENV} at 2026-11-28T17:30:00+00:00" in reason
    assert "needs allow_outside_window: true" in reason
    assert prices(engine) == old

    done = run_patch(sqlite_url, PRICE_JOB, {**REAL, "allow_outside_window": True})

    assert done.success, failure_description(done)
    assert prices(engine) != old
    ex = latest_execution(engine)
    timing = ex["report"]["timing"]
    assert timing["clock_fixed"] is True and timing["outside_window_override"] is True
    assert timing["override_reason"].startswith(f"the clock is fixed by {win.CLOCK_ENV}")
    assert timing["window"] == "Sun 2026-11-29 02:00-04:00 Asia/Tokyo"
    assert cli_main(["history", "--limit", "1", "--database-url", sqlite_url]) == 0
    assert f"OVERRIDE: the clock is fixed by {win.CLOCK_ENV}" in capsys.readouterr().out


def test_real_run_inside_the_window_gets_the_window_end_as_deadline(sqlite_url, clock):
    engine = seeded(sqlite_url, items=60)
    clock(SUN_0230)

    result = run_patch(sqlite_url, PRICE_JOB, REAL)

    assert result.success, failure_description(result)
    ex = latest_execution(engine)
    assert ex["deadline_at"] == dt.datetime(2026, 11, 28, 19, 0)  # 04:00 JST in UTC
    assert ex["report"]["timing"]["window"] == "Sun 2026-11-29 02:00-04:00 Asia/Tokyo"
    # The estimate came from the approving dry run's throughput.
    assert ex["report"]["timing"]["estimate_basis"] == "throughput of its last completed runs"


def test_run_that_would_not_finish_before_the_window_ends_is_refused(sqlite_url, clock):
    engine = seeded(sqlite_url, items=300)
    before = digest(engine)
    clock("2026-11-29T03:59:57+09:00")  # 3 s left; 300 rows at 50 rows/s (first run) = 6 s

    result = run_patch(sqlite_url, PRICE_JOB, REAL, approve=False)

    assert not result.success
    reason = failure_description(result)
    assert "estimated 6 s for 300 rows (no completed run yet: 50 rows/s assumed)" in reason
    assert "will not finish before the maintenance window ends at 04:00 JST (3 s left)" in reason
    assert "next window (Wed 2026-12-02 02:00-04:00 Asia/Tokyo)" in reason
    assert digest(engine) == before


def test_estimate_uses_past_throughput_once_there_is_some(sqlite_url, clock):
    engine = seeded(sqlite_url, items=300)
    clock("2026-11-29T03:59:00+09:00")
    assert run_patch(sqlite_url, PRICE_JOB, {**REAL, "dry_run": True}).success
    # That dry run (300 rows) is on record as having taken 100 s: 3 rows/s, not the 50 assumed
    # for a first run. With 60 s left, 300 rows fit at 50 rows/s (6 s) but not at 3 (100 s).
    dry = latest_execution(engine)
    with engine.begin() as conn:
        conn.execute(
            update(executions)
            .where(executions.c.execution_id == dry["execution_id"])
            .values(completed_at=dry["started_at"] + dt.timedelta(seconds=100))
        )

    result = run_patch(sqlite_url, PRICE_JOB, REAL, approve=False)

    assert not result.success
    reason = failure_description(result)
    assert "estimated 100 s for 300 rows (throughput of its last completed runs)" in reason, reason
    assert "will not finish before the maintenance window ends at 04:00 JST (60 s left)" in reason


# ---------------------------------------------------------------------------------------------
# Stop at the window end, resume in the next window
# ---------------------------------------------------------------------------------------------


class WindowEndPatch(InventoryPriceAdjustment):
    """The price patch, whose clock reaches the window end after its third batch (test only)."""

    name = "window_end_patch"
    moves: dict[int, str] = {}  # batch number → clock to set after it

    def transform(self, batch, config, ctx):  # type: ignore[no-untyped-def]
        WindowEndPatch.calls += 1
        if WindowEndPatch.calls in self.moves:
            os.environ[TEST_NOW_ENV] = self.moves[WindowEndPatch.calls]
        return super().transform(batch, config, ctx)

    calls = 0


def window_defs(patch_cls: type, **settings_overrides):  # type: ignore[no-untyped-def]
    base = default_registry()
    settings = replace(
        base.settings(PRICE_JOB),
        batch_size=20,
        batch_seconds=0,  # batches of exactly 20: the window end falls between known batches
        require_approved_plan=False,
        **settings_overrides,
    )
    patches = {**base.patches, patch_cls.name: patch_cls()}
    config = replace(base.config, patches={**base.config.patches, patch_cls.name: settings})
    return build_definitions(Registry(patches, config))


def test_run_stops_at_the_window_end_and_resumes_in_the_next_window(
    database_url, clock, dagster_home
):
    engine = seeded(database_url, items=200)  # 10 batches of 20
    before, old = digest(engine), prices(engine)
    defs = window_defs(WindowEndPatch)
    WindowEndPatch.calls, WindowEndPatch.moves = 0, {3: AFTER_SUNDAY_WINDOW}
    clock(SUN_0359)  # the estimate (200 rows at 50 rows/s: 4 s) fits; the run is slower
    instance = DagsterInstance.get()

    first = run_patch(
        database_url, WindowEndPatch.name, REAL, defs=defs, instance=instance, approve=False
    )

    assert first.success, failure_description(first)
    paused = latest_execution(engine)
    assert (paused["status"], paused["phase"]) == ("paused", "paused_window_end")
    assert paused["batches_done"] == 3 and paused["processed_records"] == 60
    assert digest(engine) == before  # nothing reached the live tables
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(locks)).scalar_one() == 0
    assert instance.get_run_by_id(first.run_id).tags["stockrx/paused"] == "window-end"
    skipped = {e.step_key for e in first.all_events if e.event_type_value == "STEP_SKIPPED"}
    assert {"commit_changes", "verify_commit", "report_dry_run", "roll_back"} <= skipped

    # Still after the window: the same config is refused, the execution stays paused.
    refused = run_patch(
        database_url, WindowEndPatch.name, REAL, defs=defs, instance=instance, approve=False
    )
    assert not refused.success
    assert "may resume only inside one" in failure_description(refused)
    assert latest_execution(engine)["status"] == "paused"

    # Next window: a new run with the same config (what the schedule launches) continues it.
    clock(WED_0200)
    second = run_patch(
        database_url, WindowEndPatch.name, REAL, defs=defs, instance=instance, approve=False
    )

    assert second.success, failure_description(second)
    done = latest_execution(engine)
    assert done["execution_id"] == paused["execution_id"]
    assert (done["status"], done["phase"]) == ("completed", "verified")
    assert done["batches_done"] == 10 and done["processed_records"] == 200  # none redone
    assert done["dagster_run_id"] == second.run_id
    assert WindowEndPatch.calls == 3 + 7
    assert done["paused_seconds"] > 0
    assert done["report"]["backup"] == paused["report"]["backup"]  # backup taken once
    logs = [e.user_message for e in instance.all_logs(second.run_id)]
    assert any(f"resuming paused execution {paused['execution_id']}" in m for m in logs)
    assert any("backup already taken" in m for m in logs)
    assert [r["window"] for r in done["report"]["timing_resumed"]] == [
        "Wed 2026-12-02 02:00-04:00 Asia/Tokyo"
    ]
    new = prices(engine)
    assert all(new[i] == int(old[i] * 1.08 + 0.5 + 1e-7) for i in old)
    with engine.connect() as conn:
        per_item = conn.execute(
            select(inventory_logs.c.inventory_id, func.count())
            .where(inventory_logs.c.operation_type == "adjust")
            .group_by(inventory_logs.c.inventory_id)
        ).all()
    assert {n for _, n in per_item} == {1}


def test_resume_keeps_the_config_of_the_paused_execution(sqlite_url, clock):
    engine = seeded(sqlite_url, items=100)
    defs = window_defs(WindowEndPatch)
    WindowEndPatch.calls, WindowEndPatch.moves = 0, {2: AFTER_SUNDAY_WINDOW}
    clock(SUN_0359)
    assert run_patch(sqlite_url, WindowEndPatch.name, REAL, defs=defs, approve=False).success
    paused = latest_execution(engine)
    clock(WED_0200)

    other = {**REAL, "adjustment_value": 9, "resume_execution_id": paused["execution_id"]}
    refused = run_patch(sqlite_url, WindowEndPatch.name, other, defs=defs, approve=False)
    assert not refused.success
    assert "differs from paused execution" in failure_description(refused)
    assert "['adjustment_value']" in failure_description(refused)
    gone = {**REAL, "resume_execution_id": "00000000-0000-0000-0000-000000000000"}
    assert "no execution" in failure_description(
        run_patch(sqlite_url, WindowEndPatch.name, gone, defs=defs, approve=False)
    )

    resumed = run_patch(
        sqlite_url,
        WindowEndPatch.name,
        {**REAL, "resume_execution_id": paused["execution_id"], "launched_by": "ops"},
        defs=defs,
        approve=False,
    )
    assert resumed.success, failure_description(resumed)
    done = latest_execution(engine)
    assert done["execution_id"] == paused["execution_id"] and done["status"] == "completed"
    again = run_patch(
        sqlite_url,
        WindowEndPatch.name,
        {**REAL, "resume_execution_id": paused["execution_id"]},
        defs=defs,
        approve=False,
    )
    assert "is completed (phase verified), not paused" in failure_description(again)


class SlowClockPatch(InventoryPriceAdjustment):
    """Its second batch "takes" half an hour: far over 3x its estimate (test only)."""

    name = "slow_clock_patch"

    def transform(self, batch, config, ctx):  # type: ignore[no-untyped-def]
        SlowClockPatch.calls += 1
        if SlowClockPatch.calls == 2:
            os.environ[TEST_NOW_ENV] = "2026-11-29T03:00:00+09:00"
        return super().transform(batch, config, ctx)

    calls = 0


def test_run_over_three_times_its_estimate_fails(sqlite_url, clock):
    engine = seeded(sqlite_url, items=100)
    before = digest(engine)
    SlowClockPatch.calls = 0
    clock(SUN_0230)

    result = run_patch(
        sqlite_url, SlowClockPatch.name, REAL, defs=window_defs(SlowClockPatch), approve=False
    )

    assert not result.success
    reason = failure_description(result)
    assert reason.startswith("over 3x its estimate (2 s): stopped at a batch boundary after 40/100")
    ex = latest_execution(engine)
    assert ex["status"] == "failed" and ex["batches_done"] == 2
    assert ex["overrun_at"] == dt.datetime(2026, 11, 28, 17, 31)  # plan + max(3 x 2 s, 60 s)
    assert digest(engine) == before


class PausingExpiry(BatchExpiryUpdate):
    """batch_expiry_update, whose clock passes the window end after its second batch (test)."""

    name = "pausing_expiry"
    calls = 0

    def transform(self, batch, config, ctx):  # type: ignore[no-untyped-def]
        PausingExpiry.calls += 1
        if PausingExpiry.calls == 2:
            os.environ[TEST_NOW_ENV] = AFTER_SUNDAY_WINDOW
        return super().transform(batch, config, ctx)


def test_the_schedule_continues_what_the_previous_window_left(
    sqlite_url, clock, dagster_home, monkeypatch
):
    engine = seeded(sqlite_url, items=100)
    monkeypatch.setenv("STOCKRX_DATABASE_URL", sqlite_url)
    base = default_registry()
    settings = replace(base.settings("batch_expiry_update"), batch_size=5, batch_seconds=0)
    registry = Registry(
        {**base.patches, PausingExpiry.name: PausingExpiry()},
        replace(base.config, patches={**base.config.patches, PausingExpiry.name: settings}),
    )
    defs = build_definitions(registry)
    schedule = defs.resolve_schedule_def(schedule_name(PausingExpiry.name))
    job = defs.resolve_job_def(PausingExpiry.name)
    PausingExpiry.calls = 0
    instance = DagsterInstance.get()

    def scheduled_run(at_jst: dt.datetime):  # type: ignore[no-untyped-def]
        ctx = build_schedule_context(instance=instance, scheduled_execution_time=at_jst)
        [request] = schedule.evaluate_tick(ctx).run_requests
        return job.execute_in_process(
            run_config=request.run_config,
            instance=instance,
            tags=request.tags,
            raise_on_error=False,
        )

    clock(SUN_0359)
    first = scheduled_run(jst(2026, 11, 29, 2, 0))  # (a late tick: a minute before the end)
    assert first.success, failure_description(first)
    paused = latest_execution(engine, PausingExpiry.name)
    assert paused["status"] == "paused" and paused["batches_done"] == 2
    assert paused["launched_by"] == f"schedule:{schedule_name(PausingExpiry.name)}"

    clock(WED_0200)
    second = scheduled_run(jst(2026, 12, 2, 2, 0))

    assert second.success, failure_description(second)
    done = latest_execution(engine, PausingExpiry.name)
    assert done["execution_id"] == paused["execution_id"]
    assert (done["status"], done["phase"]) == ("completed", "verified")
    assert done["business_date"] == paused["business_date"]  # the plan's, not Wednesday's
    assert done["batches_done"] == -(-done["target_count"] // 5)  # every batch once
