"""The StockRx database as a Dagster resource.

The URL comes from ``STOCKRX_DATABASE_URL`` through ``dagster.EnvVar`` (bound in definitions.py),
so it is read at run time and never stored in run config. Only the password-free form of the URL
is ever logged. Engines and transactions: ``patch_ops.database``.
"""

from __future__ import annotations

from dagster import ConfigurableResource
from pydantic import Field
from sqlalchemy.engine import Engine

from patch_ops.database import get_engine, redact_url, require_database


class StockRxDatabase(ConfigurableResource):
    """The StockRx database that patches read and change (SQLite, PostgreSQL or MySQL)."""

    url: str = Field(
        description="SQLAlchemy URL of the StockRx database, e.g. "
        "postgresql+psycopg://user:pass@host/stockrx. Bind it with EnvVar('STOCKRX_DATABASE_URL').",
    )

    def get_engine(self) -> Engine:
        """The engine; a database that plainly does not exist (a missing SQLite file) is a clear
        error here, before anything could create it."""
        engine = get_engine(self.url)
        require_database(engine)
        return engine

    @property
    def safe_url(self) -> str:
        return redact_url(self.url)
