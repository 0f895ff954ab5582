"""Rows the database would refuse: named, held back (or the run fails), the rest committed.

The schema carries production-like constraints no patch knows (tests/support/production.py):
a reserved-quantity CHECK, a NOT NULL without default, a foreign key.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from sqlalchemy import select, update

from patch_ops.steps.batching import BatchSizer
from patch_ops.steps.holdback import Refusal, bisect
from patch_ops.steps.report import impact_lines
from stockrx_patches.cli import main as cli_main
from stockrx_patches.patches.inventory_price_adjustment import InventoryPriceAdjustment
from stockrx_patches.registry import RegistryError, default_registry, load_project_config
from tests.support.production import (
    BD,
    PRICE_CAP,
    RESERVED_CHECK,
    expired_items,
    priced_items,
    production_schema,
)
from tests.support.stockrx import (
    defs_with,
    digest,
    failure_description,
    latest_execution,
    run_patch,
)

JOB = "batch_expiry_update"
PRICE_JOB = "inventory_price_adjustment"
REAL = {"business_date": BD.isoformat(), "dry_run": False}
PCT8 = {"adjustment_type": "percentage", "adjustment_value": 8}
TABLES = ("inventories", "batches", "inventory_logs")


def quantities(engine, md, table: str) -> dict[int, int]:  # type: ignore[no-untyped-def]
    t = md.tables[table]
    with engine.connect() as conn:
        return dict(conn.execute(select(t.c.id, t.c.quantity)).all())  # type: ignore[arg-type]


def held_json(url: str, capsys, execution_id: str | None = None) -> dict:  # type: ignore[no-untyped-def]
    capsys.readouterr()
    argv = ["held", "--database-url", url, "--json", *([execution_id] if execution_id else [])]
    assert cli_main(argv) == 0
    return json.loads(capsys.readouterr().out)


# -- the scheduled write-off: the done-when of issue 20 ---------------------------------------
def test_scheduled_expiry_holds_back_reserved_items_and_writes_off_the_rest(database_url, capsys):
    engine, md = production_schema(database_url)
    conflicting = {3: 2, 17: 5, 29: 1}
    expired_items(engine, md, 40, conflicting)
    result = run_patch(database_url, JOB, REAL, approve=False)  # scheduled: no approval
    assert result.success, failure_description(result)
    lots, items = quantities(engine, md, "batches"), quantities(engine, md, "inventories")
    assert {i for i, q in lots.items() if q} == set(conflicting)  # every other lot written off
    assert {i for i, q in items.items() if q} == set(conflicting)
    ex = latest_execution(engine, JOB)
    assert ex["status"] == "completed" and ex["phase"] == "verified"
    held = ex["report"]["held_back"]
    assert held["count"] == 3 and held["percent"] == 7.5
    assert [r["source_id"] for r in held["sample"]] == [3, 17, 29]
    assert all(RESERVED_CHECK in r["refusal"] for r in held["sample"])
    assert "inventories 3: quantity 5 → 0" in held["sample"][0]["values"]
    # bounded: k = 3 among 40 driving rows
    assert held["search"]["attempts"] <= 3 * (2 * math.ceil(math.log2(40)) + 1)
    assert held["search"]["longest_attempt_seconds"] >= 0
    assert "Held back: 3 row(s) the database would refuse" in ex["report_markdown"]
    assert RESERVED_CHECK in ex["report_markdown"]
    assert ex["report"]["validation"]["trial_apply"] == "passed with 3 driving row(s) held back"
    assert ex["staged_updates"] == 37 and ex["failed_records"] == 0
    # the notification's impact lines say how many, and where the list is
    assert any(line.startswith("held back") and "3 rows" in line
               and f"stockrx-patches held {ex['execution_id']}" in line
               for line in impact_lines(ex["report"]))
    listed = held_json(database_url, capsys)
    assert listed["execution_id"] == ex["execution_id"] and listed["count"] == 3
    assert [r["source_id"] for r in listed["rows"]] == [3, 17, 29]
    # the next run retries them: once the reservations are gone, they are written off
    with engine.begin() as conn:
        inv = md.tables["inventories"]
        conn.execute(update(inv).values(reserved_quantity=0))
    again = run_patch(database_url, JOB, REAL, approve=False)
    assert again.success, failure_description(again)
    assert not any(quantities(engine, md, "batches").values())
    ex2 = latest_execution(engine, JOB)
    assert ex2["report"]["held_back"] is None and ex2["staged_updates"] == 3


def test_more_refused_than_max_held_back_percent_fails_changing_nothing(database_url):
    engine, md = production_schema(database_url)
    expired_items(engine, md, 40, {i: 1 for i in (2, 4, 6, 8, 10)})  # 12.5 % > 10 %
    before = digest(engine, TABLES)
    result = run_patch(database_url, JOB, REAL, approve=False)
    assert not result.success
    assert digest(engine, TABLES) == before
    message = failure_description(result)
    assert "max_held_back_percent" in message and RESERVED_CHECK in message, message
    assert "5 inventories row(s) refused (" in message and "rows 2 (" in message
    ex = latest_execution(engine, JOB)
    assert ex["phase"] == "rolled_back" and ex["report"]["held_back"]["count"] == 0


@pytest.mark.parametrize("case", ["not_null", "foreign_key"])
def test_refusals_of_every_row_are_named_and_nothing_changes(database_url, case):
    engine, md = production_schema(database_url, log_source_not_null=case == "not_null")
    expired_items(engine, md, 12, {})
    before = digest(engine, TABLES)
    config = {**REAL, "user_id": 404} if case == "foreign_key" else REAL
    result = run_patch(database_url, JOB, config, approve=False)
    assert not result.success
    assert digest(engine, TABLES) == before
    message = failure_description(result)
    assert "the database would refuse the changes" in message
    assert "at least" in message and "more than max_held_back_percent" in message, message
    if case == "foreign_key":
        assert "foreign key" in message.lower(), message
    else:
        assert "source" in message.lower() or "null" in message.lower(), message


# -- patches that are not scheduled: fail by default; hold_back when set ----------------------
def price_items(url: str):  # type: ignore[no-untyped-def]
    return priced_items(url, 20, capped=(5, 12))


def prices_of(engine, md) -> dict[int, float]:  # type: ignore[no-untyped-def]
    inv = md.tables["inventories"]
    with engine.connect() as conn:
        return {i: float(p) for i, p in conn.execute(select(inv.c.id, inv.c.price))}


def test_a_release_patch_fails_by_default_naming_the_rows(database_url):
    engine, md = price_items(database_url)
    before = digest(engine, TABLES)
    result = run_patch(database_url, PRICE_JOB, {**PCT8, "dry_run": True})
    assert not result.success
    assert digest(engine, TABLES) == before
    message = failure_description(result)
    assert "on_refused_rows: fail" in message and PRICE_CAP in message, message
    assert "2 inventories row(s) refused (" in message and "rows 5 (" in message
    assert "price 250 → 270" in message
    ex = latest_execution(engine, PRICE_JOB)
    assert PRICE_CAP in ex["report"]["validation"]["database_refusal"]
    assert "Rows the database refuses" in ex["report_markdown"]


def hold_back_defs():  # type: ignore[no-untyped-def]
    settings = dataclasses.replace(
        default_registry().settings(PRICE_JOB), on_refused_rows="hold_back"
    )
    return defs_with((InventoryPriceAdjustment(), settings))


def test_the_real_run_holds_back_what_its_approving_dry_run_held_back(database_url, capsys):
    engine, md = price_items(database_url)
    defs = hold_back_defs()
    result = run_patch(database_url, PRICE_JOB, {**PCT8, "dry_run": False}, defs=defs)
    assert result.success, failure_description(result)
    after = prices_of(engine, md)
    assert after[5] == after[12] == 250 and after[1] == 108
    real = latest_execution(engine, PRICE_JOB)
    held = real["report"]["held_back"]
    approver = real["approved_by_execution_id"]
    assert held["approved_by"] == approver and held["count"] == 2
    assert real["report"]["validation"]["trial_apply"].startswith("skipped")
    dry = held_json(database_url, capsys, approver)
    assert held["sha256"] and [r["source_id"] for r in dry["rows"]] == [5, 12]
    assert [r["source_id"] for r in held_json(database_url, capsys)["rows"]] == [5, 12]


def test_a_new_refusal_in_the_real_run_is_drift_and_commits_nothing(database_url):
    # A change to what the patch reads or writes (a price) is caught before this, at plan time
    # (tests/patch_ops/test_drift.py); a refusal can still first appear at commit through a row
    # the patch neither reads nor writes: here the admin user its log rows name is deleted.
    engine, md = price_items(database_url)
    defs = hold_back_defs()
    config = {**PCT8, "user_id": 9}
    dry = run_patch(database_url, PRICE_JOB, {**config, "dry_run": True}, defs=defs)
    assert dry.success, failure_description(dry)
    with engine.begin() as conn:  # the application, after the approving dry run
        conn.execute(md.tables["admin_users"].delete().where(md.tables["admin_users"].c.id == 9))
    before = digest(engine, TABLES)
    real = run_patch(database_url, PRICE_JOB, {**config, "dry_run": False}, defs=defs,
                     approve=False)
    assert not real.success
    assert digest(engine, TABLES) == before
    message = failure_description(real)
    assert "nothing was committed" in message and "drift" in message, message
    assert "inventories row(s) refused (" in message and "rows 1 (" in message, message
    assert "foreign key" in message.lower(), message


# -- the search itself -------------------------------------------------------------------------
N = 20_000


@pytest.mark.parametrize("bad", [{7_777}, {3, 4_000, 11_111, 15_000, 19_999}, set(range(N))],
                         ids=["one", "five", "all"])
def test_bisection_finds_the_refused_rows_among_20000_with_few_attempts(bad):
    probes: list[tuple[int, int]] = []

    def probe(i: int, j: int) -> Refusal | None:
        probes.append((i, j))
        hit = next((b for b in sorted(bad) if i <= b <= j), None) if len(bad) < N else i
        return Refusal(f"row {hit}", "inventories") if hit is not None else None

    limit = N // 10  # max_held_back_percent 10
    found, attempts, stopped, at_least = bisect(N, probe, Refusal("all", "t"), limit)
    assert attempts == len(probes)
    if len(bad) < N:
        assert set(found) == bad and stopped is None and at_least == len(bad)
        assert attempts <= len(bad) * (2 * math.ceil(math.log2(N)) + 1)
    else:  # all refused: stops once more than the limit are known, ~4x the limit
        assert stopped == f"more than {limit:,} refused" and at_least > limit
        assert len(found) == 10  # a sample named, one per refused range
        assert attempts <= 4 * (limit + 1)
    print(f"k={len(bad)}: {attempts} trial applies")


@pytest.mark.parametrize("bad", [{7_777}, {3, 4_000, 11_111, 15_000, 19_999}],
                         ids=["one", "five"])
def test_the_search_on_a_real_database_finds_them_among_20000(sqlite_url, bad):
    """The same search through real trial applies (SQLite: the fastest here; the other
    databases run the smaller cases above)."""
    engine, md = production_schema(sqlite_url)
    expired_items(engine, md, N, {i: 1 for i in bad})
    result = run_patch(sqlite_url, JOB, {"business_date": BD.isoformat(), "dry_run": True},
                       approve=False)
    assert result.success, failure_description(result)
    held = latest_execution(engine, JOB)["report"]["held_back"]
    assert held["count"] == len(bad)
    assert held["search"]["attempts"] <= len(bad) * (2 * math.ceil(math.log2(N)) + 1)


@pytest.mark.parametrize("bad", [{7_777}, {3, 4_000, 11_111, 15_000, 19_999}],
                         ids=["one", "five"])
def test_in_chunks_no_attempt_holds_more_than_a_chunk(bad):
    probes: list[tuple[int, int]] = []

    def probe(i: int, j: int) -> Refusal | None:
        probes.append((i, j))
        return Refusal("row", "inventories") if any(i <= b <= j for b in bad) else None

    fixed = BatchSizer(1_000, 0, fixed=True)
    found, attempts, stopped, _ = bisect(N, probe, Refusal("all", "t"), N // 10, chunks=fixed)
    assert set(found) == bad and stopped is None and attempts == len(probes)
    assert max(j - i + 1 for i, j in probes) == 1_000
    assert attempts <= N // 1_000 + len(bad) * (2 * math.ceil(math.log2(1_000)) + 1)


def test_chunks_are_sized_by_the_time_they_take():
    now, sizes = [0.0], []

    def probe(i: int, j: int) -> Refusal | None:  # 1,000 rows a second, none refused
        sizes.append(j - i + 1)
        now[0] += (j - i + 1) / 1_000
        return None

    found = bisect(10_000, probe, Refusal("x", "t"), chunks=BatchSizer(100, 1.0),
                   clock=lambda: now[0])[0]
    assert found == {} and sum(sizes) == 10_000
    assert sizes[:5] == [100, 200, 400, 800, 1_000] and max(sizes) == 1_000


def test_a_refusal_of_rows_only_together_names_none():
    def probe(i: int, j: int) -> Refusal | None:  # 10 and 11 refuse only together
        return Refusal("unique", "t") if i <= 10 and j >= 11 else None

    found, _, stopped, _ = bisect(64, probe, Refusal("unique", "t"))
    assert found == {} and stopped is None
    for chunk in (8, 11):  # 10 and 11 in one chunk, then in two
        chunks = BatchSizer(chunk, 0, fixed=True)
        assert bisect(64, probe, Refusal("unique", "t"), chunks=chunks)[:3:2] == ({}, None)


def test_a_spent_time_budget_stops_the_search(database_url):
    engine, md = production_schema(database_url)
    expired_items(engine, md, 10, {4: 1})
    settings = dataclasses.replace(
        default_registry().settings(JOB), refusal_search_seconds=1e-9
    )
    from stockrx_patches.patches.batch_expiry_update import BatchExpiryUpdate

    before = digest(engine, TABLES)
    result = run_patch(database_url, JOB, REAL, defs=defs_with((BatchExpiryUpdate(), settings)),
                       approve=False)
    assert not result.success and digest(engine, TABLES) == before
    assert "time budget was spent" in failure_description(result)


# -- settings ----------------------------------------------------------------------------------
ENTRY = "patches:\n  p:\n    description: d\n"


@pytest.mark.parametrize("line", [
    "max_held_back_percent: 150", "max_held_back_percent: -1", "max_held_back_percent: ten",
    "max_held_back_percent: .nan", "on_refused_rows: skip",
])
def test_bad_refused_rows_settings_are_refused_in_one_line(tmp_path, line):
    path = tmp_path / "p.yml"
    path.write_text(ENTRY + f"    {line}\n")
    with pytest.raises(RegistryError) as err:
        load_project_config(path)
    assert "\n" not in str(err.value) and line.split(":")[0] in str(err.value)


def test_scheduled_patches_hold_back_by_default_others_fail():
    reg = default_registry()
    assert reg.settings(JOB).refused_rows_policy() == "hold_back"
    assert reg.settings(PRICE_JOB).refused_rows_policy() == "fail"
    assert reg.settings(JOB).max_held_back_percent == 10
