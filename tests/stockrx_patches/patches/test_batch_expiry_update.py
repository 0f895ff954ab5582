"""batch_expiry_update: exact write-offs, log chains, grace/warning options, idempotence, every
invariant blocking the commit, database constraints caught before commit, the CLI."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from sqlalchemy import (
    CheckConstraint,
    Column,
    MetaData,
    String,
    Table,
    cast,
    func,
    insert,
    literal,
    literal_column,
    select,
    text,
    update,
)

from patch_ops.patch import PatchConfigError, PatchSettings, RunContext
from stockrx_patches.patches.batch_expiry_update import BatchExpiryConfig, BatchExpiryUpdate
from stockrx_patches.tables import batches, inventories, inventory_logs
from stockrx_patches.tables import metadata as stockrx_metadata
from tests.support.stockrx import (
    PRICE_JOB,
    T0,
    defs_with,
    digest,
    failure_description,
    latest_execution,
    run_patch,
    seeded,
)

JOB = "batch_expiry_update"
PATCH = BatchExpiryUpdate()
BD = dt.date(2026, 11, 29)  # the business date of every run here
RUN_AT = dt.datetime(2026, 11, 29, 1, 2, 3)
CTX = RunContext("e", RUN_AT, BD)
REAL = {"business_date": BD.isoformat(), "dry_run": False}
SETTINGS = PatchSettings(
    description="test patch",
    batch_size=2,  # several batches even on the small fixture
)

# item id → its lots: (lot_code, days from BD to expires_on or None, quantity).
FIXTURE: dict[int, list[tuple[str, int | None, int]]] = {
    1: [("A", -1, 30), ("B", -9, 20), ("C", 0, 25), ("D", None, 25)],  # yesterday, 9 days, today
    2: [("E", -3, 10), ("F", -10, 0), ("G", 5, 40)],  # F: no stock; G: expires in 5 days
    3: [("H", -1, 7)],  # only lot expired yesterday: item goes to 0
    4: [("I", 200, 12)],  # nothing expired: untouched
    5: [("J", -30, 4), ("K", -30, 6), ("L", 40, 1)],  # same expiry date: lot id order
    6: [],  # no lots at all
}


def build_fixture(engine, lots=FIXTURE, item_qty: dict[int, int] | None = None,
                  counters: dict[int, tuple[int, int]] | None = None) -> None:  # type: ignore[no-untyped-def]
    """Items with their lots and one receive log per lot; quantities and counter caches true
    unless ``item_qty`` / ``counters`` ({item: (batches_count, inventory_logs_count)}) say not."""
    stockrx_metadata.create_all(engine)
    with engine.begin() as conn:
        for item, item_lots in lots.items():
            qty = sum(q for _, _, q in item_lots)
            n_b, n_l = (counters or {}).get(item, (len(item_lots), len(item_lots)))
            conn.execute(
                insert(inventories).values(
                    id=item, name=f"item {item}", quantity=(item_qty or {}).get(item, qty),
                    price=100, status=0, batches_count=n_b, inventory_logs_count=n_l,
                    created_at=T0, updated_at=T0,
                )
            )
            running = 0
            for code, days, q in item_lots:
                conn.execute(
                    insert(batches).values(
                        inventory_id=item, lot_code=code, quantity=q, created_at=T0,
                        updated_at=T0,
                        expires_on=None if days is None else BD + dt.timedelta(days=days),
                    )
                )
                conn.execute(
                    insert(inventory_logs).values(
                        inventory_id=item, delta=q, operation_type="receive",
                        previous_quantity=running, current_quantity=running + q,
                        note=f"入荷 {code}", created_at=T0, updated_at=T0,
                    )
                )
                running += q
        if engine.dialect.name == "postgresql":
            for t in ("inventories", "batches", "inventory_logs"):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{t}', 'id'), "
                                  f"(SELECT coalesce(max(id), 1) FROM {t}))"))


def fixture_engine(url):  # type: ignore[no-untyped-def]
    from patch_ops.database import get_engine

    return get_engine(url)


def state(engine) -> tuple[dict, dict, list, dict]:  # type: ignore[no-untyped-def]
    """(item quantities, lot quantities by code, remove logs, counters) as plain Python."""
    with engine.connect() as conn:
        items = dict(conn.execute(select(inventories.c.id, inventories.c.quantity)).all())
        lots = dict(conn.execute(select(batches.c.lot_code, batches.c.quantity)).all())
        logs = [
            tuple(r) for r in conn.execute(
                select(inventory_logs.c.inventory_id, inventory_logs.c.delta,
                       inventory_logs.c.previous_quantity, inventory_logs.c.current_quantity,
                       inventory_logs.c.note)
                .where(inventory_logs.c.operation_type == "remove")
                .order_by(inventory_logs.c.id)
            )
        ]
        counters = {
            r.id: (r.batches_count, r.inventory_logs_count)
            for r in conn.execute(select(inventories))
        }
        real_b = dict(conn.execute(select(batches.c.inventory_id, func.count()).group_by(batches.c.inventory_id)).all())
        real_l = dict(conn.execute(select(inventory_logs.c.inventory_id, func.count()).group_by(inventory_logs.c.inventory_id)).all())
    real = {i: (real_b.get(i, 0), real_l.get(i, 0)) for i in counters}
    assert counters == real, "counter caches must stay true"
    return items, lots, logs, counters


def note(code: str, days: int, n: int) -> str:
    return f"期限切れ廃棄: ロット {code} (有効期限 {BD + dt.timedelta(days=days)}, {n}個)"


# ---------------------------------------------------------------------------------------------
# Pure transform and config
# ---------------------------------------------------------------------------------------------


def _frames() -> dict[str, pd.DataFrame]:
    rows, lot_rows, lot_id = [], [], 0
    for item, item_lots in FIXTURE.items():
        rows.append({"id": item, "name": f"item {item}", "quantity": sum(q for _, _, q in item_lots),
                     "price": 100.0, "status": 0, "batches_count": len(item_lots),
                     "inventory_logs_count": len(item_lots)})
        for code, days, q in item_lots:
            lot_id += 1
            lot_rows.append({"id": lot_id, "inventory_id": item, "lot_code": code, "quantity": q,
                             "expires_on": None if days is None else BD + dt.timedelta(days=days)})
    return {"inventories": pd.DataFrame(rows), "batches": pd.DataFrame(lot_rows)}


def test_transform_chains_log_rows_per_item_in_lot_order():
    changes = PATCH.transform(_frames(), BatchExpiryConfig(user_id=7), CTX)
    logs = changes.inserts["inventory_logs"]
    got = list(zip(logs["inventory_id"], logs["delta"], logs["previous_quantity"],
                   logs["current_quantity"], strict=True))
    # item 1: B (9 days ago) before A (yesterday); item 5: J and K expire the same day: id order
    assert got == [(1, -20, 100, 80), (1, -30, 80, 50), (2, -10, 50, 40), (3, -7, 7, 0),
                   (5, -4, 11, 7), (5, -6, 7, 1)]
    assert list(logs["note"]) == [note("B", -9, 20), note("A", -1, 30), note("E", -3, 10),
                                  note("H", -1, 7), note("J", -30, 4), note("K", -30, 6)]
    assert set(logs["operation_type"]) == {"remove"} and set(logs["user_id"]) == {7}
    inv = changes.updates["inventories"].set_index("id")
    assert inv["quantity"].to_dict() == {1: 50, 2: 40, 3: 0, 5: 1}
    assert inv["inventory_logs_count"].to_dict() == {1: 6, 2: 4, 3: 2, 5: 5}
    assert set(inv["updated_at"]) == {RUN_AT}
    lots = changes.updates["batches"]
    assert sorted(zip(lots["id"], lots["source_id"], lots["quantity"], strict=True)) == [
        (1, 1, 0), (2, 1, 0), (5, 2, 0), (8, 3, 0), (10, 5, 0), (11, 5, 0)]


@pytest.mark.parametrize(("grace", "written_off"), [(0, "ABEHJK"), (1, "BEJK"), (3, "BJK"),
                                                     (9, "JK"), (30, "")])
def test_grace_days_leave_recently_expired_lots_alone(grace, written_off):
    changes = PATCH.transform(_frames(), BatchExpiryConfig(grace_days=grace), CTX)
    logs = changes.inserts.get("inventory_logs", pd.DataFrame({"note": []}))
    codes = "".join(sorted(n.split("ロット ")[1][0] for n in logs["note"]))
    assert codes == written_off


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"grace_days": -1}, "grace_days must be in"),
        ({"warning_days": 4000}, "warning_days must be in"),
        ({"business_date": "2026-02-30"}, "business_date must be a date"),
        ({"business_date": "tomorrow"}, "business_date must be a date"),
    ],
)
def test_bad_config_is_refused(cfg, message):
    with pytest.raises(PatchConfigError, match=message):
        PATCH.check_config(BatchExpiryConfig(**cfg))


# ---------------------------------------------------------------------------------------------
# Through the job, on both backends
# ---------------------------------------------------------------------------------------------


def test_write_off_on_hand_built_fixture(database_url):
    engine = fixture_engine(database_url)
    build_fixture(engine)
    with engine.connect() as conn:
        untouched_4 = dict(conn.execute(select(inventories).where(inventories.c.id == 4)).mappings().one())
    dry = run_patch(database_url, JOB, {**REAL, "dry_run": True, "warning_days": 7})
    assert dry.success, failure_description(dry)
    ex = latest_execution(engine)
    assert ex["target_count"] == 4 and ex["report"]["targets"] == {"inventories": 4, "batches": 6}
    md = ex["report_markdown"]
    assert "### Lots expiring within 7 days (not changed): 2" in md  # C (today) and G (+5)
    warned = ex["report"]["sections"]["Lots expiring within 7 days (not changed)"]["rows"]
    assert [(r["lot_code"], r["quantity"]) for r in warned] == [("C", 25), ("G", 40)]

    result = run_patch(database_url, JOB, {**REAL, "user_id": 42})
    assert result.success, failure_description(result)
    items, lots, logs, counters = state(engine)
    assert items == {1: 50, 2: 40, 3: 0, 4: 12, 5: 1, 6: 0}
    assert lots == {"A": 0, "B": 0, "C": 25, "D": 25, "E": 0, "F": 0, "G": 40, "H": 0, "I": 12,
                    "J": 0, "K": 0, "L": 1}
    assert logs == [
        (1, -20, 100, 80, note("B", -9, 20)), (1, -30, 80, 50, note("A", -1, 30)),
        (2, -10, 50, 40, note("E", -3, 10)), (3, -7, 7, 0, note("H", -1, 7)),
        (5, -4, 11, 7, note("J", -30, 4)), (5, -6, 7, 1, note("K", -30, 6)),
    ]  # in id order: each item's chain reads top to bottom
    assert {i: c[1] for i, c in counters.items()} == {1: 6, 2: 4, 3: 2, 4: 1, 5: 5, 6: 0}
    with engine.connect() as conn:
        assert dict(conn.execute(select(inventories).where(inventories.c.id == 4)).mappings().one()) == untouched_4
        users = set(conn.execute(select(inventory_logs.c.user_id).where(inventory_logs.c.operation_type == "remove")).scalars())
    assert users == {42}
    ex = latest_execution(engine)
    assert ex["status"] == "completed" and ex["phase"] == "verified"
    assert ex["report"]["committed"] == {"inventories_updated": 4, "batches_updated": 6,
                                         "inventory_logs_inserted": 6}


def test_grace_period_through_the_job_and_its_report(database_url):
    engine = fixture_engine(database_url)
    build_fixture(engine)
    result = run_patch(database_url, JOB, {**REAL, "grace_days": 3, "warning_days": 0})
    assert result.success, failure_description(result)
    items, lots, logs, _ = state(engine)
    assert [lots[c] for c in "ABEHJK"] == [30, 0, 10, 7, 0, 0]  # A, E, H inside the grace period
    assert items[1] == 80 and items[3] == 7
    ex = latest_execution(engine)
    section = ex["report"]["sections"]["Expired lots inside the 3-day grace period (not changed)"]
    assert [r["lot_code"] for r in section["rows"]] == ["E", "A", "H"]
    assert "Lots expiring within" not in ex["report_markdown"]


def test_second_run_the_same_day_finds_nothing_to_do(database_url):
    engine = fixture_engine(database_url)
    build_fixture(engine)
    assert run_patch(database_url, JOB, REAL).success
    after_first = digest(engine)
    again = run_patch(database_url, JOB, REAL)
    assert again.success, failure_description(again)
    assert digest(engine) == after_first
    ex = latest_execution(engine)
    assert ex["status"] == "completed" and ex["target_count"] == 0
    assert "**Nothing to do**" in ex["report_markdown"]


def test_seeded_data_stays_consistent(database_url):
    engine = seeded(database_url, items=300)
    result = run_patch(database_url, JOB, {**REAL, "batch_size": 37})
    assert result.success, failure_description(result)
    ex = latest_execution(engine)
    assert ex["target_count"] > 10
    state(engine)  # counter caches true
    with engine.connect() as conn:
        left = conn.execute(
            select(func.count()).select_from(batches)
            .where(batches.c.expires_on < BD, batches.c.quantity > 0)
        ).scalar_one()
        by_lots = dict(conn.execute(select(batches.c.inventory_id, func.sum(batches.c.quantity)).group_by(batches.c.inventory_id)).all())
        by_items = dict(conn.execute(select(inventories.c.id, inventories.c.quantity)).all())
    assert left == 0
    assert {i: q for i, q in by_items.items() if i in by_lots} == {i: int(q) for i, q in by_lots.items()}


# ---------------------------------------------------------------------------------------------
# Every invariant blocks the commit
# ---------------------------------------------------------------------------------------------


class _NoSchemas(BatchExpiryUpdate):
    """The patch without its pandera schemas: only the SQL invariants stand in the way."""

    schemas = {}


class BrokenSums(_NoSchemas):
    name = "expiry_broken_sums"

    def transform(self, batch, config, ctx):  # type: ignore[no-untyped-def]
        changes = super().transform(batch, config, ctx)
        changes.updates["inventories"]["quantity"] -= 1  # removes one more than the lots held
        return changes


class BrokenArithmetic(_NoSchemas):
    name = "expiry_broken_arithmetic"

    def transform(self, batch, config, ctx):  # type: ignore[no-untyped-def]
        changes = super().transform(batch, config, ctx)
        changes.inserts["inventory_logs"]["current_quantity"] += 1
        return changes


class BrokenDelta(_NoSchemas):
    """Item 5's log rows record one unit less than its lots lost (each row still adds up)."""

    name = "expiry_broken_delta"

    def transform(self, batch, config, ctx):  # type: ignore[no-untyped-def]
        changes = super().transform(batch, config, ctx)
        logs = changes.inserts["inventory_logs"]
        five = logs["inventory_id"] == 5
        logs.loc[five, "delta"] += 1
        logs.loc[five, "current_quantity"] += 1
        return changes


class BrokenChain(_NoSchemas):
    """Every log row starts from the item's old quantity: rows add up, the chain does not."""

    name = "expiry_broken_chain"

    def transform(self, batch, config, ctx):  # type: ignore[no-untyped-def]
        changes = super().transform(batch, config, ctx)
        logs = changes.inserts["inventory_logs"]
        start = logs["inventory_id"].map(batch["inventories"].set_index("id")["quantity"])
        logs["previous_quantity"] = start
        logs["current_quantity"] = start + logs["delta"]
        return changes


class MissingLog(_NoSchemas):
    name = "expiry_missing_log"

    def transform(self, batch, config, ctx):  # type: ignore[no-untyped-def]
        changes = super().transform(batch, config, ctx)
        logs = changes.inserts["inventory_logs"]
        changes.inserts["inventory_logs"] = logs[logs["inventory_id"] != 5]
        return changes


class NoSchemaExpiry(_NoSchemas):
    name = "expiry_without_schemas"


def _defs(patch_cls):  # type: ignore[no-untyped-def]
    return defs_with((patch_cls(), SETTINGS))


@pytest.mark.parametrize(
    ("patch_cls", "fixture_kw", "expected", "offender"),
    [
        (BrokenArithmetic, {}, "log_quantities_add_up", 1),
        (BrokenSums, {}, "removed_from_items_equals_removed_from_lots", 1),
        (BrokenChain, {}, "log_chain_consistent", 1),
        (MissingLog, {}, "one_log_per_written_off_lot", 5),
        (BrokenDelta, {}, "logs_record_what_lots_lost", 5),
        (NoSchemaExpiry, {"item_qty": {3: 5}}, "no_negative_quantity", 3),  # holds 5, lot 7
        (BatchExpiryUpdate, {"counters": {2: (3, 9)}}, "inventory_logs_count_true", 2),
        (BatchExpiryUpdate, {"counters": {5: (4, 3)}}, "batches_count_true", 5),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_each_invariant_violation_blocks_the_commit(database_url, patch_cls, fixture_kw,
                                                    expected, offender):
    engine = fixture_engine(database_url)
    build_fixture(engine, **fixture_kw)
    before = digest(engine)
    job = patch_cls.name
    result = run_patch(database_url, job, REAL, defs=_defs(patch_cls) if job != JOB else None)
    assert not result.success
    assert digest(engine) == before  # nothing committed
    ex = latest_execution(engine)
    assert ex["status"] == "failed" and ex["phase"] == "rolled_back"
    broken = {b["name"]: b for b in ex["report"]["validation"]["invariants"]}
    assert expected in broken, broken.keys()
    sample = broken[expected]["sample"][0]
    assert offender in sample.values(), sample
    assert expected in ex["error_message"] and expected in failure_description(result)
    assert f"#### Rows breaking {expected}" in ex["report_markdown"]


def test_negative_stock_is_rejected_by_the_schema_first(database_url):
    engine = fixture_engine(database_url)
    build_fixture(engine, item_qty={3: 5})  # the item holds less than its expired lot
    before = digest(engine)
    result = run_patch(database_url, JOB, REAL)
    assert not result.success
    assert digest(engine) == before
    ex = latest_execution(engine)
    assert ex["failed_records"] == 1 and "failed validation" in ex["error_message"]
    rejected = ex["report"]["validation"]["rejects"]
    assert {r["source_id"] for r in rejected} == {3}
    assert {r["column_name"] for r in rejected} >= {"quantity", "current_quantity"}


# ---------------------------------------------------------------------------------------------
# A production schema with more columns and constraints than the patch knows
# ---------------------------------------------------------------------------------------------


def production_schema(engine) -> None:  # type: ignore[no-untyped-def]
    """The StockRx tables plus extra columns (one NOT NULL with a default) and two CHECKs:
    prices are capped at 20,000 yen; a removal must name the admin who did it."""
    md = MetaData()
    for t in stockrx_metadata.sorted_tables:
        t.to_metadata(md)
    md.tables["inventories"].append_column(Column("sku", String(32)))
    md.tables["inventories"].append_constraint(CheckConstraint("price <= 20000", name="chk_price_cap"))
    md.tables["batches"].append_column(Column("supplier", String(64), server_default="acme"))
    logs = md.tables["inventory_logs"]
    logs.append_column(Column("source", String(16), nullable=False, server_default="app"))
    logs.append_constraint(CheckConstraint("operation_type <> 'remove' OR user_id IS NOT NULL",
                                           name="chk_remove_has_user"))
    md.create_all(engine)


def sku(table: Table):  # type: ignore[no-untyped-def]
    """'SKU-' || id, in the SQL each database spells its own way (MySQL: CONCAT)."""
    return literal("SKU-") + cast(table.c.id, String)


@pytest.mark.parametrize(
    ("job", "config", "constraint"),
    [
        (JOB, REAL, "chk_remove_has_user"),
        (PRICE_JOB, {"adjustment_type": "percentage", "adjustment_value": 8, "dry_run": False},
         "chk_price_cap"),
    ],
)
def test_database_constraint_is_caught_before_commit(database_url, job, config, constraint):
    engine = fixture_engine(database_url)
    production_schema(engine)
    from stockrx_patches.seed import seed_demo

    seed_demo(engine, items=200, today=BD)  # prices up to 19,999.50 yen: +8 % breaks the cap
    with engine.begin() as conn:
        live = Table("inventories", MetaData(), autoload_with=conn)
        conn.execute(update(live).values(sku=sku(live)))
    before = digest(engine)
    for dry_run in (True, False):  # the dry run already tells
        result = run_patch(database_url, job, {**config, "dry_run": dry_run})
        assert not result.success
        assert digest(engine) == before
        ex = latest_execution(engine)
        assert ex["phase"] == "rolled_back" and ex["status"] == "failed"
        refusal = ex["report"]["validation"]["database_refusal"]
        assert constraint in refusal, refusal
        assert "the database would refuse the changes" in ex["error_message"]
        assert constraint in failure_description(result)
    if job == JOB:  # with an admin named, the same patch goes through; extra columns untouched
        result = run_patch(database_url, job, {**config, "user_id": 9})
        assert result.success, failure_description(result)
        with engine.connect() as conn:
            sources = set(conn.execute(text("SELECT source FROM inventory_logs")).scalars())
            skus = conn.execute(
                select(func.count()).select_from(inventories).where(
                    literal_column("sku") == sku(inventories)
                )
            ).scalar()
        assert sources == {"app"} and skus == 200


# ---------------------------------------------------------------------------------------------
# The CLI: `dagster job execute` with the multiprocess executor
# ---------------------------------------------------------------------------------------------


# The multiprocess/CLI run of this job, on PostgreSQL (the in-process tests cover SQLite too).
@pytest.mark.slow
@pytest.mark.postgres
def test_dagster_cli_runs_the_patch(pg_url, dagster_home, repo_root: Path, tmp_path):
    engine = fixture_engine(pg_url)
    build_fixture(engine)
    date_cfg = tmp_path / "date.yaml"
    date_cfg.write_text(yaml.safe_dump({"ops": {"plan_patch": {"config": {"business_date": BD.isoformat()}}}}))
    env = {**os.environ, "STOCKRX_DATABASE_URL": pg_url, "DAGSTER_HOME": str(dagster_home)}

    def execute(config_file: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(Path(sys.executable).parent / "dagster"), "job", "execute", "-m",
             "stockrx_patches.definitions", "-j", JOB, "-c", config_file, "-c", str(date_cfg)],
            cwd=repo_root, env=env, capture_output=True, text=True, timeout=300,
        )

    real = execute("config/runs/batch_expiry_update.real.yaml")
    assert real.returncode == 0, real.stdout[-3000:] + real.stderr[-3000:]
    items, _, logs, _ = state(engine)
    assert items[1] == 50 and len(logs) == 6
    ex = latest_execution(engine)
    assert ex["status"] == "completed" and ex["phase"] == "verified" and not ex["dry_run"]
    assert "multiprocess" in (real.stdout + real.stderr)
