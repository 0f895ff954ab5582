"""The framework's tables in a schema of their own (the URL's ``framework_schema``): the patch
user needs only SELECT/INSERT/UPDATE/DELETE on the StockRx tables, on PostgreSQL and MariaDB.

Each test seeds the StockRx tables as their owner, then connects as a user that cannot create,
alter or drop anything in the StockRx schema, and runs a real patch and its restore."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import inspect
from sqlalchemy.engine import make_url

from patch_ops.database import DatabaseUnavailable, check_connection, get_engine
from patch_ops.target_sets import own_table_name
from tests.patch_ops.steps.test_restore import restore
from tests.support.mysql import PATCH_USER_PRIVILEGES, MySQLServer
from tests.support.postgres import PostgresServer
from tests.support.stockrx import (
    PRICE_JOB,
    digest,
    failure_description,
    latest_execution,
    prices,
    run_patch,
    seeded,
)

PCT8 = {"adjustment_type": "percentage", "adjustment_value": 8, "dry_run": False}


@dataclass(frozen=True)
class Split:
    owner_url: str  # the StockRx tables' owner (seeds them; reads them back)
    patch_url: str  # the least-privilege patch user, framework_schema in the URL
    stockrx_schema: str | None  # where the StockRx tables are (None: the default schema)
    framework_schema: str


def with_schema(url: str, schema: str) -> str:
    u = make_url(url)
    return u.update_query_dict({"framework_schema": schema}).render_as_string(False)


@pytest.fixture
def mariadb_split(mysql_server: MySQLServer, mysql_url: str) -> Iterator[Split]:
    u = make_url(mysql_url)
    db, user = str(u.database), str(u.username)
    seeded(mysql_url, items=200)
    framework = f"{db}_fw"
    with mysql_server.admin_connection() as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{framework}` CHARACTER SET utf8mb4")
        cur.execute(f"REVOKE ALL PRIVILEGES ON `{db}`.* FROM %s@%s", (user, mysql_server.user_host))
        cur.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON `{db}`.* TO %s@%s",
                    (user, mysql_server.user_host))
        cur.execute(f"GRANT {PATCH_USER_PRIVILEGES} ON `{framework}`.* TO %s@%s",
                    (user, mysql_server.user_host))
    get_engine(mysql_url).dispose()  # database grants apply to new connections only
    try:
        yield Split(mysql_server.root_url(db), with_schema(mysql_url, framework), None, framework)
    finally:
        with mysql_server.admin_connection() as conn, conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{framework}`")


@pytest.fixture
def postgres_split(pg_server: PostgresServer, pg_url: str) -> Iterator[Split]:
    seeded(pg_url, items=200)
    role = f"patcher_{secrets.token_hex(4)}"
    password = secrets.token_hex(12)
    u = make_url(pg_url)
    admin = psycopg.connect(
        host=u.host, port=u.port, user=u.username, dbname=u.database, autocommit=True
    )
    r = sql.Identifier(role)
    for statement in (
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(r, sql.Literal(password)),
        sql.SQL("CREATE SCHEMA patches AUTHORIZATION {}").format(r),
        sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(r),
        sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {}")
        .format(r),
        sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {}").format(r),
        sql.SQL("REVOKE CREATE ON SCHEMA public FROM PUBLIC"),
    ):
        admin.execute(statement)
    patch_url = u.set(username=role, password=password).render_as_string(False)
    try:
        yield Split(pg_url, with_schema(patch_url, "patches"), "public", "patches")
    finally:
        get_engine(with_schema(patch_url, "patches")).dispose()
        admin.execute(sql.SQL("DROP SCHEMA patches CASCADE"))
        admin.execute(sql.SQL("DROP OWNED BY {}").format(r))
        admin.execute(sql.SQL("DROP ROLE {}").format(r))
        admin.close()


@pytest.fixture(params=[
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("mariadb", marks=pytest.mark.mysql),
])
def split(request: pytest.FixtureRequest) -> Split:
    return request.getfixturevalue(f"{request.param}_split")  # type: ignore[no-any-return]


def test_a_patch_and_its_restore_need_no_ddl_on_the_stockrx_tables(split: Split) -> None:
    owner = get_engine(split.owner_url)
    before, before_prices = digest(owner), prices(owner)

    result = run_patch(split.patch_url, PRICE_JOB, PCT8)
    assert result.success, failure_description(result)
    patched = get_engine(split.patch_url)
    ex = latest_execution(patched)
    assert (ex["status"], ex["phase"]) == ("completed", "verified")
    after = prices(owner)
    assert after != before_prices and after.keys() == before_prices.keys()

    tables = inspect(owner).get_table_names(schema=split.stockrx_schema)
    framework = inspect(owner).get_table_names(schema=split.framework_schema)
    assert not [t for t in tables if t.startswith("data_patch_")]
    work_tables = ex["report"]["work_tables"]  # the run's work rows, in tables of its own
    assert {t: set(kinds) for t, kinds in work_tables.items()} == {
        "inventories": {"backup", "update"}, "inventory_logs": {"backup", "insert"}}
    assert work_tables == {t: {kind: own_table_name(kind, str(ex["execution_id"]), t)
                               for kind in kinds} for t, kinds in work_tables.items()}
    assert {"data_patch_executions", "data_patch_audit_events",
            *[name for kinds in work_tables.values() for name in kinds.values()]} <= set(framework)
    assert not [t for t in framework if t.startswith(("data_patch_backup__", "data_patch_stage__"))]

    undone = restore(split.patch_url, str(ex["execution_id"]), dry_run=False)
    assert undone.success, failure_description(undone)
    assert digest(owner) == before


def test_the_patch_user_cannot_create_tables_next_to_stockrx(split: Split) -> None:
    """The premise of the test above: without framework_schema the same user is refused."""
    url = make_url(split.patch_url).difference_update_query(["framework_schema"])
    result = run_patch(url.render_as_string(False), PRICE_JOB, {**PCT8, "dry_run": True})
    assert not result.success
    message = failure_description(result)
    assert "may not create the framework's tables" in message and "framework_schema" in message
    assert "\n" not in message


def test_a_framework_schema_that_does_not_exist_is_one_line_naming_it(split: Split) -> None:
    url = make_url(split.patch_url).update_query_dict({"framework_schema": "no_such_schema"})
    engine = get_engine(url.render_as_string(False))
    with pytest.raises(DatabaseUnavailable) as info:
        check_connection(engine)
    message = str(info.value)
    assert "'no_such_schema'" in message and "does not exist" in message
    assert "\n" not in message and (url.password or "") not in message
