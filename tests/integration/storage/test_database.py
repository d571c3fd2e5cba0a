"""The storage contract, run against both backends (SQLite and a real MariaDB)."""

from __future__ import annotations

import threading

import pytest
from db_fixtures import mysql_admin, mysql_url

import database
from secureim.errors import ConfigError, DatabaseError, DatabaseUnavailable


@pytest.fixture(params=["sqlite", "mysql"])
def storage(request, tmp_path):
    if request.param == "sqlite":
        store = database.open_storage(f"sqlite:///{tmp_path}/test.db")
    else:
        name = request.getfixturevalue("mysql_database")
        store = database.open_storage(mysql_url(name))
    yield store
    store.close()


def test_users(storage):
    assert storage.get_password_hash("alice") is None
    assert storage.create_user("alice", "$2b$04$hash")
    assert not storage.create_user("alice", "$2b$04$other")  # taken
    assert storage.get_password_hash("alice") == "$2b$04$hash"
    assert storage.count_users() == 1


def test_identity_keys(storage):
    key = bytes(range(32))
    assert storage.create_user("bob", "h", key)
    assert storage.get_identity_key("bob") == key
    storage.set_identity_key("bob", b"\xff" * 32)
    assert storage.get_identity_key("bob") == b"\xff" * 32
    assert storage.get_identity_key("nobody") is None


def test_sql_metacharacters_are_data(storage):
    evil = "a'; DROP TABLE users; --"
    assert storage.create_user(evil, "h")
    assert storage.get_password_hash(evil) == "h"
    assert storage.get_password_hash("a") is None
    assert storage.count_users() == 1


def test_conversations_have_members_and_generations_but_no_keys(storage):
    cid = storage.open_conversation("bob", "alice")
    assert storage.open_conversation("alice", "bob") == cid  # one per pair
    assert storage.open_conversation("alice", "carol") != cid
    conv = storage.get_conversation(cid)
    assert conv.members == ("alice", "bob") and conv.key_generation == 0 and conv.key_generated_at is None
    assert storage.record_key_generation(cid) == 1
    assert storage.record_key_generation(cid) == 2
    conv = storage.get_conversation(cid)
    assert conv.key_generation == 2 and conv.key_generated_at > 0
    assert storage.get_conversation(999999) is None
    with pytest.raises(DatabaseError):
        storage.open_conversation("alice", "alice")


def test_lockout_bookkeeping(storage):
    now = 1000.0
    for i in range(1, 5):
        f = storage.record_login_failure("alice", "10.0.0.1", now + i, 5, 60)
        assert f.failures == i and f.locked_until == 0
    f = storage.record_login_failure("alice", "10.0.0.1", now + 5, 5, 60)
    assert f.failures == 5 and f.locked_until == now + 65
    assert storage.get_login_failures("alice", "10.0.0.1") == f
    assert storage.get_login_failures("alice", "10.0.0.2").failures == 0  # per source
    after = storage.record_login_failure("alice", "10.0.0.1", now + 200, 5, 60)
    assert after.failures == 1 and after.locked_until == 0  # expired lock: fresh count
    storage.clear_login_failures("alice", "10.0.0.1")
    assert storage.get_login_failures("alice", "10.0.0.1").failures == 0


def test_concurrent_use_from_threads(storage):
    errors = []

    def worker(i):
        try:
            for j in range(10):
                storage.create_user(f"u{i}_{j}", "h")
                storage.open_conversation(f"u{i}_{j}", "hub")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert storage.count_users() == 80


def test_sqlite_file_is_owner_only(tmp_path):
    (tmp_path / "db").mkdir()
    s = database.open_storage(f"sqlite:///{tmp_path}/db/secureim.db")
    s.create_user("alice", "h")
    assert (tmp_path / "db" / "secureim.db").stat().st_mode & 0o777 == 0o600
    s.close()


def test_sqlite_persists_across_reopen(tmp_path):
    url = f"sqlite:///{tmp_path}/persist.db"
    s = database.open_storage(url)
    s.create_user("alice", "h")
    s.close()
    s2 = database.open_storage(url)
    assert s2.get_password_hash("alice") == "h"
    s2.close()


@pytest.mark.mysql
def test_mysql_uses_stored_procedures_and_schema_is_rerunnable(mysql_database):
    store = database.open_storage(mysql_url(mysql_database))
    store.apply_schema()  # a second run is harmless
    store.create_user("alice", "h")
    admin = mysql_admin()
    with admin.cursor() as cur:
        cur.execute(
            "SELECT ROUTINE_NAME FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = %s",
            (mysql_database,),
        )
        procs = {r[0] for r in cur.fetchall()}
        cur.execute(
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s", (mysql_database,)
        )
        tables = {r[0] for r in cur.fetchall()}
        cur.execute(f"SELECT COUNT(*) FROM `{mysql_database}`.users")
        assert cur.fetchone()[0] == 1
    admin.close()
    store.close()
    assert {
        "sp_create_user",
        "sp_get_password_hash",
        "sp_get_identity_key",
        "sp_set_identity_key",
        "sp_open_conversation",
        "sp_record_key_generation",
        "sp_record_login_failure",
        "sp_clear_login_failures",
        "sp_get_login_failures",
    } <= procs
    assert {"users", "conversations", "conversation_members", "login_failures"} <= tables
    # Every method of the MySQL backend goes through _call (a stored procedure): the domain
    # sides hold no SQL; only the engine runs statements (its migrations).
    import inspect

    from secureim.storage.mysql_engine import MySQLEngine

    assert "cur.execute(" in inspect.getsource(MySQLEngine.apply_schema)
    sides = [c for c in database.MySQLStorage.__mro__ if c.__module__.startswith("secureim.storage.")]
    domains = [c for c in sides if c not in (database.MySQLStorage, MySQLEngine, database.Storage)]
    assert len(domains) == 5
    for side in domains:
        assert "execute(" not in inspect.getsource(side), side


@pytest.mark.mysql
def test_mysql_reconnects_after_a_dropped_connection(mysql_database):
    store = database.open_storage(mysql_url(mysql_database))
    store.create_user("alice", "h")
    admin = mysql_admin()
    with admin.cursor() as cur:  # kill every connection the store holds
        cur.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s", (mysql_database,))
        for (pid,) in cur.fetchall():
            cur.execute("KILL %s", (pid,))
    admin.close()
    assert store.get_password_hash("alice") == "h"
    store.close()


def test_mysql_down_is_unavailable_not_a_crash():
    import socket

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DatabaseUnavailable, match="Cannot reach MySQL"):
        database.open_storage(f"mysql://root@127.0.0.1:{port}/nothing")


@pytest.mark.parametrize(
    "url",
    ["postgres://x/y", "sqlite://", "mysql://host", "mysql:///db", "mysql://root@127.0.0.1/bad-name;drop"],
)
def test_bad_urls(url):
    with pytest.raises(ConfigError):
        database.open_storage(url)


def test_schema_splitter_honours_delimiters():
    stmts = database.split_sql_script(database.SCHEMA_PATH.read_text())
    assert any(s.startswith("CREATE PROCEDURE sp_record_login_failure") and s.endswith("END") for s in stmts)
    assert all(not s.endswith("//") for s in stmts)


def test_password_change_increments_the_ticket_epoch(storage):
    assert storage.get_ticket_epoch("carol") is None
    assert storage.change_password_hash("carol", "h2") is None  # no such user: nothing happens
    assert storage.create_user("carol", "h1")
    assert storage.get_ticket_epoch("carol") == 0
    assert storage.change_password_hash("carol", "h2") == 1
    assert storage.get_password_hash("carol") == "h2"
    assert storage.change_password_hash("carol", "h3") == 2
    assert storage.get_ticket_epoch("carol") == 2


def test_a_sqlite_database_from_before_password_changes_gets_the_epoch_column(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE users (id INTEGER PRIMARY KEY AUTOINCREMENT, username TEXT NOT NULL UNIQUE, "
        "password_hash TEXT NOT NULL, created_at REAL NOT NULL, identity_key BLOB)"
    )
    conn.execute("INSERT INTO users (username, password_hash, created_at) VALUES ('old', 'h', 0)")
    conn.commit()
    conn.close()
    store = database.open_storage(f"sqlite:///{path}")
    assert store.get_ticket_epoch("old") == 0
    assert store.change_password_hash("old", "h2") == 1
    store.close()


def test_mysql_errors_are_worded_for_what_happened(mysql_database):
    with pytest.raises(DatabaseUnavailable, match="refused user 'nobody_here': wrong user name or password"):
        database.open_storage("mysql://nobody_here:pw@127.0.0.1:3306/x")
    with pytest.raises(DatabaseUnavailable, match="Cannot reach MySQL at 127.0.0.1:1 "):
        database.open_storage("mysql://root@127.0.0.1:1/x")
