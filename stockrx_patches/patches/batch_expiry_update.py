"""Write off expired lots: lot quantity → 0, item quantity down by the same, one remove log each.

Why: lots past their expiry date (``expires_on`` before the business date in Asia/Tokyo) must
not count as stock. Runs on schedule; a second run on the same day finds nothing to do.
Several expired lots of one item give a chain of ``remove`` log rows in lot order (expiry date,
then id): each row's previous quantity is the one before's current quantity.
Options: ``grace_days`` leaves lots that expired in the last N days alone; ``warning_days``
lists lots that expire within N days in the report (not changed).
"""

from __future__ import annotations

import datetime as dt

from pydantic import Field
from sqlalchemy import String, and_, cast, func, literal, select

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
from stockrx_patches import invariants as inv
from stockrx_patches.tables import (
    INVENTORY_LOG_INSERTS,
    inventories,
    inventory_log_columns,
    inventory_log_rows,
)

MAX_DAYS = 3650
NOT_NEGATIVE = {
    "inventories": ("quantity",),
    "batches": ("quantity",),
    "inventory_logs": ("previous_quantity", "current_quantity"),
}


class BatchExpiryConfig(PatchRunConfig):
    business_date: str | None = Field(
        default=None,
        description="The run's date (YYYY-MM-DD); default: today in Asia/Tokyo. Lots with "
        "expires_on before it are expired.",
    )
    grace_days: int = Field(
        default=0,
        description="Leave alone lots that expired in the last N days: only lots with "
        "expires_on < business_date - grace_days are written off.",
    )
    warning_days: int = Field(
        default=30,
        description="List lots with stock expiring within N days (business_date .. "
        "business_date + N) in the report; they are not changed. 0: no list.",
    )
    user_id: int | None = Field(default=None, description="Admin user id put on the log rows.")


def _cutoff(config: BatchExpiryConfig, ctx: RunContext) -> dt.date:
    return ctx.business_date - dt.timedelta(days=config.grace_days)


class BatchExpiryUpdate(Patch):
    """Write off expired lots that still hold stock (lot → 0, item down, one remove log per lot)."""

    name = "batch_expiry_update"
    config_class = BatchExpiryConfig
    # A lot written off holds no stock, so the next run does not select it again: each window's
    # scheduled run with the same config does only what is new.
    idempotent = True
    driving_table = "inventories"
    related = {"batches": "inventory_id"}
    updates = {
        "inventories": ("quantity", "inventory_logs_count", "updated_at"),
        "batches": ("quantity", "updated_at"),
    }
    inserts = {"inventory_logs": INVENTORY_LOG_INSERTS}
    example_config = {"grace_days": 0, "warning_days": 30}

    @lazy_declaration
    def schemas():  # type: ignore[misc]
        from stockrx_patches.schemas import BatchSchema, InventoryLogSchema, InventorySchema

        return {
            "inventories": InventorySchema,
            "batches": BatchSchema,
            "inventory_logs": InventoryLogSchema,
        }

    def business_date(self, config: BatchExpiryConfig, today: dt.date) -> dt.date:
        if config.business_date:
            try:
                return dt.date.fromisoformat(config.business_date)
            except ValueError:
                pass  # check_config reports it
        return today

    def check_config(self, config: BatchExpiryConfig) -> None:
        for f in ("grace_days", "warning_days"):
            v = getattr(config, f)
            if not 0 <= v <= MAX_DAYS:
                raise PatchConfigError(f"{f} must be in [0, {MAX_DAYS}], got {v}")
        if config.business_date is not None:
            try:
                dt.date.fromisoformat(config.business_date)
            except ValueError:
                raise PatchConfigError(
                    f"business_date must be a date YYYY-MM-DD, got {config.business_date!r}"
                ) from None

    def targets(self, tables: Tables, config: BatchExpiryConfig, ctx: RunContext):
        b = tables["batches"]
        expired = and_(b.c.expires_on < _cutoff(config, ctx), b.c.quantity > 0)
        return {
            "inventories": select(b.c.inventory_id).where(expired),
            "batches": select(b.c.id).where(expired),
        }

    def transform(self, batch, config: BatchExpiryConfig, ctx: RunContext) -> Changes:
        import pandas as pd  # here, not at the top: loading the patch must not import it

        items, lots = batch["inventories"], batch["batches"]
        # Re-check on the backed-up rows: the app may have emptied a lot since plan.
        lots = lots[(lots["quantity"] > 0) & (lots["expires_on"] < _cutoff(config, ctx))]
        lots = lots[lots["inventory_id"].isin(items["id"])]
        if lots.empty:
            return Changes()
        lots = lots.sort_values(["inventory_id", "expires_on", "id"], kind="stable")
        qty = lots["quantity"].astype("int64")
        start = lots["inventory_id"].map(items.set_index("id")["quantity"]).astype("int64")
        previous = start - (qty.groupby(lots["inventory_id"]).cumsum() - qty)
        per_item = qty.groupby(lots["inventory_id"]).agg(["sum", "count"])
        touched = items[items["id"].isin(per_item.index)].set_index("id")
        per_item = per_item.loc[touched.index]
        inv_updates = pd.DataFrame(
            {
                "id": touched.index,
                "source_id": touched.index,
                "quantity": touched["quantity"].to_numpy() - per_item["sum"].to_numpy(),
                "inventory_logs_count": touched["inventory_logs_count"].to_numpy()
                + per_item["count"].to_numpy(),
                "updated_at": ctx.run_at,
            }
        )
        lot_updates = pd.DataFrame(
            {
                "id": lots["id"],
                "source_id": lots["inventory_id"],
                "quantity": 0,
                "updated_at": ctx.run_at,
            }
        )
        logs = inventory_log_rows(
            ctx.run_at,
            source_id=lots["inventory_id"],
            inventory_id=lots["inventory_id"],
            delta=-qty,
            operation_type="remove",
            previous_quantity=previous,
            current_quantity=previous - qty,
            note=[
                f"期限切れ廃棄: ロット {code} (有効期限 {exp}, {n}個)"
                for code, exp, n in zip(lots["lot_code"], lots["expires_on"], qty, strict=True)
            ],
            user_id=config.user_id,
        )
        return Changes(
            updates={"inventories": inv_updates, "batches": lot_updates},
            inserts={"inventory_logs": logs},
        )

    def sql_transform(self, batch, config: BatchExpiryConfig, ctx: RunContext) -> SqlChanges:
        """``transform`` in SQL: the log chain per item is a running sum over its lots in lot
        order (expiry date, then id), as the pandas cumsum."""
        items, lots = batch["inventories"], batch["batches"]
        qty = lots.c.quantity
        running = func.sum(qty).over(
            partition_by=lots.c.inventory_id, order_by=(lots.c.expires_on, lots.c.id),
            rows=(None, 0),
        )
        expired = (
            select(
                lots.c.id, lots.c.inventory_id, lots.c.lot_code, lots.c.expires_on, qty,
                (items.c.quantity - (running - qty)).label("previous"),
            )
            .join_from(lots, items, items.c.id == lots.c.inventory_id)
            .where(qty > 0, lots.c.expires_on < _cutoff(config, ctx))
            .subquery("expired")
        )
        stamp = literal(ctx.run_at, inventories.c.updated_at.type)
        per_item = (
            select(
                expired.c.inventory_id,
                func.sum(expired.c.quantity).label("removed"),
                func.count().label("lots"),
            )
            .group_by(expired.c.inventory_id)
            .subquery("per_item")
        )
        item_updates = select(
            items.c.id,
            items.c.id.label("source_id"),
            (items.c.quantity - per_item.c.removed).label("quantity"),
            (items.c.inventory_logs_count + per_item.c.lots).label("inventory_logs_count"),
            stamp.label("updated_at"),
        ).join_from(items, per_item, per_item.c.inventory_id == items.c.id)
        lot_updates = select(
            expired.c.id,
            expired.c.inventory_id.label("source_id"),
            literal(0).label("quantity"),
            stamp.label("updated_at"),
        )
        e = expired.c
        note = (
            literal("期限切れ廃棄: ロット ", String) + e.lot_code + literal(" (有効期限 ", String)
            + cast(e.expires_on, String) + literal(", ", String) + cast(e.quantity, String)
            + literal("個)", String)
        )
        logs = select(
            *inventory_log_columns(
                ctx.run_at,
                source_id=e.inventory_id,
                inventory_id=e.inventory_id,
                delta=-e.quantity,
                operation_type="remove",
                previous_quantity=e.previous,
                current_quantity=e.previous - e.quantity,
                note=note,
                user_id=config.user_id,
            ),
            e.expires_on.label("lot_expires_on"),
            e.id.label("lot_id"),
        )
        return SqlChanges(
            updates={"inventories": item_updates, "batches": lot_updates},
            inserts={"inventory_logs": logs},
            insert_order={"inventory_logs": ("source_id", "lot_expires_on", "lot_id")},
        )

    def invariants(self, result, config: BatchExpiryConfig) -> list[Invariant]:
        items, lots = result.updated("inventories"), result.updated("batches")
        logs = result.inserted("inventory_logs")
        return [
            inv.log_quantities_add_up(result),
            inv.no_negative(result, NOT_NEGATIVE),
            *inv.balanced_per_item_together(
                (
                    "one_log_per_written_off_lot",
                    "every item has exactly as many remove log rows as lots written off",
                    (select(logs.c.inventory_id, literal(1)),
                     select(lots.c.inventory_id, literal(-1))),
                ),
                (
                    "removed_from_items_equals_removed_from_lots",
                    "per item, the quantity removed from the item = the quantity removed from "
                    "its lots",
                    (select(items.c.id, items.c.before_quantity - items.c.quantity),
                     select(lots.c.inventory_id, lots.c.quantity - lots.c.before_quantity)),
                ),
                (
                    "logs_record_what_lots_lost",
                    "per item, the log rows' deltas add up to what its lots lost",
                    (select(logs.c.inventory_id, logs.c.delta),
                     select(lots.c.inventory_id, lots.c.before_quantity - lots.c.quantity)),
                ),
            ),
            inv.log_chains(result, "remove"),
            inv.counter_cache_true(result, "inventory_logs_count", "inventory_logs"),
            inv.counter_cache_true(result, "batches_count", "batches"),
        ]

    def report_sections(self, tables: Tables, config: BatchExpiryConfig, ctx: RunContext):
        b, inv = tables["batches"], tables["inventories"]
        cols = (
            b.c.id.label("batch_id"),
            b.c.inventory_id,
            inv.c.name,
            b.c.lot_code,
            b.c.expires_on,
            b.c.quantity,
        )
        lots = select(*cols).join_from(b, inv, inv.c.id == b.c.inventory_id)
        lots = lots.where(b.c.quantity > 0).order_by(b.c.expires_on, b.c.id)
        sections = {}
        if config.warning_days:
            last = ctx.business_date + dt.timedelta(days=config.warning_days)
            sections[f"Lots expiring within {config.warning_days} days (not changed)"] = lots.where(
                b.c.expires_on >= ctx.business_date, b.c.expires_on <= last
            )
        if config.grace_days:
            sections[
                f"Expired lots inside the {config.grace_days}-day grace period (not changed)"
            ] = lots.where(
                b.c.expires_on >= _cutoff(config, ctx), b.c.expires_on < ctx.business_date
            )
        return sections
