"""Storage fixtures: SQLite in a temp dir, and a real MariaDB database per test run."""

from __future__ import annotations

import os
import secrets

import pytest

MYSQL_HOST = os.environ.get("SECUREIM_TEST_MYSQL_HOST", "127.0.0.1")
MYSQL_PORT = int(os.environ.get("SECUREIM_TEST_MYSQL_PORT", "3306"))
MYSQL_USER = os.environ.get("SECUREIM_TEST_MYSQL_USER", "root")


def mysql_admin():
    """A root connection to the MariaDB server, or skip (fail under REQUIRE_MYSQL=1)."""
    import pymysql

    try:
        return pymysql.connect(
            host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, password="", connect_timeout=3, autocommit=True
        )
    except pymysql.MySQLError as exc:
        if os.environ.get("REQUIRE_MYSQL") == "1":
            pytest.fail(f"REQUIRE_MYSQL=1 but MariaDB at {MYSQL_HOST}:{MYSQL_PORT} is unreachable: {exc}")
        pytest.skip(
            f"MariaDB not reachable at {MYSQL_HOST}:{MYSQL_PORT} ({exc}); set REQUIRE_MYSQL=1 to fail"
        )


@pytest.fixture
def mysql_database():
    """The name of a fresh MariaDB database, dropped afterwards."""
    admin = mysql_admin()
    name = f"secureim_test_{secrets.token_hex(6)}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    try:
        yield name
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


def mysql_url(name: str) -> str:
    return f"mysql://{MYSQL_USER}@{MYSQL_HOST}:{MYSQL_PORT}/{name}"
