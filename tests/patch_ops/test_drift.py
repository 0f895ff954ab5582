"""Drift since approval (issue 19, item 4): what a real run commits is what its approving dry run
showed. Rows whose drift columns changed since are held back with their before / approved / now
values, or the run is refused above max_drift_percent; quantities moving is not drift; a
migration after approval is a new plan; require_distinct_approver."""

from __future__ import annotations

import dataclasses
import datetime as dt

from dagster import Definitions
from sqlalchemy import func, insert, select, update

from patch_ops.audit import AuditKeyring, read_events
from patch_ops.database import get_engine
from patch_ops.state import BACKUP, DRIFTED, INSERT, UPDATE, executions, rejects
from patch_ops.steps.drift import drift_columns
from patch_ops.target_sets import target_counts, target_set
from patch_ops.work_rows import existing_rows
from stockrx_patches.definitions import build_definitions
from stockrx_patches.patches.batch_expiry_update import BatchExpiryUpdate
from stockrx_patches.patches.inventory_price_adjustment import InventoryPriceAdjustment
from stockrx_patches.registry import Registry, default_registry, load_project_config
from stockrx_patches.tables import batches, inventories, inventory_logs
from tests.conftest import TEST_AUDIT_KEY
from tests.stockrx_patches.patches.test_batch_expiry_update import BD, build_fixture
from tests.support.stockrx import (
    PRICE_JOB,
    defs_with,
    digest,
    failure_description,
    hand_built,
    latest_execution,
    prices,
    run_patch,
)
from tests.support.storage import purge_as_expired

PCT8 = {"adjustment_type": "percentage", "adjustment_value": 8}


def defs_with_settings(**changes: object) -> Definitions:
    base = default_registry()
    settings = dict(base.config.patches)
    settings[PRICE_JOB] = dataclasses.replace(settings[PRICE_JOB], **changes)  # type: ignore[arg-type]
    return build_definitions(Registry(base.patches, dataclasses.replace(base.config, patches=settings)))


def run(url: str, dry_run: bool, who: str, defs: Definitions | None = None):  # type: ignore[no-untyped-def]
    return run_patch(url, PRICE_JOB, {**PCT8, "dry_run": dry_run, "launched_by": who}, defs=defs,
                     approve=False)


def app_moves_stock(engine, item: int, quantity: int) -> None:  # type: ignore[no-untyped-def]
    """What the application does every hour: a quantity, its log row, the counter, the clock."""
    with engine.begin() as conn:
        old = conn.execute(select(inventories.c.quantity).where(inventories.c.id == item)).scalar()
        conn.execute(update(inventories).where(inventories.c.id == item).values(
            quantity=quantity, inventory_logs_count=inventories.c.inventory_logs_count + 1,
            updated_at=dt.datetime(2026, 12, 1, 10, 0)))
        conn.execute(insert(inventory_logs).values(
            inventory_id=item, delta=quantity - old, operation_type="receive",
            previous_quantity=old, current_quantity=quantity, note="app",
            created_at=dt.datetime(2026, 12, 1, 10, 0), updated_at=dt.datetime(2026, 12, 1, 10, 0)))


def times_ten(engine, *items: int) -> None:  # type: ignore[no-untyped-def]
    with engine.begin() as conn:
        conn.execute(update(inventories).where(inventories.c.id.in_(items))
                     .values(price=inventories.c.price * 10))


def fingerprint_rows(engine, execution_id: str) -> int:  # type: ignore[no-untyped-def]
    """The dry run's rows kept as its fingerprint: backup rows and staged updates of the items."""
    rows = kept_rows(engine, execution_id)
    return rows["backup", "inventories"] + rows["update", "inventories"]


def kept_rows(engine, execution_id: str) -> dict[tuple[str, str], int]:  # type: ignore[no-untyped-def]
    """(kind, table) -> the execution's work rows of that kind (``backup``, ``update``,
    ``insert``: 0 when their table is gone); ("targets", "") its targets."""
    out: dict[tuple[str, str], int] = {}
    with engine.connect() as conn:
        for kind, action in (("backup", BACKUP), ("update", UPDATE), ("insert", INSERT)):
            for table in ("inventories", "inventory_logs"):
                rows = existing_rows(conn, table, execution_id, action)
                out[kind, table] = 0 if rows is None else int(conn.execute(
                    select(func.count()).select_from(rows.table).where(rows.mine)).scalar_one())
        out["targets", ""] = sum(target_counts(
            conn, execution_id, ["inventories", "inventory_logs"]).values())
    return out


def test_drift_is_defined_on_what_the_patch_reads_and_writes():
    # the price, not the counter cache or the timestamp the application bumps with every
    # stock movement; a related table's link to its driving row
    assert drift_columns(InventoryPriceAdjustment()) == {"inventories": ("price",)}
    assert drift_columns(BatchExpiryUpdate()) == {
        "inventories": ("quantity",), "batches": ("quantity", "inventory_id")}
    shipped = load_project_config().patches[PRICE_JOB]
    assert shipped.max_drift_percent == 1.0 and shipped.require_distinct_approver is False


def test_prices_changed_since_approval_are_held_back_and_the_rest_committed(database_url):
    engine = hand_built(database_url, [100 * i for i in range(1, 11)])
    defs = defs_with_settings(max_drift_percent=20)
    dry = run(database_url, True, "alice", defs)
    assert dry.success, failure_description(dry)
    dry_ex = latest_execution(engine)
    assert dry_ex["report"]["approval_fingerprint"]["rows"] == {"inventories": 10}
    times_ten(engine, 3, 7)  # the application, after the dry run was approved
    app_moves_stock(engine, 5, 9)  # quantities change hourly: not drift

    result = run(database_url, False, "bob", defs)
    assert result.success, failure_description(result)
    now = prices(engine)
    assert (now[3], now[7]) == (3000, 7000)  # held back, left as they are
    assert {i: p for i, p in now.items() if i not in (3, 7)} == {
        i: round(100 * i * 1.08) for i in range(1, 11) if i not in (3, 7)}
    ex = latest_execution(engine)
    assert ex["approved_by_execution_id"] == dry_ex["execution_id"]
    drift = ex["report"]["drift"]
    assert (drift["count"], drift["targets"], drift["percent"]) == (2, 10, 20.0)
    assert drift["sample"][0] == {
        "source_id": 3, "values": "inventories 3: price before 300, approved 324, now 3000"}
    assert ex["target_count"] == 8 and ex["report"]["targets"] == {"inventories": 8}
    assert "Changed since approval: 2 row(s) held back" in ex["report_markdown"]
    assert "price before 700, approved 756, now 7000" in ex["report_markdown"]
    with engine.connect() as conn:
        held = conn.execute(select(rejects.c.source_id, rejects.c.failure_case).where(
            rejects.c.execution_id == ex["execution_id"], rejects.c.check_name == DRIFTED)
            .order_by(rejects.c.source_id)).all()
    assert [h.source_id for h in held] == [3, 7]
    assert f"changed since approving dry run {dry_ex['execution_id']}" in held[0].failure_case
    events = read_events(engine, AuditKeyring.parse(TEST_AUDIT_KEY), ex["execution_id"])
    audited = [e for e in events if e["event_type"] == "drift_held_back"]
    assert audited[0]["public"]["rows"] == 2 and audited[0]["public"]["sample_ids"] == [3, 7]
    assert audited[0]["secret"]["sample"] == drift["sample"]


def test_more_drift_than_allowed_refuses_and_a_migration_is_a_new_plan(database_url):
    engine = hand_built(database_url, [100, 200, 300])
    dry = run(database_url, True, "alice")
    assert dry.success, failure_description(dry)
    dry_id = latest_execution(engine)["execution_id"]
    times_ten(engine, 2)
    before = digest(engine)

    result = run(database_url, False, "bob")  # 1 of 3 rows: above the default 1 %
    assert not result.success
    message = failure_description(result)
    assert "refused before any write" in message
    assert f"1 of 3 inventories rows (33.33 %) changed since approving dry run {dry_id}" in message
    assert "max_drift_percent (1 % of 3: 0 rows)" in message
    assert "rows 2 (inventories 2: price before 200, approved 216, now 2000)" in message
    assert digest(engine) == before
    ex = latest_execution(engine)
    assert ex["status"] == "failed" and "max_drift_percent" in ex["error_message"]
    assert ex["report"]["drift"]["count"] == 1

    with engine.begin() as conn:  # a migration after approval
        conn.exec_driver_sql("ALTER TABLE inventories ADD COLUMN discount_rate INTEGER")
    result = run(database_url, False, "bob")
    assert not result.success
    message = failure_description(result)
    assert "the schema of inventories changed since approval (column discount_rate added)" in (
        message), message
    assert digest(engine, ignore=("discount_rate",)) == before


def test_require_distinct_approver_and_the_fingerprints_lifetime(sqlite_url):
    engine = hand_built(sqlite_url, [100, 200])
    strict = defs_with_settings(require_distinct_approver=True)
    assert run(sqlite_url, True, "alice", strict).success
    dry_id = latest_execution(engine)["execution_id"]
    # what it read and what it would write stay; its staged log rows and targets are gone
    assert kept_rows(engine, dry_id) == {
        ("backup", "inventories"): 2, ("update", "inventories"): 2, ("insert", "inventories"): 0,
        ("backup", "inventory_logs"): 0, ("update", "inventory_logs"): 0,
        ("insert", "inventory_logs"): 0, ("targets", ""): 0}

    refused = run(sqlite_url, False, "Alice", strict)
    assert not refused.success
    message = failure_description(refused)
    assert f"require_distinct_approver: approving dry run {dry_id} was launched by alice" in message
    assert prices(engine) == {1: 100, 2: 200}
    result = run(sqlite_url, False, "bob", strict)
    assert result.success, failure_description(result)
    assert prices(engine) == {1: 108, 2: 216}

    # used by a commit: the next dry run of the patch drops it; the purge drops expired ones
    assert run(sqlite_url, True, "carol").success
    new_id = latest_execution(engine)["execution_id"]
    assert fingerprint_rows(engine, dry_id) == 0 and fingerprint_rows(engine, new_id) == 4
    # still valid and unused: kept by the next dry run
    assert run(sqlite_url, True, "dave").success
    dave_id = latest_execution(engine)["execution_id"]
    assert fingerprint_rows(engine, new_id) == 4
    # a cancelled dry run's work rows stay for the run with its config that continues it (here:
    # as if stopped); a dry run with another config leaves them
    with engine.begin() as conn:
        conn.execute(update(executions).where(executions.c.execution_id == dave_id)
                     .values(status="cancelled"))
    other = run_patch(sqlite_url, PRICE_JOB, {**PCT8, "adjustment_value": 9, "dry_run": True,
                                              "launched_by": "erin"}, approve=False)
    assert other.success, failure_description(other)
    assert latest_execution(engine)["execution_id"] != dave_id
    assert fingerprint_rows(engine, dave_id) == 4
    purge_as_expired(engine, new_id)
    assert fingerprint_rows(engine, new_id) == 0


def test_a_fingerprint_kept_by_an_earlier_version_approves_nothing(sqlite_url):
    # Earlier versions copied the fingerprint to data_patch_approved__<table>, not read now: a
    # real run approved by such a dry run is refused before any write, saying what to do.
    engine = hand_built(sqlite_url, [100, 200])
    assert run(sqlite_url, True, "alice").success
    dry = latest_execution(engine)
    report = dict(dry["report"])
    report["approval_fingerprint"] = {
        k: v for k, v in report["approval_fingerprint"].items() if k != "kept_in"}
    with engine.begin() as conn:
        conn.execute(update(executions).where(executions.c.execution_id == dry["execution_id"])
                     .values(report=report))
    result = run(sqlite_url, False, "bob")
    assert not result.success
    message = failure_description(result)
    assert (f"approving dry run {dry['execution_id']} kept no record of the values it read and "
            "would write in the drift columns (inventories.price)") in message, message
    assert "run a new dry run" in message
    assert prices(engine) == {1: 100, 2: 200}


def test_a_related_rows_drift_holds_back_its_driving_row(database_url):
    # batch_expiry_update made to need approval: a lot (related table batches, linked by
    # inventory_id) sold from since the dry run holds its item back, traced through the dry
    # run's own backup rows; the other items' lots are written off.
    engine = get_engine(database_url)
    build_fixture(engine)
    base = default_registry()
    expiry = "batch_expiry_update"
    settings = dataclasses.replace(base.config.patches[expiry], require_approved_plan=True,
                                   max_drift_percent=50)
    defs = defs_with((base.patches[expiry], settings))
    config = {"business_date": BD.isoformat(), "allow_outside_window": True}
    dry = run_patch(database_url, expiry, {**config, "dry_run": True, "launched_by": "alice"},
                    defs=defs, approve=False)
    assert dry.success, failure_description(dry)
    dry_id = latest_execution(engine)["execution_id"]
    with engine.begin() as conn:  # the application sells one from lot A of item 1
        lot_a = conn.execute(select(batches.c.id).where(batches.c.lot_code == "A")).scalar_one()
        conn.execute(update(batches).where(batches.c.id == lot_a).values(quantity=29))
        conn.execute(update(inventories).where(inventories.c.id == 1).values(quantity=99))

    result = run_patch(database_url, expiry, {**config, "dry_run": False, "launched_by": "bob"},
                       defs=defs, approve=False)
    assert result.success, failure_description(result)
    ex = latest_execution(engine)
    assert ex["approved_by_execution_id"] == dry_id
    drift = ex["report"]["drift"]
    assert drift["count"] == 1 and [s["source_id"] for s in drift["sample"]] == [1]
    assert f"batches {lot_a}: quantity before 30, approved 0, now 29" in drift["sample"][0][
        "values"], drift["sample"][0]["values"]
    assert "inventories 1: quantity before 100" in drift["sample"][0]["values"]
    with engine.connect() as conn:
        lots = dict(conn.execute(select(batches.c.lot_code, batches.c.quantity)).all())
        frozen = target_set(conn, ex["execution_id"], "batches")
        left = conn.execute(select(func.count()).select_from(frozen.table).where(
            frozen.mine, frozen.row_id == lot_a)).scalar_one()
    assert lots["A"] == 29 and lots["B"] == 20  # item 1 held back: its lots left as they are
    assert lots["H"] == 0 and lots["E"] == 0  # items 3 and 2: written off
    assert left == 0  # lot A left the target set with its item
