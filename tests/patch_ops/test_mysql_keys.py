"""The framework's text keys on MySQL/MariaDB (``patch_ops.dialects.types.key_string``): compared
byte for byte, as PostgreSQL and SQLite compare them; and a database whose framework tables were
made before, in utf8mb4's linguistic collation, still runs a patch and its restore to the end."""

from __future__ import annotations

import pytest
from sqlalchemy import Table, func, insert, select
from sqlalchemy.engine import Engine

from patch_ops import state
from patch_ops.dialects.names import table_sql
from patch_ops.state import mirror_table, targets
from stockrx_patches.tables import inventories
from tests.support import stockrx as sx

pytestmark = pytest.mark.mysql


def test_execution_ids_and_table_names_are_keys_byte_for_byte(mysql_url):
    engine = sx.seeded(mysql_url, items=10)
    state.ensure_framework_tables(engine)
    rows = [("e-a", "inventories"), ("E-A", "inventories"), ("e-a", "Inventories")]
    with engine.begin() as conn:  # in utf8mb4_general_ci the last two are duplicate keys
        conn.execute(insert(targets), [{"execution_id": e, "table_name": t, "row_id": 1}
                                       for e, t in rows])
        found = conn.execute(select(func.count()).select_from(targets).where(
            targets.c.execution_id == "E-A")).scalar_one()
    assert found == 1


def linguistic(engine: Engine, table: Table) -> None:
    """``table``'s key columns as a version before ``key_string`` made them."""
    with engine.begin() as conn:
        for c in table.c:
            if getattr(c.type, "length", None) and c.name.endswith(("execution_id", "table_name",
                                                                   "action")):
                conn.exec_driver_sql(
                    f"ALTER TABLE {table_sql(conn, table)} MODIFY `{c.name}` VARCHAR"
                    f"({c.type.length}) CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci"
                    + ("" if c.nullable else " NOT NULL"))


def test_framework_tables_made_in_a_linguistic_collation_keep_working(mysql_url):
    """The executions, targets and backup mirror as an earlier version made them; the stage
    mirrors new. MySQL compares a ``_bin`` and a ``_ci`` column of one character set by
    ``_bin``, so a real run, its verification and its restore find the same rows."""
    engine = sx.seeded(mysql_url, items=200)
    before = sx.digest(engine)
    state.ensure_framework_tables(engine)
    backup = mirror_table(engine, inventories, "backup")
    for table in (state.executions, targets, backup):
        linguistic(engine, table)
    with engine.connect() as conn:
        found = conn.exec_driver_sql(
            "SELECT table_name, column_name, collation_name FROM information_schema.columns "
            "WHERE table_schema = DATABASE() AND column_name IN "
            "('execution_id', 'table_name', 'dp_execution_id', 'dp_action')").all()
    old = {state.executions.name, targets.name, backup.name}
    assert {(t, c): co for t, c, co in found if t in old} == {
        (state.executions.name, "execution_id"): "utf8mb4_general_ci",
        (targets.name, "execution_id"): "utf8mb4_general_ci",
        (targets.name, "table_name"): "utf8mb4_general_ci",
        (backup.name, "dp_execution_id"): "utf8mb4_general_ci",
        (backup.name, "dp_action"): "utf8mb4_general_ci"}
    result = sx.run_patch(mysql_url, sx.PRICE_JOB, {"adjustment_type": "percentage",
                                                    "adjustment_value": 8, "dry_run": False})
    assert result.success, sx.failure_description(result)
    ex = sx.latest_execution(engine, sx.PRICE_JOB)
    assert ex["phase"] == "verified" and ex["report"]["committed"]["inventories_updated"] > 100
    stage = mirror_table(engine, inventories, "stage").name
    with engine.connect() as conn:  # the stage the run made: the new keys beside the old
        assert conn.exec_driver_sql(
            "SELECT collation_name FROM information_schema.columns WHERE table_schema = "
            f"DATABASE() AND table_name = '{stage}' AND column_name = 'dp_execution_id'"
        ).scalar_one() == "utf8mb4_bin"
    assert sx.digest(engine) != before
    restored = sx.run_job(mysql_url, "restore_patch", "plan_restore",
                          {"execution_id": ex["execution_id"], "dry_run": False})
    assert restored.success, sx.failure_description(restored)
    assert sx.digest(engine) == before
