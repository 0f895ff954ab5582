"""Digests of the data: hashes of every column of some StockRx tables, rows in id order, that
tell whether two contenders left the same data (and, asked, whether they left the same rows
under other ids).
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import create_engine, select, text

#: How a digest with ``run_at`` hashes that instant: two runs at other instants compare.
RUN_AT = "RUN_AT"


def _canon(v: Any, run_at: dt.datetime | None = None) -> str:
    if v is None:
        return "\\N"
    if isinstance(v, decimal.Decimal | float):
        return f"{decimal.Decimal(str(v)):.2f}"
    if isinstance(v, dt.datetime):
        return RUN_AT if v == run_at else v.isoformat(sep=" ", timespec="microseconds")
    return str(v)


#: (table, column naming the item) of the tables the price benchmark compares.
PRICE_TABLES: tuple[tuple[str, str], ...] = (("inventories", "id"), ("inventory_logs", "inventory_id"))
#: Every StockRx table, with the column naming the item each row belongs to.
ALL_TABLES: tuple[tuple[str, str], ...] = (
    ("inventories", "id"), ("batches", "inventory_id"), ("inventory_logs", "inventory_id")
)


@dataclass
class Digest:
    """Hashes of every column of some tables, rows in id order.

    ``subset`` covers only the rows of items ``id <= subset`` (the naive baselines patch only
    those).
    """

    tables: dict[str, str]
    subset_tables: dict[str, str]
    counts: dict[str, int] = field(default_factory=dict)
    #: the rows without their ids, as a set: tells "other ids" from "other rows"
    rows_without_ids: dict[str, str] = field(default_factory=dict)

    @property
    def full(self) -> tuple[str, ...]:
        return tuple(self.tables.values())

    @property
    def subset(self) -> tuple[str, ...]:
        return tuple(self.subset_tables.values())


def same(a: Digest | None, b: Digest | None, part: str) -> str:
    """"identical" / "DIFFERENT" (naming the tables that differ) / "n/a"."""
    if a is None or b is None:
        return "n/a"
    da = a.tables if part == "full" else a.subset_tables
    db = b.tables if part == "full" else b.subset_tables
    diff = [t for t in da if da[t] != db.get(t)]
    if part == "full":  # same rows under other ids? (a different numbering of inserted rows)
        diff = [t + (": same rows, other ids" if a.rows_without_ids.get(t)
                     and a.rows_without_ids.get(t) == b.rows_without_ids.get(t) else "")
                for t in diff]
    return "identical" if not diff else f"DIFFERENT ({', '.join(diff)})"


#: PostgreSQL hashes server-side: md5 of every row's text form, in id order (much faster than
#: reading millions of rows into Python; digests are only compared within one backend).
PG_DIGEST = (
    "SELECT md5(string_agg(md5({row}), '' ORDER BY t.id)), "
    "md5(string_agg(md5({row}), '' ORDER BY t.id) FILTER (WHERE t.{item} <= :subset)), "
    "count(*) FROM {table} t"
)
#: A row's text for PG_DIGEST; with a run's instant, that instant's text replaced by RUN_AT.
PG_ROW, PG_ROW_RUN_AT = "t::text", "replace(t::text, :run_at, :token)"
#: The rows without their ids, in the order of their hashes (ids play no part).
PG_ROWS_WITHOUT_IDS = (
    "SELECT md5(string_agg(h, '' ORDER BY h)) FROM "
    "(SELECT md5((to_jsonb(t) - 'id')::text) AS h FROM {table} t) x"
)


def digest(url: str, subset: int, tables: Sequence[tuple[str, str]] = PRICE_TABLES,
           id_free: bool = False, run_at: dt.datetime | None = None) -> Digest:
    """Every column of the given StockRx tables ``(name, item column)``, rows in id order (in
    Python through SQLAlchemy's types, except on PostgreSQL: see PG_DIGEST). ``id_free``: also
    a digest of the rows without their ids, as a set (``Digest.rows_without_ids``).

    MySQL/MariaDB go through Python too: the driver reads DECIMAL as ``Decimal`` and DATETIME(6)
    as ``datetime`` with its microseconds, so ``_canon`` gives every value one exact text
    whichever contender wrote it (a server-side ``MD5(GROUP_CONCAT(...))`` would be bounded
    by ``group_concat_max_len`` and the packet size). ``run_at``: the instant a run wrote as
    its timestamps, hashed as ``RUN_AT`` (two runs of one job at other instants compare)."""
    from stockrx_patches import tables as stockrx_tables

    engine = create_engine(url)
    full_h: dict[str, str] = {}
    part_h: dict[str, str] = {}
    counts: dict[str, int] = {}
    no_ids: dict[str, str] = {}
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                for name, item in tables:
                    row = PG_ROW_RUN_AT if run_at else PG_ROW
                    full, part, n = conn.execute(
                        text(PG_DIGEST.format(item=item, table=name, row=row)),
                        {"subset": subset, "token": RUN_AT,
                         "run_at": run_at.isoformat(sep=" ") if run_at else None},
                    ).one()
                    full_h[name], part_h[name], counts[name] = str(full), str(part), n
                    if id_free:
                        no_ids[name] = str(conn.execute(
                            text(PG_ROWS_WITHOUT_IDS.format(table=name))).scalar_one())
                return Digest(full_h, part_h, counts, no_ids)
            for name, item_col in tables:
                tbl = getattr(stockrx_tables, name)
                full, part = hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16)
                n = 0
                result = conn.execution_options(stream_results=True, yield_per=20_000).execute(
                    select(*tbl.c).order_by(tbl.c.id)
                )
                item_idx = list(tbl.c.keys()).index(item_col)
                id_idx = list(tbl.c.keys()).index("id")
                hashes: list[bytes] = []
                for row in result:
                    line = "\x1f".join(_canon(v, run_at) for v in row).encode() + b"\x1e"
                    full.update(line)
                    if id_free:
                        hashes.append(hashlib.blake2b(
                            "\x1f".join(_canon(v) for i, v in enumerate(row) if i != id_idx)
                            .encode(), digest_size=16).digest())
                    if row[item_idx] <= subset:
                        part.update(line)
                    n += 1
                full_h[name], part_h[name], counts[name] = full.hexdigest(), part.hexdigest(), n
                if id_free:
                    no_ids[name] = hashlib.blake2b(b"".join(sorted(hashes)),
                                                   digest_size=16).hexdigest()
    finally:
        engine.dispose()
    return Digest(full_h, part_h, counts, no_ids)
