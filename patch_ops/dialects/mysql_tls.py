"""PyMySQL connections whose TLS context is made once per process, not at every connect.

With no ssl option in the URL, PyMySQL (1.2 on) connects with TLS *preferred*: encrypted when
the server offers it, its certificate not checked. For that it makes a new context at every
connection (``ssl.create_default_context``, which reads the system's CA store: 20-50 ms), though
a context that checks no certificate never reads the store: ~0.4 s of a 0-row run's op processes
on MariaDB (benchmarks/README.md). Here PyMySQL's own code makes that context once per process
and every connection shares it; the op fork server makes it before forking
(``mysql_tls_preload``), so every op process inherits it. A URL's own ssl options still get a
context of their own. The connection is otherwise PyMySQL's: same handshake, TLS whenever the
server offers it, as before. PyMySQL is imported by the first connection, not by loading the
code location.
"""

from __future__ import annotations

import ssl
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pymysql.connections import Connection

_preferred: ssl.SSLContext | None = None


@cache
def connection_class() -> type[Connection]:
    """``pymysql.connections.Connection`` with the shared context for TLS preferred."""
    from pymysql.connections import Connection

    class SharedTLSConnection(Connection):
        def _create_ssl_ctx(self, sslp: Any) -> ssl.SSLContext:
            global _preferred
            if sslp:  # the URL's own ssl options: a context of their own
                return super()._create_ssl_ctx(sslp)
            if _preferred is None:
                _preferred = super()._create_ssl_ctx(sslp)
            return _preferred

    return SharedTLSConnection


def make_shared_context() -> None:
    """Make the shared context now (no socket is opened)."""
    connection_class()(defer_connect=True)
