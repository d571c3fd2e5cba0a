"""The encrypted local history (history.py) as a library: sealed rows, bounds, wrong passwords."""

from __future__ import annotations

import sqlite3
import stat
import time

import pytest

from secureim.client import history as H
from secureim.errors import HistoryLocked

PW = "alice-password"
SERVICE = "127.0.0.1:5151"


@pytest.fixture
def hist(tmp_path):
    h = H.History.open(tmp_path, "alice", SERVICE, PW)
    yield h
    h.close()


def test_rows_come_back_in_order_with_direction_time_and_state(hist):
    first = hist.record("bob", H.OUTGOING, "hello bob", state=H.STATE_SENT, at=time.time() - 1000.0)
    hist.record("bob", H.INCOMING, "hi alice", state=H.STATE_RECEIVED)
    hist.record("carol", H.OUTGOING, "not for bob", state=H.STATE_SENT)
    assert hist.set_state(first, H.STATE_ACCEPTED)
    delivered = hist.record("carol", H.OUTGOING, "receipted", state=H.STATE_SENT)
    assert hist.set_state(delivered, H.STATE_DELIVERED)
    assert not hist.set_state(delivered, H.STATE_ACCEPTED)  # a late store answer cannot undo a receipt
    assert [e.state for e in hist.last("carol", 10).entries] == ["sent", "delivered"]
    page = hist.last("bob", 10)
    assert [(e.direction, e.text, e.state) for e in page.entries] == [
        ("out", "hello bob", "accepted"),
        ("in", "hi alice", "received"),
    ]
    assert page.damaged == 0 and all(e.peer == "bob" for e in page.entries)
    assert [e.text for e in hist.last("bob", 1).entries] == ["hi alice"]


def test_an_answer_written_before_its_question_is_still_shown_after_it(hist):
    """The sender writes its row once the message has gone, the receiver thread writes the reply
    as it comes: under load the reply's row can be first.  Rows are shown in the order said."""
    sent_at = time.time()
    hist.record("bob", H.INCOMING, "roger that, over", state=H.STATE_RECEIVED, at=sent_at + 0.05)
    hist.record("bob", H.OUTGOING, "the eagle lands at noon", state=H.STATE_SENT, at=sent_at)
    assert [e.text for e in hist.last("bob", 2).entries] == ["the eagle lands at noon", "roger that, over"]
    assert [e.text for e in hist.last("bob", 1).entries] == ["roger that, over"]


def test_the_file_holds_no_plaintext_and_is_private(tmp_path):
    h = H.History.open(tmp_path, "alice", SERVICE, PW)
    h.record("bob", H.OUTGOING, "attack at dawn", state=H.STATE_SENT)
    h.close()
    path = H.history_path(tmp_path, "alice", SERVICE)
    raw = path.read_bytes() + b"".join(p.read_bytes() for p in path.parent.glob("*-wal"))
    assert b"attack at dawn" not in raw and b"dawn" not in raw
    assert b"bob" not in raw  # not even who the conversation is with
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_a_wrong_password_cannot_open_it_and_the_right_one_can(tmp_path):
    h = H.History.open(tmp_path, "alice", SERVICE, PW)
    h.record("bob", H.INCOMING, "secret", state=H.STATE_RECEIVED)
    h.close()
    with pytest.raises(HistoryLocked, match="another password"):
        H.History.open(tmp_path, "alice", SERVICE, "not-the-password")
    again = H.History.open(tmp_path, "alice", SERVICE, PW)
    assert [e.text for e in again.last("bob").entries] == ["secret"]
    again.close()


def test_a_password_change_reseals_the_key_and_keeps_the_rows(tmp_path):
    h = H.History.open(tmp_path, "alice", SERVICE, PW)
    h.record("bob", H.OUTGOING, "kept", state=H.STATE_SENT)
    h.change_password("new-password-1")
    h.close()
    with pytest.raises(HistoryLocked):
        H.History.open(tmp_path, "alice", SERVICE, PW)
    again = H.History.open(tmp_path, "alice", SERVICE, "new-password-1")
    assert [e.text for e in again.last("bob").entries] == ["kept"]
    again.close()


def _rows(tmp_path):
    return sqlite3.connect(str(H.history_path(tmp_path, "alice", SERVICE)), isolation_level=None)


def test_a_row_moved_to_another_conversation_or_time_is_not_shown(tmp_path):
    h = H.History.open(tmp_path, "alice", SERVICE, PW)
    h.record("bob", H.INCOMING, "to bob", state=H.STATE_RECEIVED)
    h.record("carol", H.INCOMING, "to carol", state=H.STATE_RECEIVED)
    h.record("carol", H.INCOMING, "later", state=H.STATE_RECEIVED)
    db = _rows(tmp_path)
    bob_tag = db.execute("SELECT conversation FROM messages WHERE id = 1").fetchone()[0]
    db.execute("UPDATE messages SET conversation = ? WHERE id = 2", (bob_tag,))  # carol's row filed under bob
    db.execute("UPDATE messages SET at_ms = at_ms - 86400000 WHERE id = 3")  # a row given another time
    db.close()
    bob = h.last("bob")
    assert [e.text for e in bob.entries] == ["to bob"] and bob.damaged == 1
    carol = h.last("carol")
    assert carol.entries == () and carol.damaged == 1
    h.close()


def test_another_users_file_does_not_open_as_mine(tmp_path):
    """The owner (user@service) is bound into the key's and every row's associated data."""
    h = H.History.open(tmp_path, "alice", SERVICE, PW)
    h.record("bob", H.OUTGOING, "mine", state=H.STATE_SENT)
    h.close()
    theirs = H.history_path(tmp_path, "mallory", SERVICE)
    theirs.write_bytes(H.history_path(tmp_path, "alice", SERVICE).read_bytes())
    with pytest.raises(HistoryLocked):
        H.History.open(tmp_path, "mallory", SERVICE, PW)


def test_forget_erases_one_conversation(hist):
    hist.record("bob", H.OUTGOING, "one", state=H.STATE_SENT)
    hist.record("bob", H.OUTGOING, "two", state=H.STATE_SENT)
    hist.record("carol", H.OUTGOING, "stays", state=H.STATE_SENT)
    assert hist.forget("bob") == 2
    assert hist.last("bob").entries == ()
    assert [e.text for e in hist.last("carol").entries] == ["stays"]


def test_size_and_age_bounds(tmp_path):
    h = H.History.open(tmp_path, "alice", SERVICE, PW, max_per_conversation=3, max_age_days=30)
    h.record("bob", H.OUTGOING, "ancient", state=H.STATE_SENT, at=time.time() - 31 * 86400)
    for i in range(5):
        h.record("bob", H.OUTGOING, f"m{i}", state=H.STATE_SENT)
    h.record("carol", H.OUTGOING, "c", state=H.STATE_SENT)
    assert [e.text for e in h.last("bob", 100).entries] == ["m2", "m3", "m4"]
    h.close()
    h = H.History.open(tmp_path, "alice", SERVICE, PW, max_age_days=30)
    h.record("dave", H.OUTGOING, "old", state=H.STATE_SENT, at=time.time() - 31 * 86400)
    h.close()
    h = H.History.open(tmp_path, "alice", SERVICE, PW, max_age_days=30)  # pruned on open
    assert h.last("dave").entries == () and h.last("dave").damaged == 0
    assert [e.text for e in h.last("carol").entries] == ["c"]
    h.close()
    assert H.DEFAULT_MAX_PER_CONVERSATION == 10_000 and H.DEFAULT_MAX_AGE_DAYS == 365


# --- through the library -------------------------------------------------------------
def _login(server, home, password, **kw):
    from secureim import client as C

    host, port = server.server_address
    client = C.ChatClient(host, port, home=home, history=True, **kw)
    client.connect()
    client.login("alice", password)
    client.start()
    return client


def test_passwd_reseals_the_history_and_a_foreign_seal_is_said_not_overwritten(tmp_path):
    from server_fixtures import logged_in_client, running_server

    from secureim import client as C

    with running_server(tmp_path / "srv") as server:
        logged_in_client(server, tmp_path / "alice", "alice").close()  # registered
        alice = _login(server, tmp_path / "alice", "correct horse battery")
        assert alice.history is not None
        alice.history.record("bob", H.OUTGOING, "before the change", state=H.STATE_SENT)
        alice.change_password("correct horse battery", "a new password 2")
        alice.close()
        again = _login(server, tmp_path / "alice", "a new password 2")
        assert [e.text for e in again.history_page("bob").entries] == ["before the change"]
        again.close()
        # A history sealed under another password (changed on another device): said, and left alone.
        path = H.history_path(tmp_path / "alice", "alice", again.server_id)
        H.History.open(tmp_path / "elsewhere", "alice", again.server_id, "some other password").close()
        planted = H.history_path(tmp_path / "elsewhere", "alice", again.server_id).read_bytes()
        path.write_bytes(planted)
        third = _login(server, tmp_path / "alice", "a new password 2")
        assert third.history is None
        event = third.next_event(timeout=5)
        assert isinstance(event, C.HistoryUnavailable) and "another password" in event.reason
        third.close()
        assert path.read_bytes() == planted  # not overwritten, not re-keyed
