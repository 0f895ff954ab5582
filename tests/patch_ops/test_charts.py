"""patch_ops.charts: bucket edges, the SQL histogram (SQLite and PostgreSQL), its Markdown."""

from __future__ import annotations

import random
from typing import Any

import pytest
from sqlalchemy import and_, case, event, func, select, update

from patch_ops import state
from patch_ops.charts import (
    Histogram,
    change_histogram,
    histogram_markdown,
    nice_edges,
)
from patch_ops.database import get_engine
from patch_ops.state import BACKUP, UPDATE
from patch_ops.steps.backup import take_backup
from patch_ops.steps.plan import plan_execution
from patch_ops.steps.report import approved_edges, build_report
from patch_ops.steps.transform import run_transform
from patch_ops.work_rows import WorkRows, work_rows
from resources.memory import MemoryGuard
from stockrx_patches.registry import default_registry
from stockrx_patches.seed import seed_demo

PRICE = "inventory_price_adjustment"


# Edges --------------------------------------------------------------------------------------


def test_nice_edges_use_round_steps() -> None:
    assert nice_edges(1, 1599, 12) == [float(x) for x in range(0, 1601, 200)]
    assert nice_edges(0.01, 0.07, 12)[:3] == pytest.approx([0.01, 0.015, 0.02])
    assert nice_edges(0.01, 0.07, 6) == pytest.approx([0.01 * i for i in range(1, 8)])


def test_nice_edges_have_zero_as_an_edge_when_the_range_crosses_it() -> None:
    edges = nice_edges(-9996, 100, 12)
    assert 0.0 in edges and edges[0] <= -9996 and edges[-1] >= 100


def test_nice_edges_of_a_single_value_is_one_bucket() -> None:
    assert nice_edges(1, 1, 12) == [1, 1]


def test_nice_edges_are_bounded_and_cover_the_range() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        a, b = sorted(rng.uniform(-1e6, 1e6) * 10 ** rng.randint(-6, 0) for _ in range(2))
        k = rng.randint(2, 30)
        edges = nice_edges(a, b, k)
        assert 1 <= len(edges) - 1 <= k, (a, b, k, edges)
        assert edges[0] <= a and edges[-1] >= b, (a, b, k, edges)
        assert edges == sorted(edges)


def test_nice_edges_refuse_fewer_than_two_buckets() -> None:
    with pytest.raises(ValueError):
        nice_edges(0, 1, 1)


# SQL histogram ------------------------------------------------------------------------------


def _staged_execution(url: str, **config: Any) -> tuple[Any, str]:
    """A planned, backed-up and transformed (not committed) price execution on 300 items."""
    engine = get_engine(url)
    seed_demo(engine, items=300)
    registry = default_registry()
    patch = registry.patches[PRICE]
    cfg = patch.config_class(**config)
    execution_id = plan_execution(engine, patch, registry.settings(PRICE), cfg)
    take_backup(engine, execution_id)
    run_transform(engine, patch, execution_id, MemoryGuard())
    return engine, execution_id


def _rows(engine: Any, execution_id: str) -> tuple[WorkRows, WorkRows]:
    """The execution's staged updates and before-images of the items, as change_histogram
    pairs them."""
    live = state.reflect_tables(engine, ["inventories"])["inventories"]
    return (work_rows(engine, live, execution_id, UPDATE),
            work_rows(engine, live, execution_id, BACKUP))


def _changes_in_python(engine: Any, execution_id: str) -> list[float]:
    st, bk = _rows(engine, execution_id)
    with engine.connect() as conn:
        rows = conn.execute(
            select(st.c.price, bk.c.price)
            .select_from(st.table.join(bk.table, bk.at(st.seq)))
            .where(st.mine)
        ).all()
    return [float(a) - float(b) for a, b in rows]


def _bucket_in_python(changes: list[float], edges: tuple[float, ...]) -> list[int]:
    counts = [0] * (len(edges) - 1)
    for c in changes:
        i = sum(1 for e in edges[1:-1] if c >= e)
        counts[i] += 1
    return counts


@pytest.mark.parametrize(
    "config",
    [
        {"adjustment_type": "percentage", "adjustment_value": 8},
        {"adjustment_type": "set_value", "adjustment_value": 10_000},  # ups and downs
        {"adjustment_type": "fixed_amount", "adjustment_value": -5_000},  # clamped at 0
    ],
    ids=["percentage", "set_value", "fixed_amount"],
)
def test_change_histogram_counts_every_staged_update_once(
    database_url: str, config: dict[str, Any]
) -> None:
    engine, execution_id = _staged_execution(database_url, **config)
    updates, before = _rows(engine, execution_id)
    with engine.connect() as conn:
        hist = change_histogram(conn, updates, before, "price", max_buckets=12)
    changes = _changes_in_python(engine, execution_id)
    assert hist.rows == len(changes) > 0
    assert sum(hist.counts) == hist.rows
    assert len(hist.counts) <= 12
    assert hist.min_change == pytest.approx(min(changes))
    assert hist.max_change == pytest.approx(max(changes))
    assert list(hist.counts) == _bucket_in_python(changes, hist.edges)
    engine.dispose()


def _counts_per_bucket_condition(engine: Any, execution_id: str, edges: tuple[float, ...]) -> list[int]:
    """The histogram's counts as the report counted them before session 17: one
    ``COUNT(CASE WHEN edge_i <= change < edge_i+1)`` per bucket, open-ended at both ends."""
    st, bk = _rows(engine, execution_id)
    change = (
        select((st.c.price - bk.c.price).label("change"))
        .select_from(st.table.join(bk.table, bk.at(st.seq)))
        .where(st.mine)
        .subquery()
    ).c.change
    n, conds = len(edges) - 1, []
    for i in range(n):
        parts = ([change >= edges[i]] if i > 0 else []) + ([change < edges[i + 1]] if i < n - 1 else [])
        conds.append(and_(*parts) if parts else change.is_not(None))
    with engine.connect() as conn:
        return list(conn.execute(select(*[func.count(case((c, 1))) for c in conds])).one())


@pytest.mark.parametrize(
    "config",
    [
        {"adjustment_type": "percentage", "adjustment_value": 8},
        {"adjustment_type": "set_value", "adjustment_value": 10_000},  # ups and downs, 0 on edges
        {"adjustment_type": "fixed_amount", "adjustment_value": 500},  # one bucket
    ],
    ids=["percentage", "set_value", "constant"],
)
def test_change_histogram_counts_as_one_condition_per_bucket_did(
    database_url: str, config: dict[str, Any]
) -> None:
    """The bucket of each change found by one searched CASE and grouped gives the counts one
    condition per bucket gave (the same comparisons with the same bound edges), in every
    database, changes on an edge included."""
    engine, execution_id = _staged_execution(database_url, **config)
    updates, before = _rows(engine, execution_id)
    with engine.connect() as conn:
        hist = change_histogram(conn, updates, before, "price")
    assert hist.rows > 0
    assert list(hist.counts) == _counts_per_bucket_condition(engine, execution_id, hist.edges)
    engine.dispose()


@pytest.mark.parametrize(
    ("config", "has_changes"),
    [
        ({"adjustment_type": "set_value", "adjustment_value": 10_000}, True),  # ups and downs
        ({"adjustment_type": "percentage", "adjustment_value": 8, "min_price": 10**8}, False),
    ],
    ids=["changes", "no_changes"],
)
def test_the_impact_report_has_the_histogram_the_chart_makes_on_its_own(
    database_url: str, config: dict[str, Any], has_changes: bool
) -> None:
    """The report hands the histogram the spread of the change from its own pass over the pairs;
    the histogram must be the one change_histogram computes by itself."""
    engine, execution_id = _staged_execution(database_url, **config)
    updates, before = _rows(engine, execution_id)
    with engine.connect() as conn:
        alone = change_histogram(conn, updates, before, "price")
    report = build_report(engine, execution_id)["updates"]["inventories"]
    assert bool(alone.rows) == has_changes, alone  # "changes" must not pass on an empty histogram
    if has_changes:
        assert sum(alone.counts) == alone.rows > 0
        assert report["histograms"]["price"] == alone.to_json()
        assert report["stats"]["price"]["min_change"] == alone.min_change
        assert report["rows"] == alone.rows
    else:
        assert report["rows"] == 0 and report["histograms"] == {} and report["stats"] == {}
    engine.dispose()


@pytest.mark.parametrize("guess", ["right", "wrong"])
def test_the_report_keeps_counts_below_guessed_edges_only_when_they_are_its_own(
    database_url: str, guess: str
) -> None:
    """Given bucket edges (a real run guesses its approving dry run's), the impact report counts
    the changes below them in its pass over the updated rows, and the histogram keeps those
    counts only when the edges are the ones it picks: then no bucketing query runs; else it
    buckets the changes itself. The same report either way, in every database."""
    engine, execution_id = _staged_execution(
        database_url, adjustment_type="set_value", adjustment_value=10_000  # ups and downs
    )
    plain = build_report(engine, execution_id)
    edges = plain["updates"]["inventories"]["histograms"]["price"]["edges"]
    assert len(edges) > 3
    if guess == "wrong":
        edges = [e * 2 for e in edges]
    seen: list[str] = []

    def statement(conn, cursor, sql, *args):  # type: ignore[no-untyped-def]
        seen.append(sql)

    event.listen(engine, "before_cursor_execute", statement)
    try:
        guessed = build_report(engine, execution_id, edges={"inventories": {"price": edges}})
    finally:
        event.remove(engine, "before_cursor_execute", statement)
    assert guessed == plain
    assert bool([s for s in seen if "bucketed" in s]) == (guess == "wrong")
    engine.dispose()


def test_the_guessed_edges_are_the_approving_reports_or_none(sqlite_url: str) -> None:
    """A real run guesses the edges of its approving dry run's histograms from that run's
    report; an approver whose row or report is gone gives no guess (validation goes on
    bucketing as before, it does not fail on a guess)."""
    engine, execution_id = _staged_execution(
        sqlite_url, adjustment_type="set_value", adjustment_value=10_000
    )
    report = build_report(engine, execution_id)
    with engine.begin() as conn:
        conn.execute(update(state.executions)
                     .where(state.executions.c.execution_id == execution_id)
                     .values(report=report))
    assert approved_edges(engine, execution_id) == {
        "inventories": {"price": report["updates"]["inventories"]["histograms"]["price"]["edges"]}
    }
    assert approved_edges(engine, "no-such-execution") == {}
    assert approved_edges(engine, None) == {}
    engine.dispose()


def test_change_histogram_of_an_execution_without_updates(sqlite_url: str) -> None:
    engine, execution_id = _staged_execution(
        sqlite_url, adjustment_type="percentage", adjustment_value=8, min_price=10**8
    )
    updates, before = _rows(engine, execution_id)
    with engine.connect() as conn:
        hist = change_histogram(conn, updates, before, "price")
        md = histogram_markdown(change_histogram(conn, updates, before, "price"))
    assert hist.rows == 0 and hist.counts == ()
    assert "No changed price values." in md
    engine.dispose()


def test_change_histogram_of_a_constant_change_is_one_bucket(sqlite_url: str) -> None:
    engine, execution_id = _staged_execution(
        sqlite_url, adjustment_type="percentage", adjustment_value=8
    )
    updates, before = _rows(engine, execution_id)
    with engine.connect() as conn:
        hist = change_histogram(conn, updates, before, "inventory_logs_count")
    assert hist.edges == (1.0, 1.0) and hist.counts == (hist.rows,)
    assert "| +1 | " in histogram_markdown(hist)
    engine.dispose()


def test_change_histogram_rejects_an_unknown_column(sqlite_url: str) -> None:
    engine, execution_id = _staged_execution(
        sqlite_url, adjustment_type="percentage", adjustment_value=8
    )
    updates, before = _rows(engine, execution_id)
    with engine.connect() as conn, pytest.raises(KeyError):
        change_histogram(conn, updates, before, "no_such_column")
    engine.dispose()


# Markdown -----------------------------------------------------------------------------------

SAMPLE = Histogram(
    column="price",
    edges=(-400.0, -200.0, 0.0, 200.0),
    counts=(10, 0, 40),
    rows=50,
    min_change=-350,
    max_change=199.5,
    unchanged=2,
)


def test_histogram_markdown_is_a_table_with_proportional_bars() -> None:
    md = histogram_markdown(SAMPLE, bar_width=20)
    lines = md.splitlines()
    assert lines[0] == "### Distribution of price changes (after − before)"
    assert lines[2:5] == ["| change of price | rows | |", "|---|---:|---|",
                          "| -400 to -200 | 10 | █████ |"]
    assert lines[5] == "| -200 to 0 | 0 |  |"
    assert lines[6] == "| 0 to +200 | 40 | " + "█" * 20 + " |"
    assert "50 rows; change from -350 to +199.5; 2 unchanged." in md


def test_histogram_markdown_partial_blocks_and_tiny_counts_stay_visible() -> None:
    h = Histogram("price", (0.0, 1.0, 2.0, 3.0), (1000, 1, 330), 1331, 0, 3)
    rows = [line for line in histogram_markdown(h, bar_width=30).splitlines() if "|" in line]
    assert rows[3].endswith("| ▏ |")  # 1 of 1000 still shows
    assert rows[4] == "| +2 to +3 | 330 | █████████▉ |"  # 330/1000 * 30 = 9.9 cells: 9 + 7/8


def test_histogram_round_trips_through_json() -> None:
    assert Histogram.from_json(SAMPLE.to_json()) == SAMPLE
    assert histogram_markdown(SAMPLE.to_json()) == histogram_markdown(SAMPLE)
