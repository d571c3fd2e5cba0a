"""Schema versions and numbered migrations (secureim/storage/migrations), on both backends.

The upgrade of a real database written by the release before versions is tests/integration/storage/test_upgrade.py;
here: the numbering, the stamp, a later migration applied once and in order, a failing one
rolled back (SQLite), a newer database refused, concurrent starts (MySQL) and the generated
schema.sql."""

from __future__ import annotations

import shutil
import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import pytest
from db_fixtures import mysql_admin, mysql_url

import database
from secureim.errors import DatabaseError
from secureim.storage import migrations as M


def _versions_sqlite(path: Path) -> list[int]:
    with closing(sqlite3.connect(path)) as conn:
        return [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")]


def _versions_mysql(name: str) -> list[int]:
    admin = mysql_admin()
    try:
        with admin.cursor() as cur:
            cur.execute(f"SELECT version FROM `{name}`.schema_version ORDER BY version")
            return [r[0] for r in cur.fetchall()]
    finally:
        admin.close()


@pytest.fixture
def more_migrations(tmp_path, monkeypatch):
    """A copy of the migrations folders the test may add to (the package's stay as they are)."""
    folder = tmp_path / "migrations"
    for backend in M.BACKENDS:
        shutil.copytree(M.HERE / backend, folder / backend)
    monkeypatch.setattr(M, "HERE", folder)
    return folder


def test_both_backends_have_the_same_numbered_migrations():
    for backend in M.BACKENDS:
        found = M.migrations(backend)
        assert [m.version for m in found] == list(range(1, len(found) + 1))
        assert found[0].name == "initial"
    assert [m.name for m in M.migrations("sqlite")] == [m.name for m in M.migrations("mysql")]


def test_a_gap_in_the_numbers_is_refused(more_migrations):
    (more_migrations / "sqlite" / "0003_later.sql").write_text("SELECT 1;\n")
    with pytest.raises(DatabaseError, match="without gaps"):
        M.migrations("sqlite")


def test_schema_sql_is_the_mysql_migrations_in_order():
    """The top-level schema.sql is generated (python -m secureim.storage.migrations > schema.sql)."""
    assert database.SCHEMA_PATH.read_text() == M.full_mysql_schema()


def test_a_new_sqlite_file_is_at_the_latest_version_and_a_reopen_adds_nothing(tmp_path):
    path = tmp_path / "new.db"
    store = database.SQLiteStorage(path)
    assert store.schema_version() == M.latest("sqlite")
    store.create_user("alice", "h")
    store.close()
    store = database.SQLiteStorage(path)
    assert store.get_password_hash("alice") == "h"
    store.close()
    assert _versions_sqlite(path) == list(range(1, M.latest("sqlite") + 1))


def test_a_sqlite_file_from_before_versions_keeps_its_rows_and_is_stamped(tmp_path):
    path = tmp_path / "old.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(
            "CREATE TABLE users (id INTEGER PRIMARY KEY AUTOINCREMENT, username TEXT NOT NULL UNIQUE, "
            "password_hash TEXT NOT NULL, created_at REAL NOT NULL, identity_key BLOB)"
        )
        conn.execute("INSERT INTO users (username, password_hash, created_at) VALUES ('old', 'h', 0)")
        conn.commit()
    store = database.SQLiteStorage(path)
    try:
        assert store.schema_version() == M.latest("sqlite")
        assert (store.get_password_hash("old"), store.get_ticket_epoch("old")) == ("h", 0)
    finally:
        store.close()
    assert _versions_sqlite(path)[0] == 1


def test_a_later_sqlite_migration_is_applied_once_in_order(tmp_path, more_migrations):
    path = tmp_path / "v1.db"
    database.SQLiteStorage(path).close()
    (more_migrations / "sqlite" / "0002_notes.sql").write_text(
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL);\n"
        "INSERT INTO notes (body) SELECT username FROM users;\n"
    )
    store = database.SQLiteStorage(path)
    store.create_user("alice", "h")
    store.close()
    store = database.SQLiteStorage(path)  # 0002 is not run again (its INSERT would add a row)
    store.close()
    assert _versions_sqlite(path) == [1, 2]
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM notes").fetchone()[0] == 0


def test_a_failing_sqlite_migration_leaves_the_file_as_it_was(tmp_path, more_migrations):
    path = tmp_path / "v1.db"
    store = database.SQLiteStorage(path)
    store.create_user("alice", "h")
    store.close()
    (more_migrations / "sqlite" / "0002_half.sql").write_text(
        "CREATE TABLE half (id INTEGER PRIMARY KEY);\nDELETE FROM users;\nINSERT INTO nowhere VALUES (1);\n"
    )
    with pytest.raises(DatabaseError, match="migration 0002_half.sql failed: no such table: nowhere"):
        database.SQLiteStorage(path)
    with closing(sqlite3.connect(path)) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "half" not in tables
        assert conn.execute("SELECT COUNT(*) FROM users").fetchone()[0] == 1
    assert _versions_sqlite(path) == [1]


def test_a_database_newer_than_the_code_is_refused(tmp_path):
    path = tmp_path / "newer.db"
    database.SQLiteStorage(path).close()
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("INSERT INTO schema_version VALUES (99, 'future', 0)")
        conn.commit()
    with pytest.raises(DatabaseError, match="schema version 99, newer than this server knows"):
        database.SQLiteStorage(path)


# --- MySQL ----------------------------------------------------------------------------------------
def _routines(name: str) -> dict[str, object]:
    admin = mysql_admin()
    try:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT ROUTINE_NAME, CREATED FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = %s",
                (name,),
            )
            return dict(cur.fetchall())
    finally:
        admin.close()


@pytest.mark.mysql
def test_a_new_mysql_database_is_at_the_latest_version_and_a_reopen_touches_nothing(mysql_database):
    store = database.open_storage(mysql_url(mysql_database))
    assert store.schema_version() == M.latest("mysql")
    store.create_user("alice", "h")
    store.close()
    before = _routines(mysql_database)
    assert "sp_create_user" in before
    admin = mysql_admin()
    with admin.cursor() as cur:  # a procedure created again would get a new CREATED time
        cur.execute("DO SLEEP(1.1)")  # CREATED has whole seconds
    admin.close()
    store = database.open_storage(mysql_url(mysql_database))
    assert store.apply_schema() == M.latest("mysql")
    assert store.get_password_hash("alice") == "h"
    store.close()
    assert _routines(mysql_database) == before
    assert _versions_mysql(mysql_database) == list(range(1, M.latest("mysql") + 1))


@pytest.mark.mysql
def test_a_mysql_database_from_before_versions_gets_its_procedures_again(mysql_database):
    store = database.open_storage(mysql_url(mysql_database))
    store.create_user("alice", "h")
    store.close()
    admin = mysql_admin()
    with admin.cursor() as cur:  # as the release before versions left it, one procedure short
        cur.execute(f"DROP TABLE `{mysql_database}`.schema_version")
        cur.execute(f"DROP PROCEDURE `{mysql_database}`.sp_get_password_hash")
    admin.close()
    store = database.open_storage(mysql_url(mysql_database))
    try:
        assert store.schema_version() == M.latest("mysql")
        assert store.get_password_hash("alice") == "h"
    finally:
        store.close()


@pytest.mark.mysql
def test_a_later_mysql_migration_is_applied_once(mysql_database, more_migrations):
    database.open_storage(mysql_url(mysql_database)).close()
    (more_migrations / "mysql" / "0002_notes.sql").write_text(
        "CREATE TABLE IF NOT EXISTS notes (id INT PRIMARY KEY AUTO_INCREMENT, body VARCHAR(32));\n"
        "INSERT INTO notes (body) VALUES ('once');\n"
    )
    for _ in range(2):
        database.open_storage(mysql_url(mysql_database)).close()
    assert _versions_mysql(mysql_database) == [1, 2]
    admin = mysql_admin()
    try:
        with admin.cursor() as cur:
            cur.execute(f"SELECT COUNT(*) FROM `{mysql_database}`.notes")
            assert cur.fetchone()[0] == 1
    finally:
        admin.close()


@pytest.mark.mysql
def test_mysql_servers_starting_at_once_apply_each_migration_once(mysql_database):
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_one() -> None:
        try:
            start.wait()
            database.open_storage(mysql_url(mysql_database)).close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert _versions_mysql(mysql_database) == list(range(1, M.latest("mysql") + 1))


def test_sqlite_servers_opening_one_new_file_at_once_apply_each_migration_once(tmp_path):
    path = tmp_path / "shared.db"
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_one() -> None:
        try:
            start.wait()
            database.SQLiteStorage(path).close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert _versions_sqlite(path) == list(range(1, M.latest("sqlite") + 1))


@pytest.mark.mysql
def test_schema_sql_loads_with_the_mysql_client_and_the_server_takes_it_as_is(mysql_database):
    """``mysql DB < schema.sql`` makes a database at the latest version: a server applies nothing."""
    import os
    import subprocess

    from db_fixtures import MYSQL_HOST, MYSQL_PORT, MYSQL_USER

    tool = shutil.which("mysql") or shutil.which("mariadb")
    if tool is None:
        if os.environ.get("REQUIRE_MYSQL") == "1":
            pytest.fail("REQUIRE_MYSQL=1 but there is no mysql client")
        pytest.skip("no mysql client")
    command = [tool, f"--host={MYSQL_HOST}", f"--port={MYSQL_PORT}", f"--user={MYSQL_USER}", mysql_database]
    with open(database.SCHEMA_PATH, "rb") as script:
        subprocess.run(command, stdin=script, check=True, timeout=120, capture_output=True)
    assert _versions_mysql(mysql_database) == list(range(1, M.latest("mysql") + 1))
    before = _routines(mysql_database)
    store = database.open_storage(mysql_url(mysql_database))
    try:
        assert store.create_user("alice", "h") and store.get_password_hash("alice") == "h"
    finally:
        store.close()
    assert _routines(mysql_database) == before


@pytest.mark.mysql
def test_a_failing_mysql_migration_is_not_stamped_and_runs_again_once_mended(mysql_database, more_migrations):
    database.open_storage(mysql_url(mysql_database)).close()
    later = more_migrations / "mysql" / "0002_notes.sql"
    later.write_text(
        "CREATE TABLE IF NOT EXISTS notes (id INT PRIMARY KEY);\nINSERT INTO nowhere VALUES (1);\n"
    )
    with pytest.raises(DatabaseError, match="migration 0002_notes.sql failed"):
        database.open_storage(mysql_url(mysql_database))
    assert _versions_mysql(mysql_database) == [1]
    later.write_text("CREATE TABLE IF NOT EXISTS notes (id INT PRIMARY KEY);\n")  # rerunnable, as it must be
    store = database.open_storage(mysql_url(mysql_database))
    try:
        assert store.schema_version() == 2
    finally:
        store.close()
    assert _versions_mysql(mysql_database) == [1, 2]
