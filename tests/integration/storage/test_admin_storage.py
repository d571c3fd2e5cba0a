"""The operations part of the storage contract (audit, bans, actions, epochs, sessions), on SQLite and MariaDB."""

from __future__ import annotations

import time

import pytest
from db_fixtures import mysql_url

import database


@pytest.fixture(params=["sqlite", "mysql"])
def storage(request, tmp_path):
    if request.param == "sqlite":
        store = database.open_storage(f"sqlite:///{tmp_path}/test.db")
    else:
        name = request.getfixturevalue("mysql_database")
        store = database.open_storage(mysql_url(name))
    yield store
    store.close()


def test_audit_rows_filter_and_prune(storage):
    storage.audit("login", "alice", "10.0.0.1", "", at=100.0)
    storage.audit("login_failed", "bob", "10.0.0.2", "INVALID_CREDENTIALS", at=200.0)
    storage.audit("ban", "bob", "console", "for 3600 s: spam", at=300.0)
    assert [e.event for e in storage.audit_events()] == ["login", "login_failed", "ban"]
    assert [e.event for e in storage.audit_events(username="bob")] == ["login_failed", "ban"]
    assert [e.at for e in storage.audit_events(since=200.0)] == [200.0, 300.0]
    first = storage.audit_events()[0]
    assert (first.username, first.source) == ("alice", "10.0.0.1")
    assert storage.prune_audit(before=250.0) == 2
    assert [e.event for e in storage.audit_events()] == ["ban"]


def test_audit_detail_is_bounded(storage):
    storage.audit("admin", "alice", "cli", "x" * 5000)
    assert len(storage.audit_events()[0].detail) == database.MAX_AUDIT_DETAIL


def test_bans_expire_and_lift(storage):
    now = time.time()
    storage.set_ban("user", "bob", 0, "spam")
    storage.set_ban("user", "carol", now - 1, "old")  # already over
    storage.set_ban("address", "10.0.0.0/8", now + 60, "bots")
    assert storage.user_ban("bob", now).reason == "spam"
    assert storage.user_ban("carol", now) is None
    assert storage.user_ban("alice", now) is None
    assert [b.target for b in storage.active_bans(now)] == ["10.0.0.0/8", "bob"]
    assert [b.target for b in storage.active_bans(now, kind="address")] == ["10.0.0.0/8"]
    storage.set_ban("user", "bob", now + 5, "again")  # replaces, not duplicates
    assert storage.user_ban("bob", now).until == pytest.approx(now + 5)
    assert storage.remove_ban("user", "bob")
    assert not storage.remove_ban("user", "bob")
    assert storage.user_ban("bob", now) is None


def test_admin_actions_are_read_in_order_after_an_id(storage):
    start = storage.last_admin_action_id()
    a = storage.post_admin_action("kick", "bob", "bye")
    b = storage.post_admin_action("address", "", "")
    assert a > start and b > a
    actions = storage.admin_actions_after(start)
    assert [(x.action, x.username, x.reason) for x in actions] == [
        ("kick", "bob", "bye"),
        ("address", "", ""),
    ]
    assert storage.admin_actions_after(b) == []
    assert storage.last_admin_action_id() == b


def test_ticket_epoch_and_password_reset(storage):
    assert storage.get_ticket_epoch("alice") is None
    storage.create_user("alice", "h1")
    assert storage.get_ticket_epoch("alice") == 0
    storage.record_login("alice", 123.0)
    assert storage.get_ticket_epoch("alice") == 0
    storage.bump_ticket_epoch("alice")
    storage.bump_ticket_epoch("alice")
    assert storage.get_ticket_epoch("alice") == 2
    assert storage.set_password_hash("alice", "h2")
    assert storage.get_password_hash("alice") == "h2"
    assert not storage.set_password_hash("nobody", "h3")


def test_users_list_shows_last_login_and_lockout(storage):
    now = time.time()
    storage.create_user("alice", "h")
    storage.create_user("bob", "h")
    storage.record_login("alice", now - 10)
    storage.record_login_failure("bob", "10.0.0.9", now, 1, 60)
    users = {u.username: u for u in storage.list_users(now)}
    assert users["alice"].last_login_at == pytest.approx(now - 10) and not users["alice"].locked
    assert users["bob"].last_login_at is None and users["bob"].locked
    assert abs(users["alice"].created_at - now) < 120
    assert [(x.username, x.source) for x in storage.list_lockouts(now)] == [("bob", "10.0.0.9")]
    assert storage.clear_all_login_failures("bob") == 1
    assert storage.list_lockouts(now) == []


def test_delete_user_removes_everything_kept_for_them(storage):
    storage.create_user("alice", "h")
    storage.create_user("bob", "h")
    cid = storage.open_conversation("alice", "bob")
    storage.record_login("bob", 1.0)
    storage.bump_ticket_epoch("bob")
    storage.record_login_failure("bob", "1.2.3.4", time.time(), 5, 60)
    storage.session_started("n1", "bob", "1.2.3.4", 1.0)
    assert storage.delete_user("bob")
    assert not storage.delete_user("bob")
    assert storage.get_password_hash("bob") is None
    assert storage.get_conversation(cid) is None
    assert storage.get_ticket_epoch("bob") is None
    assert storage.get_login_failures("bob", "1.2.3.4").failures == 0
    assert storage.list_sessions() == []
    assert [u.username for u in storage.list_users(time.time())] == ["alice"]
    storage.create_user("bob", "h")  # the name is free again, with a fresh state
    assert storage.get_ticket_epoch("bob") == 0


def test_live_sessions_per_node(storage):
    storage.session_started("n1", "alice", "10.0.0.1", 5.0)
    storage.session_started("n2", "bob", "10.0.0.2", 6.0)
    storage.session_started("n1", "alice", "10.0.0.3", 7.0)  # a new login replaces the row
    assert [(s.node, s.username, s.source, s.since) for s in storage.list_sessions()] == [
        ("n1", "alice", "10.0.0.3", 7.0),
        ("n2", "bob", "10.0.0.2", 6.0),
    ]
    storage.session_ended("n1", "alice")
    storage.clear_sessions("n2")
    assert storage.list_sessions() == []


def test_record_session_start_writes_last_login_session_and_audit(storage):
    storage.create_user("alice", "h")
    storage.record_session_start("n1", "alice", "10.0.0.1", 50.0, "resume")
    assert storage.list_users(60.0)[0].last_login_at == 50.0
    assert [(s.node, s.source, s.since) for s in storage.list_sessions()] == [("n1", "10.0.0.1", 50.0)]
    assert [(e.at, e.event, e.username, e.source) for e in storage.audit_events()] == [
        (50.0, "resume", "alice", "10.0.0.1")
    ]
