"""DataFrames to database rows, a column at a time (no per-cell Python in the common cases).

``plain_rows``/``plain_records``: plain Python values for DB-API drivers. Ints, floats and bools
via numpy's ``tolist``; datetimes as ``datetime.datetime``; missing values (NaN, NaT, None,
pd.NA) as ``None``.

``copy_text``: the rows as PostgreSQL ``COPY ... FROM STDIN`` text (tab-separated, ``\\N`` for
missing, backslash escapes), built column-wise by pandas/numpy instead of value by value in the
driver. It covers the dtypes patches produce (ints, floats, bools, naive datetimes, strings,
Decimals, dates); anything else returns ``None`` and the caller uses the driver's row path.

pandas and numpy are imported inside the functions: the dialects import this module, and loading
the code location (CLI, webserver, daemon) must not import them (the op processes have them from
the fork server's preload, so there the import is a dictionary lookup).
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

NULL = "\\N"
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
# Plain object values that print as COPY text with str() (after escaping). bool is handled on
# its own (t/f); float NaN means missing.
_OBJECT_TYPES = (str, int, float, Decimal, dt.date)


def plain_column(s: pd.Series) -> list[Any]:
    import pandas as pd

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


def _object_text(v: Any) -> str | None:
    if isinstance(v, str):
        return v.translate(_ESCAPES)
    import numpy as np
    import pandas as pd

    if v is None or v is pd.NaT or v is pd.NA or (isinstance(v, float) and v != v):
        return NULL
    if isinstance(v, bool | np.bool_):
        return "t" if v else "f"
    if isinstance(v, np.integer | np.floating):
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None  # the driver's spelling of infinities
    if isinstance(v, dt.datetime) and v.tzinfo is not None:
        return None  # time zones: the driver knows the session's rules; we do not guess
    if isinstance(v, _OBJECT_TYPES):
        return str(v).translate(_ESCAPES)
    return None


def column_text(s: pd.Series, integer_target: bool) -> list[str] | None:
    """One column as COPY text values, or None when it holds something this does not cover.

    ``integer_target``: the database column is an integer, so whole floats (an int column that
    became float64 because it has missing values) are written as integers.
    """
    import numpy as np
    import pandas as pd

    if not isinstance(s.dtype, np.dtype) or s.dtype.kind == "O":
        # object columns and pandas' extension dtypes (nullable ints, strings, categoricals)
        values = s.to_numpy(dtype=object)
        if pd.api.types.infer_dtype(values, skipna=False) == "string":
            strings = values.tolist()
            whole = "\n".join(strings)  # one scan in C instead of one per value
            if whole.count("\n") == len(strings) - 1 and not any(c in whole for c in "\t\r\\"):
                return strings  # nothing to escape: the common case
        out = [_object_text(v) for v in values]
        return None if any(v is None for v in out) else out  # type: ignore[return-value]
    kind = s.dtype.kind
    values = s.to_numpy()
    if kind in "iu":
        return list(map(str, values.tolist()))
    if kind == "b":
        return np.where(values, "t", "f").tolist()
    if kind == "f":
        if np.isinf(values).any():
            return None  # the driver's spelling of infinities
        missing = np.isnan(values)
        if integer_target:
            present = values[~missing]
            if (present % 1).any() or (np.abs(present) >= 2**63).any():
                return None  # a fraction for an integer column: the driver's path decides
            texts = list(map(str, np.where(missing, 0, values).astype(np.int64).tolist()))
        else:
            texts = list(map(repr, values.tolist()))  # the shortest text that reads back the same
        for i in np.flatnonzero(missing).tolist():
            texts[i] = NULL
        return texts
    if kind == "M":  # ISO 8601 (PostgreSQL reads the T); microseconds, as the driver sends
        text = np.datetime_as_string(values, unit="us").astype(object)
        text[np.isnat(values)] = NULL
        return text.tolist()
    return None


def constant_text(s: pd.Series, integer_target: bool) -> list[str] | None:
    """A column with one value throughout (an execution id, a run timestamp, all missing): that
    value's text once, repeated. None when the values differ or when equal values could print
    differently (objects of several types, such as 1 and Decimal("1.0"))."""
    import numpy as np
    import pandas as pd

    if len(s) < 2 or not isinstance(s.dtype, np.dtype):
        return None
    values = s.to_numpy()
    first = values[0]
    if s.dtype.kind == "O":
        if first is None:
            same = bool(s.isna().all())
        elif isinstance(first, str):
            same = pd.api.types.infer_dtype(values, skipna=False) == "string" and bool(
                (values == first).all()
            )
        else:
            return None
    elif s.dtype.kind in "iufbM":
        same = bool((values == first).all())  # NaN and NaT equal nothing: never "the same"
    else:
        return None
    if not same:
        return None
    one = column_text(s.iloc[:1], integer_target)
    return None if one is None else one * len(s)


def copy_text(df: pd.DataFrame, integer_columns: set[str]) -> str | None:
    """The frame as COPY text (one line per row), or None if a column is not covered."""
    columns = []
    for c in df.columns:
        integer_target = str(c) in integer_columns
        text = constant_text(df[c], integer_target) or column_text(df[c], integer_target)
        if text is None:
            return None
        columns.append(text)
    if not len(df):
        return ""
    return "\n".join(map("\t".join, zip(*columns, strict=True))) + "\n"
