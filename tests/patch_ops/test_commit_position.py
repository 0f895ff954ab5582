"""The database's log position of a commit, recorded for point-in-time recovery: PostgreSQL's
WAL LSN, MariaDB's GTID position (binary log on, as in production), nothing on SQLite."""

from __future__ import annotations

from patch_ops.audit import AuditKeyring, read_events
from patch_ops.database import get_engine
from tests.conftest import TEST_AUDIT_KEY
from tests.support.stockrx import (
    PRICE_JOB,
    failure_description,
    hand_built,
    latest_execution,
    run_patch,
)

PCT8 = {"adjustment_type": "percentage", "adjustment_value": 8, "dry_run": False}


def lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


def test_a_commit_records_where_it_sits_in_the_database_log(database_url, request):
    engine = hand_built(database_url, [100, 200])
    result = run_patch(database_url, PRICE_JOB, PCT8)
    assert result.success, failure_description(result)
    ex = latest_execution(engine)
    position = ex["commit_position"]
    kind = request.node.callspec.params["database_url"]
    if kind == "sqlite":
        assert position == {"before": None, "after": None}
    elif kind == "postgres":
        assert lsn(position["after"]) > lsn(position["before"])
    else:
        assert position["before"].startswith("gtid_binlog_pos ")
        assert position["after"].startswith("gtid_binlog_pos ")
        assert position["after"] != position["before"]  # the patch's transaction got a GTID
    events = read_events(get_engine(database_url), AuditKeyring.parse(TEST_AUDIT_KEY),
                         str(ex["execution_id"]))
    [commit] = [e for e in events if e["event_type"] == "commit"]
    assert commit["public"]["log_position_before"] == position["before"]
