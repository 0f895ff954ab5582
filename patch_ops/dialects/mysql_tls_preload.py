"""Imported by the op fork server for a PyMySQL database (``executor.DRIVER_PRELOADS``): the
shared TLS context (``mysql_tls``) is made there once, and every op process inherits it."""

from __future__ import annotations

from patch_ops.dialects.mysql_tls import make_shared_context

make_shared_context()
