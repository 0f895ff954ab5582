"""DataFrames into tables: the column-wise COPY text (frames.copy_text) loads exactly what the
driver's own row-by-row path loads, edge values included; what it does not cover falls back."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Float,
    Integer,
    Interval,
    MetaData,
    Numeric,
    Table,
    Text,
    create_engine,
    insert,
    select,
)

from patch_ops.execution import fetch_rows
from patch_ops.frames import column_text, constant_text, copy_text, plain_records
from patch_ops.steps.transform import bulk_insert, read_columns

pytestmark = pytest.mark.postgres

T = dt.datetime(2026, 1, 15, 2, 3, 4, 56789)
TEXTS = ["plain", "tab\there", "new\nline", "cr\rx", "back\\slash", "\\N", "", "価格調整: 1,250円 → 1,350円", None]


def _frame() -> pd.DataFrame:
    n = len(TEXTS)
    return pd.DataFrame(
        {
            "id": np.arange(1, n + 1),
            "n_missing": [1.0, None, 3.0, 2.0**40, None, 0.0, -5.0, 7.0, 8.0],  # float64 for an int column
            "price": [0.1 + 0.2, 1349.0, 1e-7, 123456789.12, None, -0.0, 5e15, 2.5, 1 / 3],
            "amount": [Decimal("1.10"), Decimal("-0.01"), None, Decimal("1E+2"), Decimal("0"),
                       Decimal("99999999.99"), Decimal("3"), Decimal("4.5"), Decimal("6")],
            "flag": [True, False, True, True, False, False, True, False, True],
            "note": TEXTS,
            "at": [T, pd.NaT, T, T, T, T, T, T, T],
            "day": [dt.date(2026, 1, 15)] * 8 + [None],
            "nullable_int": pd.array([1, None, 3, 4, 5, 6, 7, 8, 9], dtype="Int64"),
        }
    )


def _table(md: MetaData, name: str) -> Table:
    return Table(
        name, md,
        Column("id", Integer, primary_key=True),
        Column("n_missing", BigInteger),
        Column("price", Float),
        Column("amount", Numeric(10, 2)),
        Column("flag", Boolean),
        Column("note", Text),
        Column("at", DateTime),
        Column("day", Date),
        Column("nullable_int", Integer),
    )


def test_copy_text_loads_what_the_driver_loads(pg_url):
    engine = create_engine(pg_url)
    md = MetaData()
    fast, slow = _table(md, "frames_fast"), _table(md, "frames_slow")
    md.create_all(engine)
    df = _frame()
    ints = {"id", "n_missing", "nullable_int"}
    assert copy_text(df, ints) is not None  # every column here takes the column-wise path
    with engine.begin() as conn:
        bulk_insert(conn, fast, df)
        conn.execute(insert(slow), plain_records(df))  # the driver's own adaptation
    with engine.connect() as conn:
        got = conn.execute(select(fast).order_by(fast.c.id)).all()
        want = conn.execute(select(slow).order_by(slow.c.id)).all()
    assert got == want
    assert [r.note for r in got] == TEXTS
    assert got[0].price == 0.1 + 0.2 and got[1].n_missing is None and got[3].n_missing == 2**40
    assert got[0].at == T and got[1].at is None and got[1].nullable_int is None


@pytest.mark.parametrize("row", range(len(TEXTS)))
def test_columns_of_one_value_load_what_the_driver_loads(pg_url, row):
    # every column holds one value (row `row` of the edge values, three times): the text of
    # one value repeated, where the values cannot print differently
    engine = create_engine(pg_url)
    md = MetaData()
    fast, slow = _table(md, f"frames_fast_{row}"), _table(md, f"frames_slow_{row}")
    md.create_all(engine)
    df = _frame().iloc[[row] * 3].reset_index(drop=True).assign(id=[1, 2, 3])
    ints = {"id", "n_missing", "nullable_int"}
    for c in df.columns:
        repeated = constant_text(df[c], c in ints)
        assert repeated is None or repeated == column_text(df[c], c in ints), c
    assert constant_text(df["note"], False) == [column_text(df["note"].iloc[:1], False)[0]] * 3
    with engine.begin() as conn:
        bulk_insert(conn, fast, df)
        conn.execute(insert(slow), plain_records(df))
    with engine.connect() as conn:
        got = conn.execute(select(fast).order_by(fast.c.id)).all()
        assert got == conn.execute(select(slow).order_by(slow.c.id)).all()
    assert [r.note for r in got] == [TEXTS[row]] * 3


def test_equal_values_that_print_differently_are_not_repeated():
    mixed = pd.Series([Decimal("1.0"), 1, Decimal("1")], dtype=object)  # all equal to 1
    assert constant_text(mixed, False) is None
    assert column_text(mixed, False) == ["1.0", "1", "1"]
    assert constant_text(pd.Series([np.nan, np.nan]), False) is None  # NaN equals nothing
    assert constant_text(pd.Series(["a", "b"]), False) is None


def test_uncovered_columns_fall_back_to_the_driver(pg_url):
    engine = create_engine(pg_url)
    md = MetaData()
    t = Table("frames_interval", md, Column("id", Integer, primary_key=True), Column("span", Interval))
    md.create_all(engine)
    df = pd.DataFrame({"id": [1, 2], "span": [dt.timedelta(hours=1), dt.timedelta(days=2)]})
    assert copy_text(df, {"id"}) is None
    fractions = pd.DataFrame({"id": [1.5]})  # a fraction for an integer column: not rounded here
    assert copy_text(fractions, {"id"}) is None
    with engine.begin() as conn:
        bulk_insert(conn, t, df)
    with engine.connect() as conn:
        assert conn.execute(select(t.c.span).order_by(t.c.id)).scalars().all() == [
            dt.timedelta(hours=1), dt.timedelta(days=2)
        ]


def test_batches_read_from_postgres_as_plain_tuples_hold_what_sqlalchemy_reads(pg_url):
    # the transform reads a batch past SQLAlchemy's Row objects when there is nothing to convert
    engine = create_engine(pg_url)
    md = MetaData()
    t = _table(md, "frames_read")
    md.create_all(engine)
    with engine.begin() as conn:
        bulk_insert(conn, t, _frame())
    query = select(*read_columns(t, t, [c.name for c in t.columns])).order_by(t.c.id)
    with engine.connect() as conn:
        plain = fetch_rows(conn, query)
        rows = conn.execute(query).all()
    assert type(plain[0]) is tuple  # the driver's own rows
    assert plain == [tuple(r) for r in rows]
    assert plain[0][2] == 0.1 + 0.2 and plain[0][3] == 1.1  # decimals read as floats
    assert plain[0][6] == T and plain[1][6] is None and [r[5] for r in plain] == TEXTS
