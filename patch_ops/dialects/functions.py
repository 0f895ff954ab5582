"""SQL functions that each database spells differently, as portable SQLAlchemy constructs.

The in-database transform path and the compiled pandera checks build their SQL from these, so
no patch or step writes a database-specific function: each construct compiles to the right SQL
for SQLite, PostgreSQL and MySQL/MariaDB here (SQLAlchemy's ``@compiles``), the one place.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Float, Integer, Numeric, String, case, cast, func
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement


class char_length(FunctionElement[int]):  # noqa: N801 - SQL function names are lower case
    """Length of a text in characters (MySQL's ``length`` counts bytes)."""

    type = Integer()
    inherit_cache = True
    name = "char_length"


@compiles(char_length)
def _char_length(element: char_length, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(func.char_length(*element.clauses.clauses), **kw))


@compiles(char_length, "sqlite")
def _char_length_sqlite(element: char_length, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(func.length(*element.clauses.clauses), **kw))


class floor_number(FunctionElement[float]):  # noqa: N801
    """The largest whole number not above a double (SQLite's ``floor`` exists only in builds
    with the math functions: there, a CASE over the integer cast)."""

    type = Float()
    inherit_cache = True
    name = "floor_number"


@compiles(floor_number)
def _floor(element: floor_number, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(func.floor(*element.clauses.clauses), **kw))


@compiles(floor_number, "sqlite")
def _floor_sqlite(element: floor_number, compiler: Any, **kw: Any) -> str:
    (x,) = element.clauses.clauses
    whole = cast(x, BigInteger)
    expr = case((x < whole, whole - 1), else_=whole) * 1.0  # REAL, as floor() returns
    return str(compiler.process(expr, **kw))


class decimal_text(FunctionElement[str]):  # noqa: N801
    """A number as text with exactly ``places`` decimals ('1080.50'), as Python's
    ``f"{v:.2f}"`` writes a value that has at most that many decimals."""

    type = String()
    inherit_cache = False  # ``places`` is not part of SQLAlchemy's cache key
    name = "decimal_text"

    def __init__(self, expr: Any, places: int = 2):
        self.places = places
        super().__init__(expr)


@compiles(decimal_text)
def _decimal_text(element: decimal_text, compiler: Any, **kw: Any) -> str:
    (x,) = element.clauses.clauses
    expr = cast(cast(x, Numeric(30, element.places)), String)
    return str(compiler.process(expr, **kw))


@compiles(decimal_text, "sqlite")
def _decimal_text_sqlite(element: decimal_text, compiler: Any, **kw: Any) -> str:
    (x,) = element.clauses.clauses
    return str(compiler.process(func.printf(f"%.{int(element.places)}f", x), **kw))


class as_double(FunctionElement[float]):  # noqa: N801
    """A value as an IEEE double, as numpy computes (PostgreSQL ``float8``, SQLite ``REAL``,
    MySQL ``DOUBLE``: SQLAlchemy's Float cast is MySQL's single-precision FLOAT). MySQL spells
    it ``x + 0E0``: the same double as ``CAST(x AS DOUBLE)`` (checked on 400,000 decimals), which
    MySQL 8.0.16, supported here, does not have (it came in 8.0.17)."""

    type = Float()
    inherit_cache = True
    name = "as_double"


@compiles(as_double)
def _as_double(element: as_double, compiler: Any, **kw: Any) -> str:
    (x,) = element.clauses.clauses
    return str(compiler.process(cast(x, Float), **kw))


@compiles(as_double, "mysql")
def _as_double_mysql(element: as_double, compiler: Any, **kw: Any) -> str:
    (x,) = element.clauses.clauses
    return f"({compiler.process(x, **kw)} + 0E0)"


class as_bytes(FunctionElement[Any]):  # noqa: N801
    """A text value compared byte for byte. MySQL/MariaDB compare text by its column's
    collation: under their defaults ('apple' = 'Apple' = 'apple ', and 'cafe' = 'café' under
    MySQL 8's ``utf8mb4_0900_ai_ci``) a change of case, accent or trailing spaces is no change.
    There the text as utf8mb4 bytes (``CONVERT`` first, so a latin1 column and its utf8mb4
    mirror give the same bytes); SQLite ``COLLATE BINARY`` (a column may declare NOCASE);
    PostgreSQL as ``text`` in collation "C" (a ``citext`` column compares without case, and
    an ``en_US`` one orders 'a' before 'B'). Ordered so, text is in code point order, as
    Python orders it."""

    inherit_cache = True
    name = "as_bytes"

    def __init__(self, expr: Any):
        super().__init__(expr)
        # the values it is compared with are bound as plain text: a column type's collation
        # would be stated on them too (PostgreSQL refuses two explicit collations)
        self.type = String() if isinstance(expr.type, String) else expr.type


@compiles(as_bytes)
def _as_bytes(element: as_bytes, compiler: Any, **kw: Any) -> str:
    (x,) = element.clauses.clauses
    return str(compiler.process(x, **kw))


@compiles(as_bytes, "postgresql")
def _as_bytes_postgresql(element: as_bytes, compiler: Any, **kw: Any) -> str:
    (x,) = element.clauses.clauses
    return f'(CAST({compiler.process(x, **kw)} AS TEXT) COLLATE "C")'


@compiles(as_bytes, "sqlite")
def _as_bytes_sqlite(element: as_bytes, compiler: Any, **kw: Any) -> str:
    (x,) = element.clauses.clauses
    return f"({compiler.process(x, **kw)} COLLATE BINARY)"


@compiles(as_bytes, "mysql")
def _as_bytes_mysql(element: as_bytes, compiler: Any, **kw: Any) -> str:
    (x,) = element.clauses.clauses
    return f"CAST(CONVERT({compiler.process(x, **kw)} USING utf8mb4) AS BINARY)"


def exact(x: Any) -> Any:
    """``x`` as it is compared with other values: text byte for byte (``as_bytes``)."""
    return as_bytes(x) if isinstance(x.type, String) else x


def values_differ(a: Any, b: Any, col: Any) -> Any:
    """``a`` and ``b`` (values of column ``col``) differ, NULL-safe, and text byte for byte
    (``exact``); JSON is compared as its text (it has no equality on every database)."""
    if isinstance(col.type, JSON):
        a, b = cast(a, String), cast(b, String)
    return exact(a).is_distinct_from(exact(b))
