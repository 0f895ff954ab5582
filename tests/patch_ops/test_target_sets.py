"""Each new execution's frozen target sets are tables of its own (``patch_ops.target_sets``); an
execution an earlier version planned keeps its ids in the shared ``data_patch_targets`` and stays
usable: it approves a real run, its ids read the same, it is restored and purged. On SQLite,
PostgreSQL and MariaDB (as the least-privilege user there)."""

from __future__ import annotations

import hashlib
import struct

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from patch_ops import approval
from patch_ops.database import get_engine
from patch_ops.state import targets
from patch_ops.target_sets import (
    create_target_tables,
    existing_tables,
    target_counts,
    target_ids,
    target_table_name,
)
from patch_ops.work_rows import OWN_WORK_ROWS, drop_own_tables
from tests.support.faults import restore_run
from tests.support.stockrx import (
    PRICE_JOB,
    failure_description,
    hand_built,
    latest_execution,
    prices,
    run_patch,
)
from tests.support.storage import as_stored_by, purge_as_expired

PCT8 = {"adjustment_type": "percentage", "adjustment_value": 8}
TABLES = ["inventories", "inventory_logs"]


def run(url: str, dry_run: bool) -> dict:  # type: ignore[type-arg]
    result = run_patch(url, PRICE_JOB, {**PCT8, "dry_run": dry_run}, approve=False)
    assert result.success, failure_description(result)
    return latest_execution(get_engine(url))


def frozen(engine: Engine, execution_id: str) -> list[int]:
    with engine.connect() as conn:
        return sorted(conn.execute(target_ids(conn, execution_id, "inventories")).scalars())


def shared_rows(engine: Engine, execution_id: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).where(
            targets.c.execution_id == execution_id)).scalar_one())


def test_an_execution_freezes_its_targets_in_tables_of_its_own(database_url):
    engine = hand_built(database_url, [100, 200, 300])
    dry = run(database_url, True)
    assert dry["storage"] == OWN_WORK_ROWS and shared_rows(engine, dry["execution_id"]) == 0
    with engine.connect() as conn:  # a finished dry run's tables are dropped
        assert existing_tables(conn, dry["execution_id"], TABLES) == []
    done = run(database_url, False)
    assert done["approved_by_execution_id"] == dry["execution_id"]
    assert frozen(engine, done["execution_id"]) == [1, 2, 3]
    with engine.connect() as conn:
        assert target_counts(conn, done["execution_id"], TABLES) == {
            target_table_name(done["execution_id"], "inventories"): 3,
            target_table_name(done["execution_id"], "inventory_logs"): 0}


def test_an_earlier_versions_executions_approve_restore_and_purge(database_url):
    engine = hand_built(database_url, [100, 200, 300])
    before = prices(engine)
    dry = run(database_url, True)
    as_stored_by(engine, dry["execution_id"], None)  # approved across the upgrade
    done = run(database_url, False)
    assert done["approved_by_execution_id"] == dry["execution_id"]
    x = done["execution_id"]
    with engine.connect() as conn:
        own = approval.target_digest(conn, x, "inventories")
    as_stored_by(engine, x, None)
    assert frozen(engine, x) == [1, 2, 3] and shared_rows(engine, x) == 3
    with engine.connect() as conn:  # the same bytes hashed from either table: the same plan
        assert approval.target_digest(conn, x, "inventories") == own == {
            "count": 3,
            "sha256": hashlib.sha256(b"inventories\0" + struct.pack(">3q", 1, 2, 3)).hexdigest()}
        assert existing_tables(conn, x, TABLES) == []
    restored = restore_run(database_url, x)
    assert restored.success, failure_description(restored)
    assert prices(engine) == before
    newer = run(database_url, True)  # a new execution's tables next to the old shared rows
    purge_as_expired(engine, x, newer["execution_id"])
    assert shared_rows(engine, x) == 0
    with engine.connect() as conn:
        assert existing_tables(conn, newer["execution_id"], TABLES) == []


def test_making_or_dropping_the_tables_again_is_harmless(database_url):
    engine = hand_built(database_url, [100])
    dry = run(database_url, True)
    x = dry["execution_id"]
    made = create_target_tables(engine, x, TABLES)  # made again: found, not an error
    assert [t.name for t in made.values()] == [target_table_name(x, t) for t in TABLES]
    drop_own_tables(engine, [x], TABLES)
    drop_own_tables(engine, [x], TABLES)  # gone already: not an error either
    with engine.connect() as conn:
        assert existing_tables(conn, x, TABLES) == []
