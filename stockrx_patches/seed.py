"""Deterministic demo data: items, their lots and the stock logs that explain their quantities.

Counter caches and quantities are consistent (item quantity = sum of its lots; one ``receive``
log per lot, chained previous → current), so invariants hold before any patch runs. Generation is
vectorised and streamed in chunks, loaded the fastest way the database offers
(``DatabaseDialect.load_frame``: COPY on PostgreSQL).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import numpy as np
import pandas as pd
from sqlalchemy import MetaData, func, select
from sqlalchemy.engine import Engine

from patch_ops.dialects import dialect_of
from patch_ops.dialects.names import framework_schema
from stockrx_patches.tables import batches, create_stockrx_schema, inventories, inventory_logs

CHUNK = 100_000
NOUNS = ("Aspirin", "Ibuprofen", "Amoxicillin", "Loratadine", "Omeprazole", "Metformin",
         "Cetirizine", "Paracetamol", "Lisinopril", "Atorvastatin", "Insulin", "Saline")
FORMS = ("tablet", "capsule", "syrup", "ampoule", "patch", "drops")


def _chunk_frames(
    start_id: int, n: int, rng: np.random.Generator, today: dt.date, base_ts: dt.datetime
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    ids = np.arange(start_id, start_id + n, dtype=np.int64)
    lots_per_item = rng.integers(1, 4, n)  # 1..3 lots
    lot_item = np.repeat(ids, lots_per_item)
    lot_no = np.concatenate([np.arange(k) for k in lots_per_item]) + 1
    lot_qty = rng.integers(0, 200, len(lot_item))
    lot_qty[rng.random(len(lot_item)) < 0.1] = 0
    # Expiry spread over roughly -60..+365 days; a few lots have no expiry date.
    offsets = rng.integers(-60, 366, len(lot_item))
    expires = pd.to_datetime(today) + pd.to_timedelta(offsets, unit="D")
    expires_on = pd.Series(expires.date, dtype=object)
    expires_on[rng.random(len(lot_item)) < 0.03] = None
    qty = np.bincount(lot_item - start_id, weights=lot_qty, minlength=n).astype(np.int64)

    created = pd.Timestamp(base_ts) - pd.to_timedelta(rng.integers(30, 900, n), unit="D")
    updated = created + pd.to_timedelta(rng.integers(0, 30 * 86400, n), unit="s")
    price = rng.integers(10, 20_000, n).astype(np.float64)
    half = rng.random(n) < 0.05
    price[half] += 0.5
    price[rng.random(n) < 0.01] = 0.0
    names = [
        f"{NOUNS[i % len(NOUNS)]} {FORMS[(i // 7) % len(FORMS)]} {i:07d}" for i in ids.tolist()
    ]
    items = pd.DataFrame(
        {
            "id": ids,
            "name": names,
            "quantity": qty,
            "price": price,
            "status": (rng.random(n) < 0.1).astype(np.int64),
            "batches_count": lots_per_item.astype(np.int64),
            "inventory_logs_count": lots_per_item.astype(np.int64),
            "shipments_count": 0,
            "receipts_count": lots_per_item.astype(np.int64),
            "created_at": created,
            "updated_at": updated,
        }
    )
    lot_created = np.repeat(created.values, lots_per_item)
    lots = pd.DataFrame(
        {
            "inventory_id": lot_item,
            "lot_code": [f"L{i:07d}-{k:02d}" for i, k in zip(lot_item.tolist(), lot_no.tolist(), strict=True)],
            "expires_on": expires_on.values,
            "quantity": lot_qty,
            "created_at": lot_created,
            "updated_at": lot_created,
        }
    )
    running = lots.groupby("inventory_id")["quantity"].cumsum().to_numpy()
    logs = pd.DataFrame(
        {
            "inventory_id": lot_item,
            "delta": lot_qty,
            "operation_type": "receive",
            "previous_quantity": running - lot_qty,
            "current_quantity": running,
            "note": [f"入荷 lot {c}" for c in lots["lot_code"]],
            "user_id": None,
            "created_at": lot_created,
            "updated_at": lot_created,
        }
    )
    return items, lots, logs


def _frames(
    items: int, seed: int, today: dt.date
) -> Iterator[tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]]:
    rng = np.random.default_rng(seed)
    base_ts = dt.datetime.combine(today, dt.time(0, 0))
    for start in range(1, items + 1, CHUNK):
        yield _chunk_frames(start, min(CHUNK, items + 1 - start), rng, today, base_ts)


class SeedRefused(RuntimeError):
    """The demo data would mix with data already there."""


def seed_demo(
    engine: Engine,
    items: int = 100_000,
    seed: int = 20261129,
    today: dt.date | None = None,
    reset: bool = False,
) -> dict[str, int]:
    """Create the StockRx tables (dropping them first with ``reset``) and fill them."""
    today = today or dt.date.today()
    if reset:
        # A fresh demo: the engine's own tables (history, backups, locks, audit) go too.
        md = MetaData()
        md.reflect(engine, schema=framework_schema(engine))
        framework = [t for t in md.tables.values() if t.name.startswith("data_patch_")]
        md.drop_all(engine, tables=framework)
    create_stockrx_schema(engine, drop_first=reset)
    with engine.connect() as conn:
        if conn.execute(select(func.count()).select_from(inventories)).scalar_one():
            raise SeedRefused("the database already has inventories; use --reset to start over")
    dialect = dialect_of(engine)
    tables = (inventories, batches, inventory_logs)
    for frames in _frames(items, seed, today):
        for table, df in zip(tables, frames, strict=True):
            dialect.load_frame(engine, table, df)
    dialect.analyze(engine, tables)
    with engine.begin() as conn:
        dialect.reset_id_sequences(conn, tables)
        counts = {
            t.name: conn.execute(select(func.count()).select_from(t)).scalar_one()
            for t in (inventories, batches, inventory_logs)
        }
    return counts
