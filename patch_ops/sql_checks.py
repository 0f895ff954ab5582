"""A patch's pandera schemas compiled to SQL predicates, for the in-database transform path.

The pandera ``DataFrameModel`` stays the one declaration of a table's column checks. Its
built-in checks (``gt``/``ge``/``lt``/``le``/``eq``/``ne``, ``in_range``, ``isin``/``notin``,
``str_length``), ``nullable`` and ``unique`` are compiled from the schema objects
(``to_schema()``: each Check's ``name`` and ``statistics``) to SQL over the rows a batch would
stage, so they run where the data is. A custom check (``@pa.check`` / ``@pa.dataframe_check``)
runs there only through a SQL twin declared on it with :func:`sql_twin`; a check that compiles
to neither makes the patch refuse the in-database path, naming the check (none is skipped).
Column types (pandera's dtype/coerce) are the stage columns' own: a value is stored in its type.
Text is compared byte for byte, as pandas compares it (``exact``): under MySQL's default
collations 'ADJUST' would be in ``isin(["adjust"])`` and 'a' and 'A ' one value for ``unique``.

Why this rather than pandera's Ibis backend: Ibis is not a dependency, and these checks are a
handful of comparisons; measured, the compiled checks add one query per table per batch that
returns no rows when every row passes (benchmarks/README.md, issue 22).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, not_, or_, select
from sqlalchemy.sql import ColumnElement, FromClause

from patch_ops.dialects.functions import char_length, exact
from patch_ops.patch import Patch

if TYPE_CHECKING:  # pandera is for the op processes: loading the code location skips it
    import pandera.pandas as pa

#: pandera's names for the failures that are not Check objects.
NOT_NULLABLE, UNIQUE = "not_nullable", "field_uniqueness"

Predicate = Callable[[FromClause], ColumnElement[bool]]


class UncompilableCheck(Exception):
    """A check of a patch's schema has no SQL form: the patch cannot take the in-database path."""


def sql_twin(predicate: Callable[[Any], ColumnElement[bool]]) -> Callable[[Any], Any]:
    """Declare the SQL form of a custom pandera check, on the check itself::

        @sql_twin(lambda c: c.previous_quantity + c.delta == c.current_quantity)
        @pa.dataframe_check(error="previous_quantity + delta must equal current_quantity")
        @classmethod
        def quantities_add_up(cls, df): ...

    ``predicate`` gets the checked rows' columns (``.c``) for a dataframe check, the column for a
    column check, and returns what must hold (True: the row passes), as the pandas check does."""

    def attach(check: Any) -> Any:
        getattr(check, "__func__", check).__sql_twin__ = predicate
        return check

    return attach


@dataclass(frozen=True)
class SqlCheck:
    """One compiled check: ``name`` as pandera reports it, its ``column`` (None: a dataframe
    check, reported once per column of a failing row, as pandera does), and ``passes``, which
    builds the predicate over a relation of the checked rows (NULL: passes, as pandera ignores
    missing values)."""

    name: str
    column: str | None
    passes: Predicate
    dtype: str = ""


def _builtin(name: str, stats: dict[str, Any], col: ColumnElement[Any]) -> ColumnElement[bool]:
    if name == "str_length":  # in characters: of the text, not of its bytes
        n = char_length(col)
        if stats.get("exact_value") is not None:
            return n == stats["exact_value"]
        parts = []
        if stats.get("min_value") is not None:
            parts.append(n >= stats["min_value"])
        if stats.get("max_value") is not None:
            parts.append(n <= stats["max_value"])
        return and_(*parts)
    col = exact(col)
    if name == "greater_than":
        return col > stats["min_value"]
    if name == "greater_than_or_equal_to":
        return col >= stats["min_value"]
    if name == "less_than":
        return col < stats["max_value"]
    if name == "less_than_or_equal_to":
        return col <= stats["max_value"]
    if name == "equal_to":
        return col == stats["value"]
    if name == "not_equal_to":
        return col != stats["value"]
    if name == "in_range":
        lo, hi = stats["min_value"], stats["max_value"]
        low = col >= lo if stats.get("include_min", True) else col > lo
        high = col <= hi if stats.get("include_max", True) else col < hi
        return and_(low, high)
    if name == "isin":
        return col.in_(list(stats["allowed_values"]))
    if name == "notin":
        return col.not_in(list(stats["forbidden_values"]))
    raise KeyError(name)


def _column_check(model: type, column: str, check: Any, dtype: str) -> SqlCheck:
    label = f"{model.__name__}.{column}: {check.error or check.name}"
    if getattr(check, "groupby", None) is not None:
        raise UncompilableCheck(f"{label} (a grouped check)")
    twin = getattr(getattr(model, str(check.name), None), "__sql_twin__", None)
    stats = dict(check.statistics or {})
    if twin is None:
        try:
            _builtin(str(check.name), stats, func.coalesce(None))  # compiles?
        except KeyError:
            raise UncompilableCheck(f"{label} (no SQL twin: declare one with sql_twin)") from None

    def passes(rel: FromClause) -> ColumnElement[bool]:
        col = rel.c[column]
        held = twin(col) if twin is not None else _builtin(str(check.name), stats, col)
        return held if check.ignore_na else and_(col.is_not(None), held)

    return SqlCheck(str(check.error or check.name), column, passes, dtype)


def compile_schema(model: type[pa.DataFrameModel]) -> list[SqlCheck]:
    """Every check of ``model`` as SQL, in pandera's order; raises UncompilableCheck naming the
    first check that has no SQL form."""
    schema = model.to_schema()
    if schema.unique or schema.strict is True or schema.strict == "filter":
        raise UncompilableCheck(f"{model.__name__}: schema-wide unique/strict options")
    out: list[SqlCheck] = []
    for name, column in schema.columns.items():
        if column.regex:
            raise UncompilableCheck(f"{model.__name__}.{name}: a regex column")
        dtype = str(column.dtype)
        if not column.nullable:
            out.append(SqlCheck(NOT_NULLABLE, name, _not_null(name), dtype))
        if column.unique:
            out.append(SqlCheck(UNIQUE, name, _unique(name), dtype))
        out += [_column_check(model, name, chk, dtype) for chk in column.checks]
    for chk in schema.checks:
        twin = getattr(getattr(model, str(chk.name), None), "__sql_twin__", None)
        if twin is None:
            raise UncompilableCheck(
                f"{model.__name__}.{chk.name}: {chk.error or chk.name} "
                "(a dataframe check with no SQL twin: declare one with sql_twin)"
            )
        out.append(SqlCheck(str(chk.error or chk.name), None, _frame_twin(twin)))
    return out


def _not_null(column: str) -> Predicate:
    def passes(rel: FromClause) -> ColumnElement[bool]:
        return rel.c[column].is_not(None)

    return passes


def _frame_twin(twin: Callable[[Any], ColumnElement[bool]]) -> Predicate:
    def passes(rel: FromClause) -> ColumnElement[bool]:
        return twin(rel.c)

    return passes


def _unique(column: str) -> Predicate:
    def passes(rel: FromClause) -> ColumnElement[bool]:
        col = exact(rel.c[column])
        dupes = select(col).group_by(col).having(func.count() > 1).correlate(None)
        return not_(col.in_(dupes.scalar_subquery()))

    return passes


def uncompilable(schemas: dict[str, type[pa.DataFrameModel]]) -> str | None:
    """The first check of these schemas that has no SQL form, named (None: all compile)."""
    for model in schemas.values():
        try:
            compile_schema(model)
        except UncompilableCheck as exc:
            return str(exc)
    return None


def sql_path_problem(patch: Patch) -> str | None:
    """Why ``patch`` cannot take the in-database path (None: it can): it declares no SQL
    change, or one of its checks (named) has no SQL form. The plan refuses a run that asks for
    that path when it cannot (before anything is written); the transform falls back to Python
    when the run does not ask."""
    cls = type(patch)
    if cls.sql_transform is Patch.sql_transform:
        return "it declares no sql_transform (its change needs Python)"
    owner = {name: next(k for k in cls.__mro__ if name in vars(k))
             for name in ("transform", "sql_transform")}
    if owner["transform"] is not owner["sql_transform"] and issubclass(
        owner["transform"], owner["sql_transform"]
    ):
        # A subclass changed the Python transform only: the inherited SQL is another change.
        return (f"{owner['transform'].__name__} overrides transform but not sql_transform "
                f"(inherited from {owner['sql_transform'].__name__})")
    problem = uncompilable(patch.schemas)
    return None if problem is None else f"check {problem}"


def failing(checks: list[SqlCheck], rel: FromClause) -> ColumnElement[bool]:
    """True for a row of ``rel`` that fails any of ``checks``."""
    return or_(*[not_(c.passes(rel)) for c in checks])


def case_text(value: Any, dtype: str = "") -> str:
    """A failing value as pandera writes it in ``failure_case`` on the pandas path (after
    coercion to the schema's dtype): '5' for ints, '5.0' for floats, 'None' for missing."""
    if value is None:
        return "nan" if dtype.startswith("float") else "None"
    if dtype.startswith("int") and isinstance(value, int | float | Decimal):
        return str(int(value))
    if dtype.startswith("float") or isinstance(value, Decimal | float):
        return str(float(value))
    if isinstance(value, dt.datetime):
        import pandas as pd  # op processes only

        return str(pd.Timestamp(value))
    return str(value)
