"""Adjust item prices in bulk (percentage, fixed amount, multiplier or a set value).

Why: price revisions at release time ("raise every item by 8 %"). Prices round to whole yen;
every changed item gets one ``adjust`` inventory_logs row and its ``inventory_logs_count``
goes up by one. Items whose price would not change are not touched.
"""

from __future__ import annotations

import datetime as dt
import math
from enum import Enum

from pydantic import Field
from sqlalchemy import BigInteger, String, case, cast, func, literal, or_, select

from patch_ops.dialects.functions import as_double, decimal_text, floor_number
from patch_ops.patch import (
    Changes,
    Invariant,
    Patch,
    PatchConfigError,
    PatchRunConfig,
    RunContext,
    SqlChanges,
    Tables,
    lazy_declaration,
)
from stockrx_patches.invariants import screened
from stockrx_patches.tables import (
    INVENTORY_LOG_INSERTS,
    inventories,
    inventory_log_columns,
    inventory_log_rows,
)

RANGES = {
    "percentage": (-100, 1000),
    "fixed_amount": (None, None),
    "multiply": (0, None),  # exclusive lower bound
    "set_value": (0, None),
}


class AdjustmentType(str, Enum):  # noqa: UP042 - Dagster config enums
    percentage = "percentage"
    fixed_amount = "fixed_amount"
    multiply = "multiply"
    set_value = "set_value"


class PriceAdjustmentConfig(PatchRunConfig):
    adjustment_type: AdjustmentType = Field(
        description="percentage (-100..1000), fixed_amount (yen, result clamped at 0), "
        "multiply (> 0) or set_value (>= 0 yen)."
    )
    adjustment_value: float = Field(description="The percentage, amount, factor or new price.")
    min_price: float | None = Field(default=None, description="Only items priced at least this.")
    max_price: float | None = Field(default=None, description="Only items priced at most this.")
    before_date: str | None = Field(
        default=None, description="Only items last updated before this date (YYYY-MM-DD)."
    )
    user_id: int | None = Field(default=None, description="Admin user id put on the log rows.")


def _fmt(v: float) -> str:
    return f"{int(v)}" if float(v).is_integer() else f"{v:.2f}"


def _sql_fmt(x):  # type: ignore[no-untyped-def]
    """``_fmt`` in SQL."""
    return case(
        (x == floor_number(x), cast(cast(x, BigInteger), String)), else_=decimal_text(x, 2)
    )


def _double(v: float):  # type: ignore[no-untyped-def]
    return as_double(literal(float(v)))


class InventoryPriceAdjustment(Patch):
    """Adjust inventory prices by percentage, fixed amount, multiplier or set value."""

    name = "inventory_price_adjustment"
    config_class = PriceAdjustmentConfig
    driving_table = "inventories"
    updates = {"inventories": ("price", "inventory_logs_count", "updated_at")}
    inserts = {"inventory_logs": INVENTORY_LOG_INSERTS}
    example_config = {"adjustment_type": "percentage", "adjustment_value": 8}

    @lazy_declaration
    def schemas():  # type: ignore[misc]
        from stockrx_patches.schemas import InventoryLogSchema, InventorySchema

        return {"inventories": InventorySchema, "inventory_logs": InventoryLogSchema}

    def check_config(self, config: PriceAdjustmentConfig) -> None:
        kind = AdjustmentType(config.adjustment_type).value
        lo, hi = RANGES[kind]
        v = config.adjustment_value
        if not math.isfinite(v):
            raise PatchConfigError("adjustment_value must be a finite number")
        if kind == "multiply" and v <= 0:
            raise PatchConfigError(f"multiply needs adjustment_value > 0, got {v}")
        if lo is not None and v < lo or hi is not None and v > hi:
            raise PatchConfigError(
                f"{kind} needs adjustment_value in [{lo}, {hi}], got {v}"
            )
        for f in ("min_price", "max_price"):
            p = getattr(config, f)
            if p is not None and p < 0:
                raise PatchConfigError(f"{f} must be >= 0, got {p}")
        if config.before_date is not None:
            try:
                dt.date.fromisoformat(config.before_date)
            except ValueError:
                raise PatchConfigError(
                    f"before_date must be a date YYYY-MM-DD, got {config.before_date!r}"
                ) from None
        if config.min_price is not None and config.max_price is not None:
            if config.min_price > config.max_price:
                raise PatchConfigError("min_price is greater than max_price")

    def targets(self, tables: Tables, config: PriceAdjustmentConfig, ctx: RunContext):
        inv = tables["inventories"]
        q = select(inv.c.id)
        if config.min_price is not None:
            q = q.where(inv.c.price >= config.min_price)
        if config.max_price is not None:
            q = q.where(inv.c.price <= config.max_price)
        if config.before_date is not None:
            day = dt.date.fromisoformat(config.before_date)
            q = q.where(inv.c.updated_at < dt.datetime.combine(day, dt.time()))
        return {"inventories": q}

    def transform(self, batch, config: PriceAdjustmentConfig, ctx: RunContext) -> Changes:
        import numpy as np  # here, not at the top: loading the patch must not import them
        import pandas as pd

        inv = batch["inventories"]
        old = inv["price"].to_numpy(dtype="float64")
        v = config.adjustment_value
        kind = AdjustmentType(config.adjustment_type).value
        new = {
            "percentage": lambda: old * (100.0 + v) / 100.0,
            "fixed_amount": lambda: np.maximum(old + v, 0.0),
            "multiply": lambda: old * v,
            "set_value": lambda: np.full_like(old, v),
        }[kind]()
        # Whole yen, half up; the epsilon absorbs binary noise such as 1.08 * 1250 = 1349.999...
        new = np.floor(new + 0.5 + 1e-7)
        changed = inv[new != old].copy()
        changed["new_price"] = new[new != old]
        if changed.empty:
            return Changes()
        label = f"{kind}:{_fmt(v)}"
        updates = pd.DataFrame(
            {
                "id": changed["id"],
                "source_id": changed["id"],
                "price": changed["new_price"],
                "inventory_logs_count": changed["inventory_logs_count"] + 1,
                "updated_at": ctx.run_at,
            }
        )
        notes = [
            f"価格調整: {_fmt(o)}円 → {_fmt(n)}円 ({label})"
            for o, n in zip(changed["price"], changed["new_price"], strict=True)
        ]
        logs = inventory_log_rows(
            ctx.run_at,
            source_id=changed["id"],
            inventory_id=changed["id"],
            delta=0,
            operation_type="adjust",
            previous_quantity=changed["quantity"],
            current_quantity=changed["quantity"],
            note=notes,
            user_id=config.user_id,
        )
        return Changes(updates={"inventories": updates}, inserts={"inventory_logs": logs})

    def sql_transform(self, batch, config: PriceAdjustmentConfig, ctx: RunContext) -> SqlChanges:
        """``transform`` in SQL: the same double-precision arithmetic in the same order (the
        batch's prices come as doubles, as in the frame), so every database rounds as numpy."""
        inv = batch["inventories"]
        old = inv.c.price
        v = float(config.adjustment_value)
        kind = AdjustmentType(config.adjustment_type).value
        if kind == "percentage":
            new = old * _double(100.0 + v) / _double(100.0)
        elif kind == "fixed_amount":
            new = case((old + _double(v) > 0, old + _double(v)), else_=_double(0.0))
        elif kind == "multiply":
            new = old * _double(v)
        else:
            new = _double(v)
        new = floor_number(new + _double(0.5) + _double(1e-7))
        calc = select(
            inv.c.id, inv.c.quantity, inv.c.inventory_logs_count, old.label("old"),
            new.label("new"),
        ).subquery("priced")
        changed = select(calc).where(calc.c.new != calc.c.old).subquery("changed")
        stamp = literal(ctx.run_at, inventories.c.updated_at.type)
        updates = select(
            changed.c.id,
            changed.c.id.label("source_id"),
            changed.c.new.label("price"),
            (changed.c.inventory_logs_count + 1).label("inventory_logs_count"),
            stamp.label("updated_at"),
        )
        label = f"{kind}:{_fmt(v)}"
        note = (
            literal("価格調整: ", String) + _sql_fmt(changed.c.old) + literal("円 → ", String)
            + _sql_fmt(changed.c.new) + literal(f"円 ({label})", String)
        )
        logs = select(
            *inventory_log_columns(
                ctx.run_at,
                source_id=changed.c.id,
                inventory_id=changed.c.id,
                delta=0,
                operation_type="adjust",
                previous_quantity=changed.c.quantity,
                current_quantity=changed.c.quantity,
                note=note,
                user_id=config.user_id,
            )
        )
        return SqlChanges(
            updates={"inventories": updates},
            inserts={"inventory_logs": logs},
            insert_order={"inventory_logs": ("source_id",)},
        )

    def invariants(self, result, config: PriceAdjustmentConfig) -> list[Invariant]:
        items, logs = result.updated("inventories"), result.inserted("inventory_logs")
        per_item = (
            select(logs.c.inventory_id, func.count().label("n"))
            .group_by(logs.c.inventory_id)
            .subquery()
        )
        one_log, belong, quantities = (
            Invariant(
                "one_log_per_changed_item",
                "every changed item has exactly one adjust log row",
                select(items.c.id, per_item.c.n)
                .select_from(items.outerjoin(per_item, per_item.c.inventory_id == items.c.id))
                .where(func.coalesce(per_item.c.n, 0) != 1),
            ),
            Invariant(
                "log_rows_belong_to_changed_items",
                "every new log row is for an item whose price changed",
                select(logs.c.inventory_id).where(
                    ~select(items.c.id).where(items.c.id == logs.c.inventory_id).exists()
                ),
            ),
            Invariant(
                "log_quantities_match_item",
                "log rows carry the item's quantity, delta 0",
                select(logs.c.inventory_id)
                .join(items, items.c.id == logs.c.inventory_id)
                .where(
                    or_(
                        logs.c.delta != 0,
                        logs.c.previous_quantity != items.c.quantity,
                        logs.c.current_quantity != items.c.quantity,
                        logs.c.operation_type != "adjust",
                    )
                ),
            ),
        )
        # The three log checks in one read of the items and the log rows (the queries above run
        # only for one that fails): beside each item, its log rows' count, odd ones and
        # quantities. Grouped first, so that MariaDB, which has no hash join, looks the logs of
        # an item up by key (an index on the grouped rows) instead of scanning them per item
        prev, cur = logs.c.previous_quantity, logs.c.current_quantity
        of_item = (
            select(
                logs.c.inventory_id,
                func.count().label("n"),
                func.count(case((or_(logs.c.delta != 0, logs.c.operation_type != "adjust"), 1)))
                .label("odd"),
                func.min(prev).label("prev_min"), func.max(prev).label("prev_max"),
                func.min(cur).label("cur_min"), func.max(cur).label("cur_max"),
            )
            .group_by(logs.c.inventory_id)
            .subquery("logs_of_item")
        )
        q = items.c.quantity
        quantity_differs = or_(
            of_item.c.odd > 0, of_item.c.prev_min != q, of_item.c.prev_max != q,
            of_item.c.cur_min != q, of_item.c.cur_max != q,
        )
        one_log, belong, quantities = screened(
            items.outerjoin(of_item, of_item.c.inventory_id == items.c.id),
            (one_log, func.count(case((func.coalesce(of_item.c.n, 0) != 1, 1)))),
            # log rows not counted beside a changed item
            (belong, select(func.count()).select_from(logs).scalar_subquery()
             - func.coalesce(func.sum(of_item.c.n), 0)),
            (quantities, func.count(case((quantity_differs, 1)))),
        )
        return [
            one_log,
            belong,
            Invariant(
                "inventory_logs_count_incremented",
                "inventory_logs_count went up by exactly one on every changed item",
                select(items.c.id).where(
                    items.c.inventory_logs_count != items.c.before_inventory_logs_count + 1
                ),
            ),
            quantities,
            Invariant(
                "price_actually_changed",
                "no item is touched whose price stays the same",
                select(items.c.id).where(items.c.price == items.c.before_price),
            ),
        ]
