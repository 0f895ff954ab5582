"""The StockRx database as a Dagster resource.

The URL comes from ``STOCKRX_DATABASE_URL`` through ``dagster.EnvVar`` (bound in definitions.py),
so it is read at run time and never stored in run config. Only the password-free form of the URL
is ever logged. Engines and transactions: ``patch_ops.database``.
"""

from __future__ import annotations

from dagster import ConfigurableResource
from pydantic import Field
from sqlalchemy.engine import Engine

from patch_ops.database import get_engine, redact_url


class StockRxDatabase(ConfigurableResource):
    """The StockRx database that patches read and change (SQLite, PostgreSQL or MySQL)."""

    url: str = Field(
        description="SQLAlchemy URL of the StockRx database, e.g. "
        "postgresql+psycopg://user:pass@host/stockrx. Bind it with EnvVar('STOCKRX_DATABASE_URL').",
    )

    def get_engine(self) -> Engine:
        return get_engine(self.url)

    @property
    def safe_url(self) -> str:
        return redact_url(self.url)
