"""The execution id where it leads the keys of the framework's bulk tables
(``patch_ops.dialects.types.EXECUTION_KEY``): PostgreSQL's 16-byte ``uuid``. Tables an earlier
version made with the ids as text are converted at their next use, their rows kept, so an
execution made before (its frozen ids and work rows in those shared tables, where such a version
kept them: ``tests.support.storage.as_stored_by``) still restores; a user that does not own
them is told so in one line."""

from __future__ import annotations

import secrets

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import func, select
from sqlalchemy.engine import Engine, make_url

from patch_ops import state
from patch_ops.database import get_engine
from tests.patch_ops.steps.test_restore import restore
from tests.support import stockrx as sx
from tests.support.storage import as_stored_by

pytestmark = pytest.mark.postgres

PCT8 = {"adjustment_type": "percentage", "adjustment_value": 8, "dry_run": False}
BULK = {
    "data_patch_targets": "execution_id",
    "data_patch_backup__inventories": "dp_execution_id",
    "data_patch_stage__inventories": "dp_execution_id",
    "data_patch_stage__inventory_logs": "dp_execution_id",
}


def key_types(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema()").all()
    return {t: d for t, c, d in rows if BULK.get(t) == c}


def as_earlier_version(engine: Engine, execution_id: str) -> None:
    """Execution ``execution_id`` stored as the versions before this one stored it (its frozen
    ids and work rows in the shared bulk tables), and those tables' execution ids as text, as
    those versions made them."""
    as_stored_by(engine, execution_id, None)
    assert key_types(engine) == dict.fromkeys(BULK, "uuid")  # made by this version
    with engine.begin() as conn:
        for table, column in BULK.items():
            conn.exec_driver_sql(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE varchar(36)")
    state.forget_mirrors()  # the next run is a new version's process
    engine.dispose()


def backup_rows(engine: Engine, execution_id: str) -> int:
    with engine.connect() as conn:
        backup = state.mirror_by_name(conn, "data_patch_backup__inventories")
        assert backup is not None
        return int(conn.execute(select(func.count()).select_from(backup).where(
            backup.c.dp_execution_id == execution_id)).scalar_one())


def test_text_keys_are_converted_at_the_next_run_and_an_earlier_backup_restores(pg_url):
    engine = sx.seeded(pg_url, items=200)
    before = sx.digest(engine)
    first = sx.run_patch(pg_url, sx.PRICE_JOB, PCT8)
    assert first.success, sx.failure_description(first)
    earlier = str(sx.latest_execution(engine, sx.PRICE_JOB)["execution_id"])
    as_earlier_version(engine, earlier)
    assert key_types(engine) == dict.fromkeys(BULK, "character varying")

    undone = restore(pg_url, earlier, dry_run=False)
    assert undone.success, sx.failure_description(undone)
    assert sx.digest(engine) == before
    again = sx.run_patch(pg_url, sx.PRICE_JOB, PCT8)
    assert again.success, sx.failure_description(again)

    assert key_types(engine) == dict.fromkeys(BULK, "uuid")
    assert backup_rows(engine, earlier) == 200  # the earlier execution's backup, kept
    assert sx.digest(engine) != before


def test_a_user_that_does_not_own_the_text_keyed_tables_is_told_in_one_line(pg_url):
    engine = sx.seeded(pg_url, items=50)
    first = sx.run_patch(pg_url, sx.PRICE_JOB, PCT8)
    assert first.success, sx.failure_description(first)
    as_earlier_version(engine, str(sx.latest_execution(engine, sx.PRICE_JOB)["execution_id"]))
    role, password = f"patcher_{secrets.token_hex(4)}", secrets.token_hex(12)
    u = make_url(pg_url)
    admin = psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database,
                            autocommit=True)
    r = sql.Identifier(role)
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(r, sql.Literal(password)))
    admin.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public "
                          "TO {}").format(r))
    admin.execute(sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {}").format(r))
    patch_url = u.set(username=role, password=password).render_as_string(False)
    try:
        refused = sx.run_patch(patch_url, sx.PRICE_JOB, {**PCT8, "dry_run": True})
        assert not refused.success
        message = sx.failure_description(refused)
        assert "data_patch_targets.execution_id holds execution ids as text" in message
        assert "needs the table's owner" in message and "\n" not in message
        assert key_types(engine) == dict.fromkeys(BULK, "character varying")  # nothing half-done
    finally:
        get_engine(patch_url).dispose()
        admin.execute(sql.SQL("DROP OWNED BY {}").format(r))
        admin.execute(sql.SQL("DROP ROLE {}").format(r))
        admin.close()
