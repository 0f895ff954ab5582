"""pandera schemas of StockRx rows, shared by every patch (the tables themselves, in SQLAlchemy,
are in ``stockrx_patches.tables``).

They check the rows a patch writes (after-images of updated rows, and inserted rows). They are
not strict about extra columns: the production tables have more columns than we know.
"""

from __future__ import annotations

import pandera.pandas as pa
from pandera.typing import Series

from patch_ops.sql_checks import sql_twin
from stockrx_patches.tables import OPERATION_TYPES

MAX_PRICE = 99_999_999.99  # decimal(10,2)
MAX_INT = 2**31 - 1


class InventorySchema(pa.DataFrameModel):
    id: Series[int] = pa.Field(gt=0, unique=True)
    name: Series[str] = pa.Field(str_length={"min_value": 1, "max_value": 255})
    quantity: Series[int] = pa.Field(ge=0, le=MAX_INT)
    price: Series[float] = pa.Field(ge=0, le=MAX_PRICE)
    status: Series[int] = pa.Field(isin=[0, 1])
    batches_count: Series[int] = pa.Field(ge=0)
    inventory_logs_count: Series[int] = pa.Field(ge=0)

    class Config:
        strict = False
        coerce = True


class BatchSchema(pa.DataFrameModel):
    id: Series[int] = pa.Field(gt=0, unique=True)
    inventory_id: Series[int] = pa.Field(gt=0)
    lot_code: Series[str] = pa.Field(str_length={"min_value": 1, "max_value": 255})
    quantity: Series[int] = pa.Field(ge=0, le=MAX_INT)

    class Config:
        strict = False
        coerce = True


class InventoryLogSchema(pa.DataFrameModel):
    inventory_id: Series[int] = pa.Field(gt=0)
    delta: Series[int]
    operation_type: Series[str] = pa.Field(isin=list(OPERATION_TYPES))
    previous_quantity: Series[int] = pa.Field(ge=0)
    current_quantity: Series[int] = pa.Field(ge=0)
    note: Series[str] = pa.Field(nullable=True)

    # The SQL twin runs the same check on the in-database transform path.
    @sql_twin(lambda c: c.previous_quantity + c.delta == c.current_quantity)
    @pa.dataframe_check(error="previous_quantity + delta must equal current_quantity")
    @classmethod
    def quantities_add_up(cls, df):  # type: ignore[no-untyped-def]
        return df["previous_quantity"] + df["delta"] == df["current_quantity"]

    class Config:
        strict = False
        coerce = True
