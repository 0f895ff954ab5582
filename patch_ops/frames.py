"""DataFrames to plain Python values for DB-API drivers, a column at a time (no per-cell Python
in the common cases): ints, floats and bools via numpy's ``tolist``; datetimes as
``datetime.datetime``; missing values (NaN, NaT, None, pd.NA) as ``None``."""

from __future__ import annotations

from typing import Any

import pandas as pd


def plain_column(s: pd.Series) -> list[Any]:
    missing = s.isna()
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        values = list(s.array.to_pydatetime())  # type: ignore[attr-defined]
    else:
        values = s.to_numpy(dtype=object).tolist() if s.dtype == object else s.tolist()
    if missing.any():
        for i in missing.to_numpy().nonzero()[0]:
            values[i] = None
    return values


def plain_rows(df: pd.DataFrame) -> tuple[list[str], list[tuple[Any, ...]]]:
    """(column names, row tuples) of plain Python values."""
    cols = [str(c) for c in df.columns]
    return cols, list(zip(*(plain_column(df[c]) for c in df.columns), strict=True))


def plain_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts of plain Python values (for ``conn.execute(insert(t), records)``)."""
    cols, rows = plain_rows(df)
    return [dict(zip(cols, row, strict=True)) for row in rows]
