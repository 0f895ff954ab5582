"""SQL invariants of StockRx data, shared by every patch (as schemas.py is for pandera).

Each function builds an :class:`Invariant` on the ResultView an execution's invariants get: the
would-be result before commit, the live tables after. Offending rows come back in the report.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sqlalchemy import (
    ColumnElement,
    FromClause,
    Select,
    and_,
    case,
    func,
    literal,
    or_,
    select,
    union_all,
)

from patch_ops.patch import Invariant


def screened(source: FromClause, *checks: tuple[Invariant, ColumnElement[Any]]) -> list[Invariant]:
    """The invariants, each with its screen over ``source`` (an aggregate over its rows that is
    0 exactly when the invariant holds): checked together in one query over ``source``, each
    one's own ``offenders`` query run only when its screen is not 0 (``Invariant.screen``)."""
    return [replace(inv, screen=(source, aggregate)) for inv, aggregate in checks]


def balanced_per_item(name: str, description: str, *parts: Select) -> Invariant:
    """Per item, signed amounts from the parts (each a SELECT of item id, amount) sum to 0."""
    u = union_all(*parts).subquery()
    item, amount = list(u.c)
    return Invariant(
        name,
        description,
        select(item.label("item_id"), func.sum(amount).label("difference"))
        .group_by(item)
        .having(func.sum(amount) != 0),
    )


def balanced_per_item_together(*rules: tuple[str, str, tuple[Select, ...]]) -> list[Invariant]:
    """``balanced_per_item(name, description, *parts)`` for each rule, screened together: one
    query sums every rule's amounts per item over all the parts, the parts that read the same
    rows merged into one (each relation is read once, not once per rule that reads it)."""
    invariants = [balanced_per_item(name, description, *parts) for name, description, parts in rules]
    merged: dict[tuple[int, ...], tuple[Any, dict[int, Any]]] = {}  # FROM -> (item, amounts)
    for k, (_, _, parts) in enumerate(rules):
        for part in parts:
            item, amount = part.selected_columns
            froms = tuple(id(f) for f in part.get_final_froms())
            key = (*froms, id(item)) if part.whereclause is None else (id(part),)
            merged.setdefault(key, (part, {}))[1][k] = (item, amount)
    selects = []
    for part, amounts in merged.values():
        item = next(iter(amounts.values()))[0]
        cols = [amounts[k][1] if k in amounts else literal(0) for k in range(len(rules))]
        selects.append(part.with_only_columns(
            item.label("item_id"), *[c.label(f"amount_{k}") for k, c in enumerate(cols)]
        ))
    u = union_all(*selects).subquery()
    per_item = (
        select(*[func.sum(u.c[f"amount_{k}"]).label(f"sum_{k}") for k in range(len(rules))])
        .group_by(u.c.item_id)
        .subquery("balances")
    )
    return screened(per_item, *[
        (inv, func.count(case((per_item.c[f"sum_{k}"] != 0, 1))))
        for k, inv in enumerate(invariants)
    ])


def no_negative(result, columns: dict[str, tuple[str, ...]]) -> Invariant:  # type: ignore[no-untyped-def]
    """No written row (updated or inserted) of the tables has a negative value in the columns."""
    parts = []
    for table, cols in columns.items():
        rows = (
            result.updated(table)
            if table in result.declaration["updates"]
            else (result.inserted(table))
        )
        smallest = rows.c[cols[0]]
        for c in cols[1:]:
            smallest = case((rows.c[c] < smallest, rows.c[c]), else_=smallest)
        parts.append(
            select(
                literal(table).label("table_name"),
                rows.c.dp_source_id.label("source_id"),
                smallest.label("value"),
            ).where(or_(*[rows.c[c] < 0 for c in cols]))
        )
    return Invariant(
        "no_negative_quantity",
        "no " + ", ".join(f"{t}.{'/'.join(c)}" for t, c in columns.items()) + " is negative",
        select(union_all(*parts).subquery()),
    )


def log_quantities_add_up(result) -> Invariant:  # type: ignore[no-untyped-def]
    """Every new inventory_logs row has previous_quantity + delta = current_quantity."""
    logs = result.inserted("inventory_logs")
    return Invariant(
        "log_quantities_add_up",
        "for every new log row previous_quantity + delta = current_quantity",
        select(
            logs.c.inventory_id, logs.c.previous_quantity, logs.c.delta, logs.c.current_quantity
        ).where(logs.c.previous_quantity + logs.c.delta != logs.c.current_quantity),
    )


def log_chains(result, operation: str) -> Invariant:  # type: ignore[no-untyped-def]
    """The new log rows of each changed item, all of ``operation`` with a negative delta, form one
    chain: the first starts at the item's quantity before, each next one starts where the one
    before ended, the last ends at the item's quantity after."""
    items, logs = result.updated("inventories"), result.inserted("inventory_logs")
    w = {"partition_by": logs.c.inventory_id, "order_by": logs.c.previous_quantity.desc()}
    chain = select(
        logs.c.inventory_id,
        logs.c.operation_type,
        logs.c.delta,
        logs.c.previous_quantity,
        logs.c.current_quantity,
        func.lag(logs.c.current_quantity).over(**w).label("link"),
        func.row_number().over(**w).label("pos"),
        func.count().over(partition_by=logs.c.inventory_id).label("n"),
    ).subquery()
    return Invariant(
        "log_chain_consistent",
        f"each changed item's {operation} log rows chain from its quantity before to after",
        select(
            chain.c.inventory_id,
            chain.c.pos,
            chain.c.previous_quantity,
            chain.c.current_quantity,
            items.c.before_quantity,
            items.c.quantity,
        )
        .select_from(chain.join(items, items.c.id == chain.c.inventory_id))
        .where(
            or_(
                chain.c.operation_type != operation,
                chain.c.delta >= 0,
                chain.c.previous_quantity != func.coalesce(chain.c.link, items.c.before_quantity),
                and_(chain.c.pos == chain.c.n, chain.c.current_quantity != items.c.quantity),
            )
        ),
    )


def counter_cache_true(result, counter: str, child_table: str) -> Invariant:  # type: ignore[no-untyped-def]
    """inventories.<counter> equals the real number of <child_table> rows (by inventory_id) for
    every changed item, counting the rows the patch inserts."""
    items = result.updated("inventories")
    # only the rows of the changed items, not the whole table (the same counts)
    rows = result.table_where(child_table, "inventory_id", select(items.c.id))
    n = (
        select(rows.c.inventory_id, func.count().label("n"))
        .group_by(rows.c.inventory_id)
        .subquery()
    )
    real = func.coalesce(n.c.n, 0)
    return Invariant(
        f"{counter}_true",
        f"{counter} equals the real number of {child_table} rows for every changed item",
        select(items.c.id, items.c[counter], real.label("real_count"))
        .select_from(items.outerjoin(n, n.c.inventory_id == items.c.id))
        .where(items.c[counter] != real),
    )
