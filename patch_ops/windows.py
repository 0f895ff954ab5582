"""Maintenance windows: when real runs may write, and how long they may take.

Windows come from ``config/data_patches.yml`` (``scheduling.maintenance_windows``, times in
``scheduling.default_timezone``); every patch's ``PatchSettings.maintenance_windows`` holds them.
A window starts on each of its ``days`` at ``start`` and ends at ``end`` (the next day when
``end`` is not after ``start``). From the same windows come the schedules (cron at each start,
``stockrx_patches.schedules``) and the plan check ``patch_ops.checks.check_maintenance_window``:

- ``before_freeze``: a real run outside every window is refused, unless its run config says
  ``allow_outside_window: true`` (kept in the execution's config and report, and logged).
- ``after_freeze``: the run's duration is estimated (rows to do / rows per second of the patch's
  last completed runs; before any run, ``scheduling.first_run_rows_per_second``). A real run whose
  estimate does not fit before its window ends is refused. The execution row gets
  ``deadline_at`` (window end: the transform stops at the batch boundary after it and the
  execution is paused, to be resumed in the next window) and ``overrun_at`` (3x the estimate: the
  run fails, the original design's criterion; never less than a minute).
- ``resume`` (a paused execution continued by a new run): the window rule again; a new deadline
  and a time budget of 3x the estimate of what is left. A resumed run need not fit: its progress is
  kept, so it pauses again at the window end.

The clock is the system clock, unless ``STOCKRX_PATCHES_CLOCK`` holds an ISO 8601 instant with
its UTC offset (``2026-11-29T02:30:00+09:00``): then "now" is fixed at that instant, for
rehearsals. A fixed clock cannot show that a real run is inside a window, so it is an override like
any other: a real run under it needs ``allow_outside_window: true`` and is recorded as an override
(``real_run_window``). Every execution planned under a fixed clock says so in its report.
The test suite freezes ``system_now`` below the product instead (tests/support/testclock).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

CLOCK_ENV = "STOCKRX_PATCHES_CLOCK"
OVERRUN_FACTOR = 3.0
#: A run is never failed for time before this, whatever its estimate (process start-up and
#: plan/backup/validate overheads dominate tiny runs).
MIN_TIME_BUDGET_SECONDS = 60.0
DEFAULT_TIMEZONE = "Asia/Tokyo"
DEFAULT_FIRST_RUN_ROWS_PER_SECOND = 50.0

DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_CRON_DAY = {d: (i + 1) % 7 for i, d in enumerate(DAYS)}  # cron: 0 = sunday


class WindowConfigError(ValueError):
    """The maintenance windows in the settings file are malformed."""


# ---------------------------------------------------------------------------------------------
# The clock
# ---------------------------------------------------------------------------------------------


def fixed_clock() -> dt.datetime | None:
    """The instant STOCKRX_PATCHES_CLOCK fixes "now" at, or None (the system clock)."""
    raw = os.environ.get(CLOCK_ENV, "").strip()
    if not raw:
        return None
    try:
        value = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise WindowConfigError(
            f"{CLOCK_ENV}={raw!r} is not an ISO 8601 date-time (e.g. 2026-11-29T02:30:00+09:00)"
        ) from None
    if value.tzinfo is None:
        raise WindowConfigError(f"{CLOCK_ENV}={raw!r} needs a UTC offset (e.g. +09:00)")
    return value


def system_now() -> dt.datetime:
    """The system clock (aware, UTC)."""
    return dt.datetime.now(dt.UTC)


def now() -> dt.datetime:
    """The current instant (aware, UTC): the fixed clock if set, else the system clock."""
    return (fixed_clock() or system_now()).astimezone(dt.UTC)


def utc_naive(value: dt.datetime) -> dt.datetime:
    """An aware instant as the naive UTC datetime the execution history stores."""
    return value.astimezone(dt.UTC).replace(tzinfo=None)


def now_naive() -> dt.datetime:
    return utc_naive(now())


# ---------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaintenanceWindow:
    """Starts on each of ``days`` at ``start`` local time, ends at ``end`` (next day if <=)."""

    start: dt.time
    end: dt.time
    days: tuple[str, ...]
    timezone: str = DEFAULT_TIMEZONE

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def occurrence(self, day: dt.date) -> WindowOccurrence:
        start = dt.datetime.combine(day, self.start, tzinfo=self.tz)
        end_day = day if self.end > self.start else day + dt.timedelta(days=1)
        return WindowOccurrence(start, dt.datetime.combine(end_day, self.end, tzinfo=self.tz), self)

    def occurrences_around(
        self, instant: dt.datetime, days_ahead: int = 8
    ) -> list[WindowOccurrence]:
        """Occurrences starting from the day before ``instant`` (local) to ``days_ahead`` after."""
        local = instant.astimezone(self.tz).date()
        out = []
        for offset in range(-1, days_ahead + 1):
            day = local + dt.timedelta(days=offset)
            if DAYS[day.weekday()] in self.days:
                out.append(self.occurrence(day))
        return out

    def describe(self) -> str:
        days = ", ".join(d.capitalize()[:3] for d in sorted(self.days, key=lambda d: _CRON_DAY[d]))
        return f"{days} {self.start:%H:%M}-{self.end:%H:%M} {self.timezone}"


@dataclass(frozen=True)
class WindowOccurrence:
    start: dt.datetime  # aware, in the window's time zone
    end: dt.datetime
    window: MaintenanceWindow

    def contains(self, instant: dt.datetime) -> bool:
        return self.start <= instant < self.end

    def describe(self) -> str:
        return f"{self.start:%a %Y-%m-%d %H:%M}-{self.end:%H:%M} {self.window.timezone}"


def _parse_time(value: Any, what: str) -> dt.time:
    try:
        return dt.time.fromisoformat(str(value))
    except ValueError:
        raise WindowConfigError(f"{what} must be a time HH:MM, got {value!r}") from None


def parse_windows(scheduling: Mapping[str, Any] | None) -> tuple[MaintenanceWindow, ...]:
    """``scheduling.maintenance_windows`` of the settings file, checked."""
    scheduling = scheduling or {}
    tz = str(scheduling.get("default_timezone") or DEFAULT_TIMEZONE)
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise WindowConfigError(
            f"unknown time zone {tz!r} in scheduling.default_timezone"
        ) from None
    windows = []
    for i, raw in enumerate(scheduling.get("maintenance_windows") or []):
        what = f"scheduling.maintenance_windows[{i}]"
        if not isinstance(raw, Mapping):
            raise WindowConfigError(f"{what} must be a mapping with start, end and days")
        start = _parse_time(raw.get("start"), f"{what}.start")
        end = _parse_time(raw.get("end"), f"{what}.end")
        if start == end:
            raise WindowConfigError(f"{what}: start and end are both {start:%H:%M}")
        days = raw.get("days")
        if isinstance(days, str) or not days:
            raise WindowConfigError(f"{what}.days must be a list of day names, got {days!r}")
        names = tuple(str(d).strip().lower() for d in days)
        unknown = [d for d in names if d not in DAYS]
        if unknown:
            raise WindowConfigError(f"{what}.days: unknown day(s) {unknown}; use {list(DAYS)}")
        windows.append(MaintenanceWindow(start, end, tuple(dict.fromkeys(names)), tz))
    return tuple(windows)


def current_window(
    windows: Iterable[MaintenanceWindow], instant: dt.datetime | None = None
) -> WindowOccurrence | None:
    """The window occurrence ``instant`` is in (the one ending last if several), or None."""
    instant = instant or now()
    inside = [o for w in windows for o in w.occurrences_around(instant, 0) if o.contains(instant)]
    return max(inside, key=lambda o: o.end) if inside else None


def real_run_window(
    windows: Sequence[MaintenanceWindow], instant: dt.datetime
) -> tuple[WindowOccurrence | None, str | None]:
    """Where a real run starting at ``instant`` stands: the window it is in (None outside every
    window), and why it needs ``allow_outside_window`` (None: it does not). Under a fixed clock
    it always does: the fixed instant is an assertion, not the time."""
    occ = current_window(windows, instant) if windows else None
    if not windows:
        return occ, None
    if fixed_clock() is not None:
        return occ, f"the clock is fixed by {CLOCK_ENV} at {instant.isoformat()}"
    return occ, None if occ is not None else "outside every maintenance window"


def next_window(
    windows: Iterable[MaintenanceWindow], instant: dt.datetime | None = None
) -> WindowOccurrence | None:
    """The first window occurrence starting after ``instant``."""
    instant = instant or now()
    later = [o for w in windows for o in w.occurrences_around(instant) if o.start > instant]
    return min(later, key=lambda o: o.start) if later else None


def cron_schedules(windows: Sequence[MaintenanceWindow]) -> list[str]:
    """One cron expression per distinct start time: ``"0 2 * * 0,3"`` = 02:00 on Sun and Wed."""
    by_start: dict[dt.time, set[int]] = {}
    for w in windows:
        by_start.setdefault(w.start, set()).update(_CRON_DAY[d] for d in w.days)
    return [
        f"{t.minute} {t.hour} * * {','.join(str(d) for d in sorted(days))}"
        for t, days in sorted(by_start.items())
    ]


def schedule_timezone(windows: Sequence[MaintenanceWindow]) -> str:
    zones = {w.timezone for w in windows}
    if len(zones) != 1:
        raise WindowConfigError(f"maintenance windows in several time zones: {sorted(zones)}")
    return zones.pop()


def describe_windows(windows: Sequence[MaintenanceWindow]) -> str:
    return "; ".join(w.describe() for w in windows) or "none"
