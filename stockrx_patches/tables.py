"""The StockRx tables (SQLAlchemy) as the Rails app defines them: items (``inventories``), their
lots (``batches``) and the stock log (``inventory_logs``). The pandera checks of their rows are in
``stockrx_patches.schemas``.

This metadata creates demo and test databases. Patch code never relies on it alone: the engine
reflects the live tables, which may have more columns, indexes and constraints than listed here.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Date,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    cast,
    literal,
    text,
)
from sqlalchemy.engine import Engine

from patch_ops.dialects.types import DATETIME_US, TABLE_OPTIONS

if TYPE_CHECKING:  # pandas is for the op processes: loading the code location skips it
    import pandas as pd

metadata = MetaData()

# Rails: bigint auto-increment ids. SQLite only auto-increments an INTEGER PRIMARY KEY.
Id = BigInteger().with_variant(Integer(), "sqlite")
# Rails on MySQL/MariaDB: datetime(6) timestamps, InnoDB tables in utf8mb4 (TABLE_OPTIONS).


def _timestamps() -> list[Column]:
    return [
        Column("created_at", DATETIME_US, nullable=False),
        Column("updated_at", DATETIME_US, nullable=False),
    ]


inventories = Table(
    "inventories",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("name", String(255), nullable=False, index=True),
    Column("quantity", Integer, nullable=False, server_default=text("0")),
    Column("price", Numeric(10, 2), nullable=False, server_default=text("0.0")),
    Column("status", Integer, nullable=False, server_default=text("0")),
    Column("batches_count", Integer, nullable=False, server_default=text("0")),
    Column("inventory_logs_count", Integer, nullable=False, server_default=text("0")),
    Column("shipments_count", Integer, nullable=False, server_default=text("0")),
    Column("receipts_count", Integer, nullable=False, server_default=text("0")),
    *_timestamps(),
    **TABLE_OPTIONS,
)

batches = Table(
    "batches",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column(
        "inventory_id",
        Id,
        ForeignKey("inventories.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("lot_code", String(255), nullable=False),
    Column("expires_on", Date, nullable=True, index=True),
    Column("quantity", Integer, nullable=False, server_default=text("0")),
    *_timestamps(),
    Index("uniq_inventory_lot", "inventory_id", "lot_code", unique=True),
    **TABLE_OPTIONS,
)

inventory_logs = Table(
    "inventory_logs",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column(
        "inventory_id",
        Id,
        ForeignKey("inventories.id", ondelete="RESTRICT"),
        nullable=False,
        index=True,
    ),
    Column("delta", Integer, nullable=False),
    Column("operation_type", String(255), nullable=False),
    Column("previous_quantity", Integer, nullable=False),
    Column("current_quantity", Integer, nullable=False),
    Column("note", Text, nullable=True),
    Column("user_id", BigInteger, nullable=True),
    *_timestamps(),
    **TABLE_OPTIONS,
)

OPERATION_TYPES = ("add", "remove", "adjust", "ship", "receive")

#: The columns a patch fills in the inventory_logs rows it inserts (the database gives ``id``):
#: a patch declares ``inserts = {"inventory_logs": INVENTORY_LOG_INSERTS}`` and builds the rows
#: with :func:`inventory_log_rows`.
INVENTORY_LOG_INSERTS = (
    "inventory_id",
    "delta",
    "operation_type",
    "previous_quantity",
    "current_quantity",
    "note",
    "user_id",
    "created_at",
    "updated_at",
)
TIMESTAMPS = ("created_at", "updated_at")


def inventory_log_rows(run_at: dt.datetime, source_id: Any, **columns: Any) -> pd.DataFrame:
    """New inventory_logs rows for ``Changes.inserts``: ``source_id`` (the driving row each
    comes from) and every column of INVENTORY_LOG_INSERTS; ``created_at`` and ``updated_at`` are
    ``run_at`` (``RunContext.run_at``, as Rails would stamp them). A missing or unknown column
    raises, so both patches write the same columns."""
    wanted = [c for c in INVENTORY_LOG_INSERTS if c not in TIMESTAMPS]
    if set(columns) != set(wanted):
        missing, unknown = set(wanted) - set(columns), set(columns) - set(wanted)
        raise ValueError(
            f"inventory_logs rows: missing {sorted(missing)}, unknown {sorted(unknown)}"
        )
    import pandas as pd  # transform only: loading a patch must not import it

    values = {**columns, **dict.fromkeys(TIMESTAMPS, run_at)}
    return pd.DataFrame({"source_id": source_id, **{c: values[c] for c in INVENTORY_LOG_INSERTS}})

def inventory_log_columns(run_at: dt.datetime, source_id: Any, **columns: Any) -> list[Any]:
    """:func:`inventory_log_rows` in SQL, for ``Patch.sql_transform``: the labelled columns of a
    SELECT of new inventory_logs rows (``source_id`` and every column of INVENTORY_LOG_INSERTS;
    the timestamps are ``run_at``). Plain values are typed here (PostgreSQL cannot infer the
    type of a NULL in an INSERT ... SELECT)."""
    wanted = [c for c in INVENTORY_LOG_INSERTS if c not in TIMESTAMPS]
    if set(columns) != set(wanted):
        missing, unknown = set(wanted) - set(columns), set(columns) - set(wanted)
        raise ValueError(
            f"inventory_logs columns: missing {sorted(missing)}, unknown {sorted(unknown)}"
        )
    stamp = literal(run_at, inventory_logs.c.created_at.type)
    values = {**columns, **dict.fromkeys(TIMESTAMPS, stamp)}
    out = [_sql_value(source_id, "source_id", BigInteger())]
    for name in INVENTORY_LOG_INSERTS:
        out.append(_sql_value(values[name], name, inventory_logs.c[name].type))
    return out


def _sql_value(value: Any, name: str, type_: Any) -> Any:
    if hasattr(value, "label"):
        return value.label(name)
    return cast(literal(value), type_).label(name)


# The app validates these in Ruby; the demo schema also states them as CHECKs so a patch that
# breaks them fails loudly in the database too.
_checks = [
    CheckConstraint("quantity >= 0", name="chk_inventories_quantity", table=inventories),
    CheckConstraint("price >= 0", name="chk_inventories_price", table=inventories),
    CheckConstraint("quantity >= 0", name="chk_batches_quantity", table=batches),
]

STOCKRX_TABLES = ("inventories", "batches", "inventory_logs")


def create_stockrx_schema(engine: Engine, drop_first: bool = False) -> None:
    """Create the three StockRx tables (demo and tests; production already has them)."""
    if drop_first:
        metadata.drop_all(engine)
    metadata.create_all(engine)
