"""PyMySQL connections whose TLS context is made once per process, not at every connect.

With no ssl option in the URL, PyMySQL (1.2 on) connects with TLS *preferred*: encrypted when
the server offers it, its certificate not checked. For that it makes a new context at every
connection (``ssl.create_default_context``, which reads the system's CA store: 20-50 ms), though
a context that checks no certificate never reads the store: ~0.4 s of a 0-row run's op processes
on MariaDB (benchmarks/README.md). Here PyMySQL's own code makes that context once, when this
module is imported (the op fork server imports it for a PyMySQL database, so every op process
inherits it), and every connection shares it; a URL's own ssl options still get a context of
their own. The connection is otherwise PyMySQL's: same handshake, TLS whenever the server
offers it, as before.
"""

from __future__ import annotations

import ssl
from typing import Any

from pymysql.connections import Connection

_preferred: ssl.SSLContext | None = None


class SharedTLSConnection(Connection):
    """``pymysql.connections.Connection`` with the shared context for TLS preferred."""

    def _create_ssl_ctx(self, sslp: Any) -> ssl.SSLContext:
        global _preferred
        if sslp:  # the URL's own ssl options: a context of their own
            return super()._create_ssl_ctx(sslp)
        if _preferred is None:
            _preferred = super()._create_ssl_ctx(sslp)
        return _preferred


SharedTLSConnection(defer_connect=True)  # makes the shared context now (no socket is opened)
