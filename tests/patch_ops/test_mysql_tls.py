"""PyMySQL's TLS: preferred (as PyMySQL connects without ssl options) with one context per
process (``patch_ops.dialects.mysql_tls``), required and checked with ``ssl_ca`` in the URL. On the
session's throwaway MariaDB, which offers TLS with a self-signed certificate when ``openssl`` is
installed (``tests/support/mysql.py``)."""

from __future__ import annotations

import ssl

import pytest
from pymysql.connections import Connection
from sqlalchemy.exc import DBAPIError

from patch_ops.database import get_engine
from patch_ops.dialects import mysql_tls
from tests.support.mysql import self_signed_certificate


def test_pymysql_connections_share_one_tls_context_as_pymysql_makes_it(mysql_url):
    """TLS preferred, as PyMySQL connects without ssl options, with the context it would make
    (no certificate checked) made once per process, not per connection (20-50 ms each)."""
    engine = get_engine(mysql_url)
    if engine.dialect.driver != "pymysql":
        pytest.skip("PyMySQL only")
    with engine.connect() as a, engine.connect() as b:
        ours = [c.connection.dbapi_connection for c in (a, b)]
        assert all(type(c) is mysql_tls.connection_class() for c in ours)
        assert ours[0] is not ours[1] and ours[0].ctx is ours[1].ctx
        for c in (a, b):
            assert c.exec_driver_sql("SELECT 1").scalar() == 1
            cipher = c.exec_driver_sql("SHOW SESSION STATUS LIKE 'Ssl_cipher'").one()[1]
            offered = c.exec_driver_sql("SELECT @@have_ssl").scalar() == "YES"
            assert bool(cipher) == offered  # TLS exactly when the server offers it
    own = Connection(defer_connect=True).ctx
    shared = ours[0].ctx
    assert own is not shared
    for attr in ("verify_mode", "check_hostname", "options", "verify_flags", "minimum_version",
                 "maximum_version", "protocol"):
        assert getattr(shared, attr) == getattr(own, attr), attr
    assert shared.verify_mode == ssl.CERT_NONE
    # a URL's own ssl options: a context of their own, as PyMySQL makes it
    checking = mysql_tls.connection_class()(defer_connect=True, ssl_verify_cert=True).ctx
    assert checking is not shared and checking.verify_mode == ssl.CERT_REQUIRED


def test_a_url_with_the_servers_ca_requires_tls_and_checks_the_server(mysql_server, mysql_url):
    """The README's way to require TLS: ``ssl_ca`` in the URL (the test server's own
    certificate here); a CA that did not sign the server's certificate is refused."""
    cert = mysql_server.base_dir / "tls-cert.pem" if mysql_server.base_dir else None
    if cert is None or not cert.exists():
        pytest.skip("the test server offers no TLS (no openssl, or an external server)")
    engine = get_engine(f"{mysql_url}&ssl_ca={cert}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW SESSION STATUS LIKE 'Ssl_cipher'").one()[1]
        assert conn.connection.dbapi_connection.ctx.verify_mode == ssl.CERT_REQUIRED
    other = cert.with_name("other-ca.pem")
    self_signed_certificate(other, cert.with_name("other-key.pem"), "other")
    with pytest.raises(DBAPIError, match="(?i)certificate"):
        with get_engine(f"{mysql_url}&ssl_ca={other}").connect():
            pass
