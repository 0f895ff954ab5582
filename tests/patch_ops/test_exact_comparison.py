"""A row the application changed is a changed row, byte for byte, on every database.

MySQL/MariaDB compare text by its column's collation, and under their defaults 'apple' =
'Apple' = 'apple ' (MySQL 8's ``utf8mb4_0900_ai_ci`` also 'cafe' = 'café'). The commit's
conflict check, the restore's, verification and drift compare through
``patch_ops.dialects.functions.values_differ``, which tells such values apart: else the commit
would overwrite an application's change of case and a restore would undo it, silently. The same
on PostgreSQL for ``citext``. The compiled pandera checks judge text as pandas does (``as_bytes``),
and the runbook's query finds the prices written from single-precision reads (§17)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pandera.pandas as pa
import pytest
from pandera.typing import Series
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select, text, update
from sqlalchemy.dialects import mysql

from patch_ops import state
from patch_ops.database import get_engine
from patch_ops.dialects.functions import values_differ
from patch_ops.execution import CommitConflict
from patch_ops.sql_checks import compile_schema, failing
from patch_ops.state import UPDATE
from patch_ops.steps.commit import commit_execution
from patch_ops.target_sets import OWN_TARGETS
from patch_ops.work_rows import work_rows
from stockrx_patches.tables import inventories, inventory_logs
from tests.support.stockrx import (
    PRICE_JOB,
    digest,
    failure_description,
    hand_built,
    latest_execution,
    prices,
    run_job,
    run_patch,
    validated_price_run,
)
from tests.support.storage import as_stored_by

PCT8 = {"adjustment_type": "percentage", "adjustment_value": 8, "dry_run": False}


class Kinds(pa.DataFrameModel):
    kind: Series[str] = pa.Field(isin=["add", "adjust"])
    code: Series[str] = pa.Field(unique=True, ne="x")


def test_text_values_differ_byte_for_byte(database_url):
    engine = get_engine(database_url)
    latin1 = String(50).with_variant(mysql.VARCHAR(50, charset="latin1"), "mysql", "mariadb")
    md = MetaData()
    pairs = Table("pairs", md, Column("id", Integer, primary_key=True, autoincrement=False),
                  Column("a", latin1), Column("b", String(50)))
    md.create_all(engine)
    rows = [
        (1, "apple", "Apple"),  # case
        (2, "apple", "apple "),  # a trailing space
        (3, "cafe", "café"),  # an accent
        (4, "same", "same"),
        (5, None, None),
        (6, "x", None),
        (7, "café", "café"),  # the same text in latin1 and in utf8mb4 (MySQL): the same
    ]
    with engine.begin() as conn:
        conn.execute(insert(pairs), [{"id": i, "a": a, "b": b} for i, a, b in rows])
        differ = conn.execute(
            select(pairs.c.id).where(values_differ(pairs.c.a, pairs.c.b, pairs.c.b))
            .order_by(pairs.c.id)
        ).scalars().all()
        plain = conn.execute(select(pairs.c.id).where(pairs.c.a.is_distinct_from(pairs.c.b))
                             .order_by(pairs.c.id)).scalars().all()
    assert differ == [1, 2, 3, 6]
    if engine.dialect.name == "mysql":  # what a plain comparison misses there
        assert plain == [6]


def test_the_commit_refuses_when_the_app_changed_only_the_case_of_a_name(database_url):
    engine = hand_built(database_url, [100, 200, 300])
    execution_id, _ = validated_price_run(engine)
    old_prices = prices(engine)
    with engine.begin() as app:
        app.execute(update(inventories).where(inventories.c.id == 2).values(name="Item 2"))
    with pytest.raises(CommitConflict, match=r"inventories: 1 row\(s\), ids \[2\]"):
        commit_execution(engine, execution_id)
    assert prices(engine) == old_prices  # nothing committed


def test_a_restore_refuses_a_log_row_the_app_changed_only_in_case(database_url):
    engine = hand_built(database_url, [100, 200, 300])
    result = run_patch(database_url, PRICE_JOB, PCT8)
    assert result.success, failure_description(result)
    patched = latest_execution(engine, PRICE_JOB)["execution_id"]
    with engine.begin() as app:  # the note of the patch's log row for item 2, in capitals
        log_id, note = app.execute(
            select(inventory_logs.c.id, inventory_logs.c.note)
            .where(inventory_logs.c.inventory_id == 2).order_by(inventory_logs.c.id.desc())
        ).first()
        assert "(percentage:8)" in note
        app.execute(update(inventory_logs).where(inventory_logs.c.id == log_id)
                    .values(note=note.replace("percentage", "PERCENTAGE")))
    after_app = digest(engine)
    refused = run_job(database_url, "restore_patch", "plan_restore",
                      {"execution_id": patched, "dry_run": False})
    assert not refused.success
    assert "changed 1 row(s) after the patch; restore refused" in failure_description(refused)
    assert latest_execution(engine)["report"]["conflicts"]["inventory_logs"]["ids"] == [log_id]
    assert digest(engine) == after_app  # the application's change is kept


def test_compiled_text_checks_reject_what_pandera_rejects(database_url):
    """The in-database path's compiled pandera checks judge text as pandas does: 'ADJUST' is
    not in ``isin(["adjust", ...])``, and 'a', 'A' and 'a ' are three values for ``unique``."""
    rows = [(1, "adjust", "a"), (2, "ADJUST", "A"), (3, "adjust ", "a "), (4, "add", "X"),
            (5, "add", "b"), (6, "add", "b")]
    frame = pd.DataFrame(rows, columns=["id", "kind", "code"])
    try:
        Kinds.validate(frame.drop(columns="id"), lazy=True)
        pandas_failing: set[int] = set()
    except pa.errors.SchemaErrors as exc:
        pandas_failing = {int(frame.loc[i, "id"]) for i in exc.failure_cases["index"].dropna()}
    assert pandas_failing == {2, 3, 5, 6}

    engine = get_engine(database_url)
    md = MetaData()
    checked = Table("checked", md, Column("id", Integer, primary_key=True, autoincrement=False),
                    Column("kind", String(20)), Column("code", String(20)))
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(checked), [{"id": i, "kind": k, "code": c} for i, k, c in rows])
        sql_failing = set(conn.execute(
            select(checked.c.id).where(failing(compile_schema(Kinds), checked))
        ).scalars())
    assert sql_failing == pandas_failing


class Ranked(pa.DataFrameModel):
    kind: Series[str] = pa.Field(ge="B")


@pytest.mark.postgres
def test_postgresql_citext_and_linguistic_collations_compare_byte_for_byte(pg_url):
    """PostgreSQL: a ``citext`` column ('apple' = 'Apple') is compared as text, and an ICU
    collation's order ('a' before 'B') gives way to code point order ('B' before 'a'), as pandas
    orders text; the columns as the framework reflects them."""
    engine = get_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS citext")
        conn.exec_driver_sql('CREATE TABLE words (id int PRIMARY KEY, a citext, b citext, '
                             'kind text COLLATE "en-x-icu")')
        conn.exec_driver_sql("INSERT INTO words VALUES (1, 'apple', 'Apple', 'a'), "
                             "(2, 'same', 'same', 'B'), (3, 'x', 'X', 'A')")
    words = Table("words", MetaData(), autoload_with=engine)
    frame = pd.DataFrame({"kind": ["a", "B", "A"]}, index=[1, 2, 3])
    with pytest.raises(pa.errors.SchemaErrors) as pandas_says:
        Ranked.validate(frame, lazy=True)
    assert set(pandas_says.value.failure_cases["index"]) == {3}
    with engine.connect() as conn:
        plain = conn.execute(select(words.c.id).where(words.c.a.is_distinct_from(words.c.b))
                             ).scalars().all()
        differ = conn.execute(select(words.c.id).where(
            values_differ(words.c.a, words.c.b, words.c.a)).order_by(words.c.id)).scalars().all()
        rejected = set(conn.execute(
            select(words.c.id).where(failing(compile_schema(Ranked), words))).scalars())
    assert plain == []  # what citext's own equality sees
    assert differ == [1, 3]
    assert rejected == {3}


@pytest.mark.mysql
def test_the_runbook_query_finds_prices_read_in_single_precision(mysql_url):
    """docs/runbook.md §17's query, as written there, names the items of a run whose prices were
    computed from single-precision reads: the stage as the code before c087ce8 wrote it (35,406
    for 32,782.87 and 21,600,000 for 20,000,001 at +8 %, as that code committed on MariaDB), in
    the shared mirrors where the versions of those runs (before 2026-12-05) kept it."""
    runbook = (Path(__file__).resolve().parents[2] / "docs" / "runbook.md").read_text("utf-8")
    section = runbook.split("## 17. ", 1)[1]
    query = section.split("```sql\n", 1)[1].split("```", 1)[0]
    engine = hand_built(mysql_url, [32782.87, 20000001, 1250])
    execution_id, _ = validated_price_run(engine)
    commit_execution(engine, execution_id)
    as_stored_by(engine, execution_id, OWN_TARGETS)  # a run of a version of before 2026-12-05
    tables = state.reflect_tables(engine, ("inventories",))
    stage = work_rows(engine, tables["inventories"], execution_id, UPDATE)
    assert stage.shared and stage.table.name == "data_patch_stage__inventories"
    with engine.begin() as conn:
        for item, written in ((1, 35406), (2, 21600000)):
            conn.execute(update(stage.table).where(stage.mine, stage.seq == item)
                         .values(price=written))
        found = conn.execute(text(query), {"pct": 8, "execution_id": execution_id}).all()
    assert [(r.item_id, float(r.written), float(r.exact)) for r in found] == [
        (1, 35406, 35405), (2, 21600000, 21600001)]
