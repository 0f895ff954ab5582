"""Where the framework's own tables live: the StockRx database's default schema, or a schema
(MySQL/MariaDB: a database on the same server) named by the URL's ``framework_schema``.

The framework tables are defined with the placeholder schema ``FRAMEWORK_SCHEMA``; every engine
from ``patch_ops.database.get_engine`` translates it (SQLAlchemy's ``schema_translate_map``) to
the configured schema or to none. So the patch user needs only SELECT/INSERT/UPDATE/DELETE on
the StockRx tables when the framework has a schema of its own. SQL written as text (bulk loads,
ANALYZE, ALTER) and the inspector do not see the translation: they use ``table_sql`` and
``framework_schema``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table, inspect

#: The schema the framework tables are declared in: a placeholder, never a real schema's name.
FRAMEWORK_SCHEMA = "stockrx_patches_framework"
#: The URL query parameter that names the framework's schema.
URL_PARAMETER = "framework_schema"


def translate_map(schema: str | None) -> dict[str | None, str | None]:
    """The ``schema_translate_map`` execution option of an engine whose framework tables live in
    ``schema`` (None: the database's default schema)."""
    return {FRAMEWORK_SCHEMA: schema or None}


def framework_schema(bind: Any) -> str | None:
    """The real schema of the framework tables for an engine or connection (None: default)."""
    mapping = bind.get_execution_options().get("schema_translate_map") or {}
    return mapping.get(FRAMEWORK_SCHEMA)


def real_schema(bind: Any, table: Table) -> str | None:
    """``table``'s schema as the database knows it (the placeholder translated)."""
    if table.schema == FRAMEWORK_SCHEMA:
        return framework_schema(bind)
    return table.schema


def has_table(bind: Any, table: Table) -> bool:
    """``table`` exists in the database (in its real schema)."""
    return bool(inspect(bind).has_table(table.name, schema=real_schema(bind, table)))


def table_sql(bind: Any, table: Table) -> str:
    """``table``'s quoted, schema-qualified name for SQL written as text."""
    q = bind.dialect.identifier_preparer
    schema = real_schema(bind, table)
    return (f"{q.quote_schema(schema)}." if schema else "") + q.quote(table.name)
