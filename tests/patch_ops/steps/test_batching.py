"""BatchSizer (patch_ops.steps.batching): batch sizes by duration, fed synthetic (rows, seconds)
pairs (no clock, no sleep). Each expected size is worked out by hand in its comment."""

from __future__ import annotations

import pytest

from patch_ops.steps.batching import BatchSizer


def test_fixed_keeps_the_size_whatever_the_batches_take():
    sizer = BatchSizer(500, 2.0, fixed=True)
    assert [sizer.record(500, 0.01), sizer.record(500, 60.0), sizer.record(0, 1.0)] == [500] * 3
    assert sizer.size == 500


def test_sizes_follow_the_rate_of_the_last_three_batches_toward_the_target():
    sizer = BatchSizer(1000, 2.0)
    # 1000 rows in 1.6 s: 625 rows/s, 2 s of it is 1250
    assert sizer.record(1000, 1.6) == 1250
    # (1000 + 1250) rows in (1.6 + 2.5) s: 548.8 rows/s -> 1097.56, rounded down
    assert sizer.record(1250, 2.5) == 1097
    # (1000 + 1250 + 1097) / (1.6 + 2.5 + 2.0) s = 548.7 rows/s -> 1097.38
    assert sizer.record(1097, 2.0) == 1097
    # the first batch leaves the window: (1250 + 1097 + 1200) / (2.5 + 2.0 + 1.0) -> 1289.8
    # (all four would give 1280)
    assert sizer.record(1200, 1.0) == 1289
    assert sizer.size == 1289


def test_the_target_scales_the_size():
    sizer = BatchSizer(1000, 0.5)
    assert sizer.record(1000, 0.8) == 625  # 1250 rows/s, half a second of it


def test_a_size_at_most_doubles_from_one_batch_to_the_next():
    sizer = BatchSizer(1000, 2.0)
    assert sizer.record(1000, 0.1) == 2000  # 10,000 rows/s would want 20,000
    # (1000 + 2000) rows in 0.2 s: 15,000 rows/s would want 30,000; twice 2000
    assert sizer.record(2000, 0.1) == 4000


def test_a_size_at_most_halves_from_one_batch_to_the_next():
    sizer = BatchSizer(1000, 2.0)
    assert sizer.record(1000, 10.0) == 500  # 100 rows/s would want 200
    # (1000 + 500) rows in 20 s: 75 rows/s would want 150; half of 500
    assert sizer.record(500, 10.0) == 250


def test_min_and_max_rows_clamp_the_size():
    fast = BatchSizer(150, 2.0, min_rows=100, max_rows=250)
    assert fast.record(150, 0.01) == 250  # 2x would be 300
    assert fast.record(250, 0.01) == 250
    slow = BatchSizer(150, 2.0, min_rows=100, max_rows=250)
    assert slow.record(150, 100.0) == 100  # 0.5x would be 75
    assert slow.record(100, 100.0) == 100


def test_min_and_max_rows_never_exclude_the_starting_size():
    small = BatchSizer(50, 2.0, min_rows=100)
    assert small.min_rows == 50 and small.record(50, 100.0) == 50  # 0.5x is 25; floor 50
    big = BatchSizer(5000, 2.0, max_rows=1000)
    assert big.max_rows == 5000 and big.record(5000, 0.01) == 5000  # 2x is 10,000; ceiling 5000


@pytest.mark.parametrize("rows", [0, -1])
def test_a_batch_without_rows_changes_nothing(rows):
    sizer = BatchSizer(1000, 2.0)
    assert sizer.record(rows, 30.0) == 1000  # not read as 0 rows/s (which would halve it)
    assert sizer.record(1000, 1.6) == 1250  # and not in the window: 1000 / 1.6 s only
    assert sizer.record(rows, 0.0) == 1250
    assert sizer.record(1250, 2.5) == 1097  # as without the empty batches


@pytest.mark.parametrize("seconds", [0.0, -5.0])
def test_a_batch_that_took_no_measurable_time_counts_as_a_millisecond(seconds):
    # 1000 rows in 1 ms: 1,000,000 rows/s (no division by zero); 1.5 ms of it is 1500
    assert BatchSizer(1000, 0.0015).record(1000, seconds) == 1500


def test_cap_lowers_the_size_and_the_ceiling():
    sizer = BatchSizer(1000, 2.0)
    sizer.cap(300)
    assert (sizer.size, sizer.max_rows) == (300, 300)
    assert sizer.record(300, 0.01) == 300  # 2x would be 600
    sizer.cap(10)  # never below min_rows
    assert (sizer.size, sizer.max_rows) == (100, 100)
