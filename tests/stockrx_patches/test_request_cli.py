"""`stockrx-patches request` and `requests`: a release request filed from the command line
(refused at once, nothing recorded, if it could never run) and requests read back, one in full or
all as JSON. The sensor that launches them is tested in test_sensors.py."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from patch_ops.database import get_engine
from stockrx_patches import requests as rq
from tests.support.stockrx import PRICE_JOB, seeded


def test_request_cli_inserts_a_pending_row(sqlite_url, tmp_path, capsys):
    from stockrx_patches.cli import main

    seeded(sqlite_url, items=5)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("ops:\n  plan_patch:\n    config:\n      adjustment_type: percentage\n")
    rc = main(
        [
            "request",
            PRICE_JOB,
            "--config",
            str(cfg),
            "--set",
            "adjustment_value=8",
            "--requested-by",
            "release-bot",
            "--release-tag",
            "v2.14.0",
            "--database-url",
            sqlite_url,
        ]
    )
    assert rc == 0
    assert "is pending" in capsys.readouterr().out
    row = rq.get_request(get_engine(sqlite_url), 1)
    assert row["run_config"] == {"adjustment_type": "percentage", "adjustment_value": 8}
    assert (row["status"], row["requested_by"], row["release_tag"]) == (
        "pending",
        "release-bot",
        "v2.14.0",
    )
    assert (
        main(
            [
                "request",
                PRICE_JOB,
                "--real",
                "--set",
                "adjustment_type=multiply",
                "--set",
                "adjustment_value=1.5",
                "--database-url",
                sqlite_url,
            ]
        )
        == 0
    )
    assert rq.get_request(get_engine(sqlite_url), 2)["run_config"] == {
        "adjustment_type": "multiply",
        "adjustment_value": 1.5,
        "dry_run": False,
    }
    assert main(["requests", "--database-url", sqlite_url]) == 0
    assert "release-bot" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["no_such_patch", "--set", "x=1"], "unknown patch 'no_such_patch'"),
        ([PRICE_JOB, "--set", "adjustment_type=percentage"], "adjustment_value"),
        ([PRICE_JOB, "--set", "adjustment_type=percentage", "--set", "adjustment_value=5000"],
         "percentage needs adjustment_value in [-100, 1000]"),
        ([PRICE_JOB, "--set", "adjustment_type=percentage", "--set", "adjustment_value=8",
          "--set", "nonsense=1"], "nonsense"),
    ],
    ids=["unknown patch", "missing field", "out of range", "unknown field"],
)
def test_request_cli_refuses_a_request_that_could_never_run(sqlite_url, capsys, argv, reason):
    # `request no_such_patch --set x=1` said "pending" (exit 0); the sensor rejected it later.
    from stockrx_patches.cli import main

    seeded(sqlite_url, items=5)
    assert main(["request", *argv, "--database-url", sqlite_url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: request refused, nothing recorded: ") and reason in err
    assert err.count("\n") == 1
    rq.ensure_requests_table(get_engine(sqlite_url))
    with get_engine(sqlite_url).connect() as conn:
        assert conn.execute(select(func.count()).select_from(rq.requests)).scalar_one() == 0


def test_requests_cli_shows_whole_reasons_as_json_and_one_request_in_full(sqlite_url, capsys):
    from stockrx_patches.cli import main

    engine = seeded(sqlite_url, items=5)
    reason = "invalid run config: " + "x" * 300
    request_id = rq.submit_request(engine, PRICE_JOB, {"dry_run": True}, "alice", None)
    with engine.begin() as conn:
        rq.mark(conn, request_id, rq.REJECTED, reason=reason)
    capsys.readouterr()
    assert main(["requests", "--json", "--database-url", sqlite_url]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["id"], row["status"], row["reason"]) == (request_id, "rejected", reason)
    assert main(["requests", str(request_id), "--database-url", sqlite_url]) == 0
    assert f"reason: {reason}\n" in capsys.readouterr().out
    assert main(["requests", "999", "--database-url", sqlite_url]) == 2
