"""The offline queue and prekeys in the database (docs/PROTOCOL.md section 15), on SQLite and MariaDB."""

from __future__ import annotations

import threading

import pytest
from db_fixtures import mysql_url

from database import (
    DUPLICATE,
    FULL_BYTES,
    FULL_MESSAGES,
    NO_KEY,
    STORED,
    QueuedMessage,
    SQLiteStorage,
    open_storage,
)


@pytest.fixture(params=["sqlite", "mysql"])
def storage(request, tmp_path):
    if request.param == "sqlite":
        store = SQLiteStorage(tmp_path / "q.db")
    else:
        store = open_storage(mysql_url(request.getfixturevalue("mysql_database")))
    for name in ("alice", "bob", "carol"):
        store.create_user(name, "x" * 60, b"\x01" * 32)
    yield store
    store.close()


def _msg(ref: bytes, payload: bytes = b"ct", sender: str = "alice", generation: int = 1, cid: int = 1):
    return QueuedMessage(
        0, "bob", sender, cid, generation, ref.ljust(16, b"\0"), b"\x02" * 32, payload, 100.0, None
    )


def _keyed(storage, sender="alice", generation=1) -> int:
    cid = storage.open_conversation(sender, "bob")
    storage.put_offline_key("bob", cid, generation, sender, b"wrapped-" + sender.encode(), 100.0)
    return cid


def test_messages_are_stored_in_order_with_their_key_and_deleted_only_on_ack(storage):
    cid = _keyed(storage)
    ids = [storage.enqueue(_msg(bytes([i]), f"ct{i}".encode(), cid=cid), 1000, 1 << 20) for i in range(3)]
    assert [status for status, _ in ids] == [STORED] * 3
    queued = storage.queued_for("bob", 0, 100)
    assert [m.payload for m in queued] == [b"ct0", b"ct1", b"ct2"]
    assert all(m.wrapped_key == b"wrapped-alice" and m.sender == "alice" for m in queued)
    assert storage.queued_for("alice", 0, 100) == []
    assert storage.ack_queued("alice", queued[0].id) is False  # only the recipient acknowledges
    assert storage.ack_queued("bob", queued[0].id) is True
    assert [m.payload for m in storage.queued_for("bob", 0, 100)] == [b"ct1", b"ct2"]
    assert [m.payload for m in storage.queued_for("bob", queued[1].id, 100)] == [b"ct2"]


def test_a_resend_is_not_stored_twice(storage):
    cid = _keyed(storage)
    status, first = storage.enqueue(_msg(b"r", cid=cid), 1000, 1 << 20)
    assert status == STORED
    assert storage.enqueue(_msg(b"r", cid=cid), 1000, 1 << 20) == (DUPLICATE, first)
    assert len(storage.queued_for("bob", 0, 100)) == 1


def test_a_message_without_an_offline_key_is_refused(storage):
    cid = _keyed(storage, generation=1)
    assert storage.enqueue(_msg(b"x", generation=2, cid=cid), 1000, 1 << 20) == (NO_KEY, 0)
    assert storage.enqueue(_msg(b"y", sender="carol", cid=cid), 1000, 1 << 20) == (NO_KEY, 0)


def test_the_bounds_refuse_new_messages_and_keep_the_stored_ones(storage):
    cid = _keyed(storage)
    for i in range(3):
        assert storage.enqueue(_msg(bytes([i]), b"x" * 10, cid=cid), 3, 1000)[0] == STORED
    assert storage.enqueue(_msg(b"more", cid=cid), 3, 1000) == (FULL_MESSAGES, 0)
    assert storage.enqueue(_msg(b"big", b"y" * 971, cid=cid), 10, 1000) == (FULL_BYTES, 0)
    assert [m.payload for m in storage.queued_for("bob", 0, 100)] == [b"x" * 10] * 3


def test_the_bound_holds_under_concurrent_senders(storage):
    cid = _keyed(storage)
    results = []

    def send(i: int) -> None:
        results.append(storage.enqueue(_msg(i.to_bytes(2, "big"), cid=cid), 5, 1 << 20)[0])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results.count(STORED) == 5 and len(storage.queued_for("bob", 0, 100)) == 5


def test_one_time_prekeys_are_handed_out_once_and_bounded(storage):
    assert storage.take_prekey_bundle("bob") == (None, None)
    storage.set_signed_prekey("bob", 7, b"signed", 50.0)
    assert storage.add_one_time_prekeys("bob", [(i, b"otk%d" % i) for i in range(1, 6)], max_kept=3) == 3
    status = storage.prekey_status("bob")
    assert (status.one_time_left, status.signed_id, status.signed_at) == (3, 7, 50.0)
    taken = [storage.take_prekey_bundle("bob") for _ in range(4)]
    assert [t[0] for t in taken] == [b"signed"] * 4
    assert [t[1] for t in taken] == [b"otk1", b"otk2", b"otk3", None]  # then the signed prekey alone
    assert storage.prekey_status("bob").one_time_left == 0


def test_concurrent_senders_never_share_a_one_time_prekey(storage):
    storage.set_signed_prekey("bob", 1, b"s", 1.0)
    storage.add_one_time_prekeys("bob", [(i, b"k%d" % i) for i in range(1, 21)], max_kept=100)
    got = []
    threads = [
        threading.Thread(target=lambda: got.append(storage.take_prekey_bundle("bob")[1])) for _ in range(20)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(got) == sorted(b"k%d" % i for i in range(1, 21))


def test_expiry_and_account_deletion_remove_stored_messages(storage):
    cid = _keyed(storage)
    storage.enqueue(_msg(b"old", cid=cid), 10, 1 << 20)
    assert storage.expire_queue(before=50.0) == 0
    assert storage.expire_queue(before=200.0) == 1
    storage.put_offline_key("bob", cid, 2, "alice", b"w", 300.0)
    storage.enqueue(_msg(b"new", generation=2, cid=cid), 10, 1 << 20)
    storage.set_signed_prekey("bob", 1, b"s", 1.0)
    assert storage.delete_user("bob")
    assert storage.queued_for("bob", 0, 100) == [] and storage.take_prekey_bundle("bob") == (None, None)
