"""A StockRx schema with production-like constraints that no patch knows about, and items with
one expired lot each, for the tests of rows the database refuses (patch_ops.steps.holdback)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    CheckConstraint,
    Column,
    ForeignKeyConstraint,
    Integer,
    MetaData,
    String,
    Table,
    insert,
    text,
    update,
)
from sqlalchemy.engine import Engine

from patch_ops.database import get_engine
from patch_ops.dialects import dialect_of
from stockrx_patches.tables import Id
from stockrx_patches.tables import metadata as stockrx_metadata

T0 = dt.datetime(2026, 1, 10, 9, 0, 0)
BD = dt.date(2026, 11, 29)  # the business date of the runs
RESERVED_CHECK = "chk_reserved_not_exceed_quantity"
ADMIN_FK = "fk_inventory_logs_admin_user"
PRICE_CAP = "chk_price_below_260"


def production_schema(
    url: str, log_source_not_null: bool = False, price_cap: bool = False
) -> tuple[Engine, MetaData]:
    """The StockRx tables plus: ``inventories.reserved_quantity`` with ``CHECK (reserved_quantity
    <= quantity)``; ``inventories.sku`` NOT NULL without a default; a foreign key
    ``inventory_logs.user_id`` → ``admin_users.id``. ``log_source_not_null``: also
    ``inventory_logs.source`` NOT NULL without a default (every insert of a patch is refused);
    ``price_cap``: also ``CHECK (price < 260)`` (``PRICE_CAP``)."""
    engine = get_engine(url)
    md = MetaData()
    for t in stockrx_metadata.sorted_tables:
        t.to_metadata(md)
    Table("admin_users", md, Column("id", Id, primary_key=True), Column("name", String(64)))
    inv = md.tables["inventories"]
    inv.append_column(
        Column("reserved_quantity", Integer, nullable=False, server_default=text("0"))
    )
    inv.append_constraint(CheckConstraint("reserved_quantity <= quantity", name=RESERVED_CHECK))
    inv.append_column(Column("sku", String(32), nullable=False))
    logs = md.tables["inventory_logs"]
    logs.append_constraint(
        ForeignKeyConstraint(["user_id"], ["admin_users.id"], name=ADMIN_FK)
    )
    if price_cap:
        inv.append_constraint(CheckConstraint("price < 260", name=PRICE_CAP))
    if log_source_not_null:
        logs.append_column(Column("source", String(16), nullable=False))
    md.create_all(engine)
    return engine, md


def expired_items(
    engine: Engine, md: MetaData, n: int, reserved: dict[int, int], quantity: int = 5,
    first: int = 1,
) -> None:
    """Items ``first``..``first + n - 1`` (admin user 9 with the first) with ``quantity`` in stock, all of it in one lot that expired ten days before
    ``BD``, one receive log each; ``reserved[id]`` units reserved (writing the lot off makes
    the item's quantity 0: an item with any reserved refuses it)."""
    inv, lots, logs = (md.tables[t] for t in ("inventories", "batches", "inventory_logs"))
    extra = {"source": "app"} if "source" in logs.c else {}
    with engine.begin() as conn:
        if first == 1:
            conn.execute(insert(md.tables["admin_users"]), [{"id": 9, "name": "admin"}])
        ids = range(first, first + n)
        conn.execute(insert(inv), [
            {"id": i, "name": f"item {i}", "quantity": quantity, "price": 100, "status": 0,
             "batches_count": 1, "inventory_logs_count": 1, "created_at": T0, "updated_at": T0,
             "sku": f"SKU-{i}", "reserved_quantity": reserved.get(i, 0)}
            for i in ids
        ])
        conn.execute(insert(lots), [
            {"id": i, "inventory_id": i, "lot_code": f"L{i}",
             "expires_on": BD - dt.timedelta(days=10), "quantity": quantity,
             "created_at": T0, "updated_at": T0}
            for i in ids
        ])
        conn.execute(insert(logs), [
            {"id": i, "inventory_id": i, "delta": quantity, "operation_type": "receive",
             "previous_quantity": 0, "current_quantity": quantity, "note": "in",
             "created_at": T0, "updated_at": T0, **extra}
            for i in ids
        ])
        dialect_of(conn).reset_id_sequences(conn, [inv, lots, logs])


def priced_items(url: str, n: int, capped: tuple[int, ...] = ()) -> tuple[Engine, MetaData]:
    """``production_schema`` with ``n`` items at 100 yen (+8 %: 108) and, if ``capped``, the
    price cap, those items at 250 (+8 %: 270, which the cap refuses)."""
    engine, md = production_schema(url, price_cap=bool(capped))
    expired_items(engine, md, n, {})
    if capped:
        inv = md.tables["inventories"]
        with engine.begin() as conn:
            conn.execute(update(inv).where(inv.c.id.in_(capped)).values(price=250))
    return engine, md
