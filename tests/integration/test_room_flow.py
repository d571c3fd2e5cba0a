"""Group rooms through a real server with library clients (issue 13, docs/PROTOCOL.md section 16)."""

from __future__ import annotations

import sqlite3

import pytest
from room_helpers import any_key_opens
from server_fixtures import logged_in_client, running_server, wait_for

from secureim import proto as P
from secureim.client import rooms as RC
from secureim.e2e import rooms as R
from secureim.errors import RoomError


def _published(client):
    assert client.mailbox.published.wait(20), "the client did not publish its prekeys"
    return client


def _team(server, tmp_path, names=("alice", "bob", "carol")):
    clients = {n: _published(logged_in_client(server, tmp_path / n, n)) for n in names}
    alice = clients["alice"]
    alice.rooms.create("#team")
    for name in names[1:]:
        alice.rooms.invite("#team", name)
        wait_for(clients[name], RC.RoomNotice, timeout=15, room="#team")
    return clients


def _drain_notices(client, count):
    return [wait_for(client, RC.RoomNotice, timeout=15) for _ in range(count)]


def test_three_members_each_reach_the_other_two_and_membership_is_verified(tmp_path):
    with running_server(tmp_path / "srv") as server:
        c = _team(server, tmp_path)
        alice, bob, carol = c["alice"], c["bob"], c["carol"]
        assert alice.rooms.members("#team") == ("alice", "bob", "carol")
        wait_for(bob, RC.RoomNotice, timeout=15, text="alice added carol to #team.")
        assert bob.rooms.members("#team") == ("alice", "bob", "carol")  # bob saw carol's addition too
        for sender in (alice, bob, carol):
            sent = sender.rooms.send("#team", f"hello from {sender.username}")
            assert sent.online == 2 and sent.stored == 0
            for other in (alice, bob, carol):
                if other is not sender:
                    got = wait_for(other, RC.RoomMessageReceived, timeout=15)
                    assert (got.room, got.sender, got.text) == (
                        "#team",
                        sender.username,
                        f"hello from {sender.username}",
                    )
        assert server.storage.get_room("#team").members == ("alice", "bob", "carol")
        for client in c.values():
            client.close()


def test_a_removed_member_gets_nothing_more_and_an_offline_member_gets_it_later(tmp_path):
    with running_server(tmp_path / "srv") as server:
        c = _team(server, tmp_path)
        alice, bob, carol = c["alice"], c["bob"], c["carol"]
        alice.rooms.send("#team", "before")
        wait_for(carol, RC.RoomMessageReceived, text="before", timeout=15)
        wait_for(bob, RC.RoomMessageReceived, text="before", timeout=15)
        kept = R.RoomSession.from_dict("carol", carol.rooms.rooms["#team"].to_dict())
        alice.rooms.remove("#team", "carol")
        assert wait_for(carol, RC.RoomNotice, timeout=15).text == "alice removed you from #team."
        assert wait_for(bob, RC.RoomNotice, timeout=15).text == "alice removed carol from #team."
        assert carol.rooms.my_rooms() == []
        bob.close()
        sent = alice.rooms.send("#team", "after carol, while bob is away")
        assert (sent.online, sent.stored) == (0, 1)
        rows = (
            sqlite3.connect(server.storage.path)
            .execute("SELECT recipient, payload FROM message_queue WHERE kind = 1")
            .fetchall()
        )
        assert [r[0] for r in rows] == ["bob"]
        assert not any_key_opens(kept, "alice", bytes(rows[0][1]))
        bob = logged_in_client(server, tmp_path / "bob", "bob", register=False)
        got = wait_for(bob, RC.RoomMessageReceived, timeout=20)
        assert (got.text, got.stored_at is not None) == ("after carol, while bob is away", True)
        with pytest.raises(RoomError):
            carol.rooms.send("#team", "still here?")
        for client in (alice, bob, carol):
            client.close()


def test_only_the_admin_changes_members_and_mistakes_get_clear_answers(tmp_path):
    with running_server(tmp_path / "srv", room_max_members=3) as server:
        c = _team(server, tmp_path, ("alice", "bob", "carol"))
        alice, bob = c["alice"], c["bob"]
        c["dave"] = _published(logged_in_client(server, tmp_path / "dave", "dave"))
        with pytest.raises(RoomError, match="Only #team's admin"):
            bob.rooms.invite("#team", "dave")
        with pytest.raises(RoomError, match="full"):
            alice.rooms.invite("#team", "dave")
        with pytest.raises(RoomError, match="not in #nope"):
            alice.rooms.send("#nope", "x")
        alice.rooms.remove("#team", "carol")
        wait_for(c["carol"], RC.RoomNotice, timeout=15, text="alice removed you from #team.")
        with pytest.raises(RoomError, match="already exists"):
            c["carol"].rooms.create("#team")
        with pytest.raises(RoomError, match="no user"):
            alice.rooms.invite("#team", "nobody")
        mine = bob.rooms.rooms["#team"]
        leave = mine.next_change(bob.identity, R.LEAVE, "bob", 1)
        answer = bob.rooms._request(P.RoomChange(room_id=mine.room_id, change=leave.blob), "#team")
        assert answer.status == P.RoomStatus.OK and answer.key == b""  # no key of the epoch without bob
        assert wait_for(alice, RC.RoomNotice, text="bob left #team.", timeout=15)
        for client in c.values():
            client.close()


def test_a_change_forged_by_the_server_is_refused_loudly(tmp_path):
    with running_server(tmp_path / "srv") as server:
        c = _team(server, tmp_path, ("alice", "bob"))
        alice, bob = c["alice"], c["bob"]
        mallory = _published(logged_in_client(server, tmp_path / "mallory", "mallory"))
        room = server.storage.get_room("#team")
        forged = R.make_change(
            mallory.identity,
            action=R.ADD,
            uid=room.uid,
            room="#team",
            epoch=room.epoch + 1,
            at_ms=1,
            prev_head=room.head,
            actor="alice",
            target="mallory",
            admin="alice",
            roster=[
                *((m, server.storage.get_identity_key(m)) for m in room.members),
                ("mallory", server.storage.get_identity_key("mallory")),
            ],
        )
        # The server itself writes it in: the member list, the queue, a key for mallory.
        status, _ = server.storage.change_room(
            room.id,
            room.epoch,
            forged.head,
            add="mallory",
            change=forged.blob,
            wrapped_key=None,
            actor="alice",
            actor_identity=server.storage.get_identity_key("alice"),
            msg_ref=b"f" * 16,
            now=1.0,
        )
        assert status == "ok"
        for user in ("alice", "bob", "mallory"):
            server.service.mailbox.nudge(user)
        warning = wait_for(bob, RC.RoomWarning, timeout=15)
        assert "forged" in warning.text and "#team" in warning.text
        assert bob.rooms.members("#team") == ("alice", "bob")
        assert "mallory" not in alice.rooms.members("#team")
        wait_for(alice, RC.RoomWarning, timeout=15)
        # The server's room is now ahead of every honest client: nothing is sent into it, and the
        # sender keys only ever go to the members the clients verified.
        with pytest.raises(RoomError, match="refused or has not received"):
            alice.rooms.send("#team", "mallory must not read this")
        assert alice.rooms.rooms["#team"].own.sent_to == {"bob"}  # never mallory
        events = []
        while (e := mallory.next_event(timeout=2)) is not None:
            events.append(e)
        assert not [e for e in events if isinstance(e, RC.RoomMessageReceived)]
        assert mallory.rooms.my_rooms() == []  # the forged change did not name a signature mallory could use
        for client in (alice, bob, mallory):
            client.close()


def test_the_server_refuses_what_the_clients_would_refuse(tmp_path):
    """Server side: a change not signed by its actor is not committed; a removed member's send is
    not fanned out; the removed member's copy of the change carries no key of the new epoch."""
    import queue as Q

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    import database as D

    with running_server(tmp_path / "srv") as server:
        c = _team(server, tmp_path)
        alice, carol = c["alice"], c["carol"]
        room = server.storage.get_room("#team")
        bad = R.make_change(
            Ed25519PrivateKey.generate(),
            action=R.ADD,
            uid=room.uid,
            room="#team",
            epoch=room.epoch + 1,
            at_ms=1,
            prev_head=room.head,
            actor="alice",
            target="mallory",
            admin="alice",
            roster=[
                *((m, server.storage.get_identity_key(m)) for m in room.members),
                ("mallory", b"\x01" * 32),
            ],
        )
        with pytest.raises(RoomError, match="not signed"):
            alice.rooms._request(P.RoomChange(room_id=room.id, change=bad.blob), "#team")  # answered by name
        assert server.storage.get_room("#team").epoch == room.epoch
        _published(logged_in_client(server, tmp_path / "dave", "dave")).close()
        wrong_key = alice.rooms.rooms["#team"].next_change(alice.identity, R.ADD, "dave", 2, b"\x02" * 32)
        with pytest.raises(RoomError, match="not dave's"):
            alice.rooms._request(P.RoomChange(room_id=room.id, change=wrong_key.blob), "#team")
        assert server.storage.get_room("#team").epoch == room.epoch
        alice.rooms.remove("#team", "carol")
        wait_for(carol, RC.RoomNotice, timeout=15)
        after = server.storage.get_room("#team")
        waiter: Q.Queue = Q.Queue()
        carol.rooms.messaging._sends[b"c" * 16] = waiter
        carol.send_frame(
            P.RoomSend(room_id=room.id, epoch=after.epoch, msg_ref=b"c" * 16, payload=b"x" * 100)
        )
        answer = waiter.get(timeout=15)
        assert answer.status == P.RoomStatus.REFUSED and "not a member" in answer.reason
        blob = (
            sqlite3.connect(server.storage.path)
            .execute(
                "SELECT change_blob FROM room_changes WHERE room_id = ? AND epoch = ?", (room.id, after.epoch)
            )
            .fetchone()[0]
        )
        removal = R.parse_change(bytes(blob))
        assert (removal.action, removal.target) == (R.REMOVE, "carol")
        key = server.service.suite.generate_key()
        row = D.QueuedMessage(
            1,
            "carol",
            "alice",
            0,
            after.epoch,
            b"r" * 16,
            b"\x01" * 32,
            removal.blob,
            1.0,
            server.service.room_keyring.seal_key(room.id, after.epoch, key),
            room_id=room.id,
            kind=2,
        )
        assert server.service.room_row_message("carol", row).key == b""  # who is removed gets no new key
        assert server.service.room_row_message("bob", row).key == key
        for client in c.values():
            client.close()


def test_bad_room_frames_are_refused_without_harm(tmp_path):
    with running_server(tmp_path / "srv") as server:
        alice = _published(logged_in_client(server, tmp_path / "alice", "alice"))
        for msg in (
            P.RoomCreate(change=b"junk"),
            P.RoomChange(room_id=2**64 - 1, change=b""),
            P.RoomSend(room_id=0, epoch=0, msg_ref=b"r" * 16, payload=b"x"),
            P.RoomSend(room_id=2**64 - 1, epoch=9, msg_ref=b"r" * 16, payload=b"x"),
        ):
            alice.send_frame(msg)
        alice.rooms.create("#ok")
        assert alice.rooms.my_rooms() == ["#ok"]
        alice.close()


def test_deleting_an_account_leaves_its_rooms_first_with_signed_changes(tmp_path):
    from server_fixtures import PASSWORD

    from secureim import client as C
    from secureim.errors import InvalidPassword

    with running_server(tmp_path / "srv") as server:
        c = _team(server, tmp_path)
        alice, bob = c["alice"], c["bob"]
        bob.rooms.create("#bobs")
        bob.rooms.invite("#bobs", "alice")
        wait_for(alice, RC.RoomNotice, timeout=15, text="bob added you to #bobs (members: alice, bob).")
        with pytest.raises(InvalidPassword, match="still in your rooms"):
            bob.delete_account("not the password", "bob")
        assert bob.rooms.my_rooms() == ["#bobs", "#team"]
        bob.delete_account(PASSWORD, "bob")
        assert wait_for(bob, C.AccountDeletion, timeout=20).deleted
        notices = {wait_for(alice, RC.RoomNotice, timeout=15).text for _ in range(2)}
        assert notices == {"bob left #team.", "bob closed #bobs."}
        assert alice.rooms.my_rooms() == ["#team"] and alice.rooms.members("#team") == ("alice", "carol")
        assert server.storage.get_room("#team").members == ("alice", "carol")
        assert server.storage.get_room("#bobs") is None
        for client in c.values():
            client.close()


def test_a_room_message_is_fanned_out_on_the_loop_only_when_no_database_is_needed(tmp_path):
    """The fast path (rooms.RoomKeyring.send_is_fast): the room cached for its epoch and every
    other member online; with a member away a worker takes it, and queues their copy."""
    with running_server(tmp_path / "srv") as server:
        _published(logged_in_client(server, tmp_path / "dave", "dave")).close()  # away from the start
        c = _team(server, tmp_path, ("alice", "bob", "carol"))
        alice = c["alice"]
        alice.rooms.send("#team", "warms the cache")
        room = alice.rooms.rooms["#team"]
        session = server.service.registry.session_of("alice")

        def probe(epoch):
            return P.RoomSend(room_id=room.room_id, epoch=epoch, msg_ref=b"p" * 16, payload=b"x" * 100)

        assert server.service.room_send_is_fast(session, probe(room.epoch))
        assert not server.service.room_send_is_fast(session, probe(room.epoch + 1))  # not cached: a worker
        alice.rooms.invite("#team", "dave")
        sent = alice.rooms.send("#team", "dave is away")
        assert (sent.online, sent.stored) == (2, 1)
        assert not server.service.room_send_is_fast(session, probe(room.epoch))
        for client in c.values():
            client.close()
