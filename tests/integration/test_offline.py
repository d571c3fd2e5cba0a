"""Offline delivery through a real server (library clients): issue 12, docs/PROTOCOL.md section 15."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from server_fixtures import PASSWORD, logged_in_client, running_server, wait_for

from secureim import client as C
from secureim import proto as P
from secureim.client import chat as CC
from secureim.client import offline as offline
from secureim.errors import MessageRefused


def _published(client: C.ChatClient) -> C.ChatClient:
    assert client.mailbox.published.wait(20), "the client did not publish its prekeys"
    return client


def _away(server, home, name: str) -> None:
    """``name`` registers, publishes prekeys and leaves."""
    _published(logged_in_client(server, home, name)).close()


def test_three_messages_wait_for_bob_across_a_restart_arrive_in_order_once_and_are_receipted(tmp_path):
    secrets = ["first of three", "second of three", "third of three"]
    with running_server(tmp_path / "srv") as server:
        port = server.server_address[1]
        _away(server, tmp_path / "bob", "bob")
        alice = logged_in_client(server, tmp_path / "alice", "alice", auto_reconnect=True, reconnect_max_s=30)
        alice.open_conversation("bob")
        wait_for(alice, C.PeerOffline, peer="bob")
        for text in secrets:
            alice.send_offline("bob", text)
            stored = wait_for(alice, C.MessageStored)
            assert (stored.peer, stored.text, stored.online) == ("bob", text, False)
        assert [e.text for e in alice.pending()] == secrets
        db_path = server.storage.path
    rows = sqlite3.connect(db_path).execute("SELECT payload, sender_identity FROM message_queue").fetchall()
    assert len(rows) == 3 and all(s.encode() not in bytes(r[0]) for r in rows for s in secrets)
    with running_server(tmp_path / "srv", port=port) as server:
        wait_for(alice, C.Reconnected, timeout=30)
        bob = logged_in_client(server, tmp_path / "bob", "bob", register=False)
        got = [wait_for(bob, C.MessageReceived, timeout=20) for _ in secrets]
        assert [(m.peer, m.text) for m in got] == [("alice", t) for t in secrets]
        assert all(m.stored_at is not None for m in got)
        delivered = [wait_for(alice, C.MessageDelivered, timeout=20) for _ in secrets]
        assert sorted(d.text for d in delivered) == sorted(secrets) and all(d.stored for d in delivered)
        assert alice.pending() == []
        bob.who()
        wait_for(bob, C.WhoList)
        assert server.storage.queued_for("bob", 0, 10) == []  # acknowledged, so deleted
        bob.close()
        bob = logged_in_client(server, tmp_path / "bob", "bob", register=False)
        bob.who()
        events = []
        while (e := bob.next_event(timeout=5)) is not None and not isinstance(e, C.WhoList):
            events.append(e)
        assert not [e for e in events if isinstance(e, C.MessageReceived)]  # once only
        alice.close()
        bob.close()


def test_a_full_mailbox_refuses_plainly_and_keeps_what_is_stored(tmp_path):
    with running_server(tmp_path / "srv", queue_max_messages=2) as server:
        _away(server, tmp_path / "bob", "bob")
        alice = logged_in_client(server, tmp_path / "alice", "alice")
        for text in ("one", "two"):
            alice.send_offline("bob", text)
            wait_for(alice, C.MessageStored, text=text)
        alice.send_offline("bob", "three")
        refused = wait_for(alice, C.MessageNotStored)
        assert (
            refused.text == "three"
            and "mailbox is full" in refused.reason
            and "Nothing already stored" in refused.reason
        )
        assert [e.text for e in alice.pending()] == ["one", "two"]
        bob = logged_in_client(server, tmp_path / "bob", "bob", register=False)
        assert [wait_for(bob, C.MessageReceived).text for _ in range(2)] == ["one", "two"]
        alice.close()
        bob.close()


def test_stored_messages_to_an_online_user_are_handed_over_at_once(tmp_path):
    with running_server(tmp_path / "srv") as server:
        bob = _published(logged_in_client(server, tmp_path / "bob", "bob"))
        alice = logged_in_client(server, tmp_path / "alice", "alice")
        alice.send_offline("bob", "straight through")
        assert wait_for(alice, C.MessageStored).online is True
        assert wait_for(bob, C.MessageReceived).text == "straight through"
        assert wait_for(alice, C.MessageDelivered).text == "straight through"
        alice.close()
        bob.close()


def test_live_messages_are_receipted_end_to_end(tmp_path):
    from server_fixtures import chat_pair

    with running_server(tmp_path / "srv") as server:
        alice, bob = chat_pair(server, tmp_path)
        alice.send_message("bob", "live one")
        assert wait_for(bob, C.MessageReceived).text == "live one"
        assert wait_for(alice, C.MessageDelivered).text == "live one"
        assert alice.pending() == []
        alice.close()
        bob.close()


def test_a_changed_identity_holds_stored_messages_until_accept(tmp_path):
    with running_server(tmp_path / "srv") as server:
        _away(server, tmp_path / "bob", "bob")
        alice = logged_in_client(server, tmp_path / "alice", "alice")
        alice.send_offline("bob", "before reinstall")
        wait_for(alice, C.MessageStored)
        alice.close()
        bob = _published(logged_in_client(server, tmp_path / "bob", "bob", register=False))
        assert wait_for(bob, C.MessageReceived).text == "before reinstall"
        bob.close()  # bob has now pinned alice's key
        alice2 = logged_in_client(
            server, tmp_path / "alice-new", "alice", register=False
        )  # a reinstall: new key
        alice2.send_offline("bob", "after reinstall")
        wait_for(alice2, C.MessageStored)
        alice2.close()
        bob = logged_in_client(server, tmp_path / "bob", "bob", register=False)
        warning = wait_for(bob, C.SecurityWarning, peer="alice")
        assert "identity key changed" in warning.text
        assert [m.payload for m in server.storage.queued_for("bob", 0, 10)] != []  # kept, not acknowledged
        assert bob.accept_identity("alice")
        assert wait_for(bob, C.MessageReceived).text == "after reinstall"
        bob.close()


def test_the_server_refuses_malformed_prekeys(tmp_path):
    with running_server(tmp_path / "srv") as server:
        alice = _published(logged_in_client(server, tmp_path / "alice", "alice"))
        alice.send_frame(P.PublishPrekeys(signed_prekey=b"x" * 10, one_time=b""))
        assert "Malformed prekeys" in wait_for(alice, C.ServerNotice).text
        alice.close()


def test_writing_to_a_user_without_prekeys_says_so(tmp_path):
    with running_server(tmp_path / "srv") as server:
        server.storage.create_user("old", "x" * 60, b"\x01" * 32)
        alice = logged_in_client(server, tmp_path / "alice", "alice")
        with pytest.raises(MessageRefused, match="no keys for offline messages"):
            alice.send_offline("old", "hello?")
        alice.close()


def test_the_password_is_needed_for_the_prekeys(tmp_path):
    with running_server(tmp_path / "srv") as server:
        bob = _published(logged_in_client(server, tmp_path / "bob", "bob"))
        store = bob.mailbox.store
        assert store is not None and store.path.exists()
        assert PASSWORD.encode() not in store.path.read_bytes()
        bob.close()


def test_a_server_replaying_a_stored_message_gets_it_acknowledged_and_never_shown_twice(tmp_path):
    with running_server(tmp_path / "srv") as server:
        _away(server, tmp_path / "bob", "bob")
        alice = logged_in_client(server, tmp_path / "alice", "alice")
        alice.send_offline("bob", "only once")
        wait_for(alice, C.MessageStored)
        (original,) = server.storage.queued_for("bob", 0, 10)
        bob = logged_in_client(server, tmp_path / "bob", "bob", register=False)
        assert wait_for(bob, C.MessageReceived).text == "only once"
        bob.close()
        # The server (or whoever has its database) stores the same ciphertext again, as new.
        from dataclasses import replace

        server.storage.enqueue(replace(original, msg_ref=b"\x07" * 16), 1000, 1 << 20)
        bob = logged_in_client(server, tmp_path / "bob", "bob", register=False)
        bob.who()
        events = []
        while not isinstance(e := wait_for(bob, object), C.WhoList):
            events.append(e)
        assert not [e for e in events if isinstance(e, (C.MessageReceived, C.MessageRejected))], events
        bob.who()  # the Ack went before the first answer was read: this answer follows its handling
        wait_for(bob, C.WhoList)
        assert server.storage.queued_for("bob", 0, 10) == []  # acknowledged all the same
        alice.close()
        bob.close()


class _DeliveryClient:
    """What a Mailbox needs of its client for receipts: the texts it reports delivered, in order."""

    def __init__(self):
        self.events = []

    def delivered_event(self, entry):
        self.events.append(entry.text)


def test_a_receipt_only_marks_messages_sent_to_its_sender():
    box = offline.Mailbox(_DeliveryClient())
    msg_id = b"\x01" * 16
    box.sent_live("bob", "for bob", msg_id)
    box.on_receipt("carol", (msg_id,))  # carol cannot confirm what bob received
    assert [e.text for e in box.pending()] == ["for bob"] and box.client.events == []
    box.on_receipt("bob", (msg_id,))
    assert box.pending() == [] and box.client.events == ["for bob"]


def test_a_receipt_that_overtakes_its_message_still_marks_it_delivered():
    """Over direct UDP on one machine the peer's receipt can come back before the sender has written
    the message into its outbox; it waits (bounded) and delivers the message once it is written."""
    box = offline.Mailbox(_DeliveryClient())
    first, second, third = b"\x01" * 16, b"\x02" * 16, b"\x03" * 16
    box.on_receipt("bob", (first,))
    box.on_receipt("carol", (second,))  # carol's receipt for a message to bob counts for nothing
    entry = box.sent_live("bob", "for bob", first)
    assert entry.state == offline.DELIVERED and entry.receipted.is_set()
    assert box.pending() == [] and box.client.events == ["for bob"]
    assert box.sent_live("bob", "again", second).state == offline.SENT
    box.on_receipt("bob", (third,) + tuple(bytes([4, i]) * 8 for i in range(offline.MAX_EARLY_RECEIPTS)))
    assert box.sent_live("bob", "long ago", third).state == offline.SENT  # bounded: the oldest went
    assert box.client.events == ["for bob"]


def test_a_receipt_that_overtakes_the_servers_store_answer_is_said_after_it():
    """The server hands a stored message to a recipient who is online before it answers the
    sender; the recipient's receipt can come back first.  It must neither be lost nor lose the
    answer: the sender is told stored (handed over), then delivered, and its wait ends."""

    class Stub:
        def __init__(self):
            self.events = []

        def stored_event(self, entry):
            self.events.append(("stored", entry.state))

        def delivered_event(self, entry):
            self.events.append(("delivered", entry.text))

    box = offline.Mailbox(Stub())
    ref = b"\x05" * 16
    entry = offline.Outgoing(ref, "bob", "to bob", 0.0, offline.SENDING, stored=True)
    box._remember(entry)
    box.on_receipt("carol", (ref,))  # not carol's message: nothing
    box.on_receipt("bob", (ref,))
    assert box.client.events == [] and not entry.answered.is_set() and box.entry(ref) is entry
    box.on_store_result(
        P.StoreResult(conversation_id=1, msg_ref=ref, status=P.StoreStatus.HANDED_OVER, reason="")
    )
    assert box.client.events == [("stored", offline.HANDED), ("delivered", "to bob")]
    assert entry.answered.is_set() and entry.receipted.is_set() and entry.state == offline.DELIVERED
    assert box.pending() == [] and box.entry(ref) is None


class _OpeningClient:
    """What Mailbox.outbound_for needs of its client: each OfflineOpen is recorded with its
    barrier (clientlib's own), answered by the test; ``progress`` is set at every open."""

    node_id = "test"

    def __init__(self, refusal: str | None = None):
        self.opens: list[CC.Barrier] = []
        self.progress = threading.Event()
        self.refusal = refusal

    def barrier_after(self, msg):
        barrier = CC.Barrier()
        if self.refusal is not None:  # answered at once, with this refusal and no session
            barrier.refusals.append(self.refusal)
            barrier.done.set()
        self.opens.append(barrier)
        self.progress.set()
        return barrier


def test_two_threads_opening_to_one_peer_share_one_open():
    """Two OfflineOpens in flight to one peer would overwrite each other's answer (one of the two
    senders then fails with a spurious refusal); the second thread waits for the first's session."""
    box = offline.Mailbox(_OpeningClient())
    waiting = threading.Event()

    class SpyCondition:  # says when a thread waits for another's open
        def __init__(self, real):
            self.real = real

        def wait(self, timeout):
            waiting.set()
            box.client.progress.set()
            return self.real.wait(timeout)

        def notify_all(self):
            self.real.notify_all()

    box._open_done = SpyCondition(box._open_done)
    got = {}
    first = threading.Thread(target=lambda: got.__setitem__("first", box.outbound_for("bob")), daemon=True)
    first.start()
    assert box.client.progress.wait(10)
    assert len(box.client.opens) == 1
    box.client.progress.clear()
    second = threading.Thread(target=lambda: got.__setitem__("second", box.outbound_for("bob")), daemon=True)
    second.start()
    assert box.client.progress.wait(10)  # it waits for the first, or (wrongly) opens a second
    assert waiting.is_set() and len(box.client.opens) == 1  # no second OfflineOpen went
    session = object()
    with box.lock:  # the answer, as on_offline_key keeps it
        box.outbound["bob"] = (session, time.monotonic())
        box._answered["bob"] = session
    box.client.opens[0].done.set()
    first.join(10)
    second.join(10)
    assert got == {"first": session, "second": session}


def test_a_late_answer_to_an_open_that_timed_out_is_not_taken_by_the_next():
    """An OfflineKey that came after its asker gave up stays behind; the next open to that peer,
    refused this time (say the peer's identity changed), must fail, not take the old session."""
    box = offline.Mailbox(_OpeningClient(refusal="refused for the test"))
    box._answered["bob"] = object()  # the late answer to an earlier open
    with pytest.raises(MessageRefused, match="refused for the test"):
        box.outbound_for("bob")


def test_offline_opens_are_rate_limited_per_session(tmp_path):
    with running_server(tmp_path / "srv", offline_opens_per_minute=3) as server:
        _away(server, tmp_path / "bob", "bob")
        alice = logged_in_client(server, tmp_path / "alice", "alice")
        for _ in range(3):
            alice.barrier_after(P.OfflineOpen(peer="bob")).done.wait(10)
        barrier = alice.barrier_after(P.OfflineOpen(peer="bob"))
        assert barrier.done.wait(10) and "Too many offline conversations" in barrier.refusals[0]
        assert server.storage.prekey_status("bob").one_time_left == 97  # the refused one took none
        alice.close()


def test_a_new_identity_key_drops_the_prekeys_signed_by_the_old_one(tmp_path):
    with running_server(tmp_path / "srv") as server:
        _away(server, tmp_path / "bob", "bob")
        assert server.storage.prekey_status("bob").signed_id is not None
        fresh = logged_in_client(
            server, tmp_path / "bob-elsewhere", "bob", register=False, persist_identity=False
        )
        fresh.who()
        wait_for(fresh, C.WhoList)
        status = server.storage.prekey_status("bob")
        assert status.signed_id is None and status.one_time_left == 0
        fresh.close()


def test_storing_into_someone_elses_conversation_is_refused(tmp_path):
    with running_server(tmp_path / "srv") as server:
        _away(server, tmp_path / "bob", "bob")
        alice = logged_in_client(server, tmp_path / "alice", "alice")
        alice.send_offline("bob", "ours")
        wait_for(alice, C.MessageStored)
        (row,) = server.storage.queued_for("bob", 0, 10)
        carol = logged_in_client(server, tmp_path / "carol", "carol")
        results = []
        carol.mailbox.on_store_result = results.append
        carol.send_frame(
            P.Store(
                conversation_id=row.conversation_id,
                generation=row.generation,
                msg_ref=b"\x09" * 16,
                payload=row.payload,
            )
        )
        carol.who()
        wait_for(carol, C.WhoList)
        assert [(r.status, r.reason) for r in results] == [(P.StoreStatus.REFUSED, "No such conversation.")]
        assert len(server.storage.queued_for("bob", 0, 10)) == 1
        alice.close()
        carol.close()


def _drop_next_message_from(server, who: str):
    """The server loses the next end-to-end message (not key shares) that ``who`` relays."""
    armed = {"on": True}
    original = server.service.conversations.relay

    def spy(session, msg):
        if armed["on"] and session.username == who and msg.payload[:1] == b"\x02":
            armed["on"] = False
            return None
        return original(session, msg)

    server.service.router.override(P.Relay, spy)
    return armed


def test_a_live_message_lost_with_the_connection_is_sent_again_after_the_reconnect_and_shown_once(tmp_path):
    from server_fixtures import chat_pair

    with running_server(tmp_path / "srv") as server:
        alice, bob = chat_pair(server, tmp_path)
        armed = _drop_next_message_from(server, "alice")
        alice.send_message("bob", "lost with the server")
        bob.who()
        wait_for(bob, C.WhoList)
        assert not armed["on"] and [e.text for e in alice.pending()] == ["lost with the server"]
        alice.resume()  # the connection dropped; the ticket brings it back
        assert wait_for(bob, C.MessageReceived, timeout=20).text == "lost with the server"
        assert wait_for(alice, C.MessageDelivered, timeout=20).text == "lost with the server"
        alice.send_message("bob", "and the next one")
        assert wait_for(bob, C.MessageReceived).text == "and the next one"
        alice.close()
        bob.close()


def test_a_message_whose_receipt_was_lost_is_resent_but_shown_once(tmp_path):
    from server_fixtures import chat_pair

    with running_server(tmp_path / "srv") as server:
        alice, bob = chat_pair(server, tmp_path)
        armed = _drop_next_message_from(server, "bob")  # bob's receipt is lost
        alice.send_message("bob", "arrived, receipt lost")
        assert wait_for(bob, C.MessageReceived).text == "arrived, receipt lost"
        for _ in range(50):  # the receipt goes from bob's mailbox thread: round trips until it went
            if not armed["on"]:
                break
            bob.who()
            wait_for(bob, C.WhoList)
        assert not armed["on"] and len(alice.pending()) == 1
        alice.resume()
        assert wait_for(alice, C.MessageDelivered, timeout=20).text == "arrived, receipt lost"
        alice.send_message("bob", "after")
        assert wait_for(bob, C.MessageReceived).text == "after"  # nothing shown twice in between
        alice.close()
        bob.close()


def test_the_history_marks_receipted_messages_delivered(tmp_path):
    with running_server(tmp_path / "srv") as server:
        _away(server, tmp_path / "bob", "bob")
        alice = logged_in_client(server, tmp_path / "alice", "alice", history=True)
        alice.send_offline("bob", "kept in the history")
        wait_for(alice, C.MessageStored)
        assert [e.state for e in alice.history_page("bob").entries] == ["sent"]
        bob = logged_in_client(server, tmp_path / "bob", "bob", register=False)
        wait_for(bob, C.MessageReceived)
        wait_for(alice, C.MessageDelivered)
        assert [e.state for e in alice.history_page("bob").entries] == ["delivered"]
        alice.close()
        bob.close()


def test_a_second_message_of_the_same_offline_session_opens_at_the_next_login(tmp_path):
    """The recipient logs in and out between two messages of one offline session: its state is kept
    (sealed) with the prekeys, so the second opens too, and is not taken for a replay."""
    with running_server(tmp_path / "srv") as server:
        _away(server, tmp_path / "bob", "bob")
        alice = logged_in_client(server, tmp_path / "alice", "alice")
        alice.send_offline("bob", "first, then bob leaves")
        wait_for(alice, C.MessageStored)
        bob = logged_in_client(server, tmp_path / "bob", "bob", register=False)
        assert wait_for(bob, C.MessageReceived).text == "first, then bob leaves"
        bob.close()
        alice.send_offline("bob", "second, same session")
        wait_for(alice, C.MessageStored)
        bob = logged_in_client(server, tmp_path / "bob", "bob", register=False)
        assert wait_for(bob, C.MessageReceived).text == "second, same session"
        alice.close()
        bob.close()


def test_stored_messages_still_open_after_the_recipient_changed_the_password(tmp_path):
    with running_server(tmp_path / "srv") as server:
        bob = _published(logged_in_client(server, tmp_path / "bob", "bob"))
        bob.change_password(PASSWORD, "a brand new password")
        bob.close()
        alice = logged_in_client(server, tmp_path / "alice", "alice")
        alice.send_offline("bob", "after your password change")
        wait_for(alice, C.MessageStored)
        bob = logged_in_client(
            server, tmp_path / "bob", "bob", register=False, password="a brand new password"
        )
        assert wait_for(bob, C.MessageReceived).text == "after your password change"
        alice.close()
        bob.close()


def test_messages_held_for_an_identity_decision_do_not_hold_up_the_others(tmp_path, monkeypatch):
    from secureim.server import store_forward as SF

    monkeypatch.setattr(SF, "QUEUE_WINDOW", 2)
    with running_server(tmp_path / "srv") as server:
        _away(server, tmp_path / "bob", "bob")
        mallory = logged_in_client(server, tmp_path / "mallory", "mallory")
        mallory.send_offline("bob", "hello from mallory")
        wait_for(mallory, C.MessageStored)
        mallory.close()
        bob = _published(logged_in_client(server, tmp_path / "bob", "bob", register=False))
        wait_for(bob, C.MessageReceived)  # bob pins mallory's key
        bob.close()
        again = logged_in_client(server, tmp_path / "mallory-new", "mallory", register=False)  # a new key
        for i in range(4):
            again.send_offline("bob", f"held {i}")
            wait_for(again, C.MessageStored)
        again.close()
        carol = logged_in_client(server, tmp_path / "carol", "carol")
        carol.send_offline("bob", "carol's, behind them")
        wait_for(carol, C.MessageStored)
        bob = logged_in_client(server, tmp_path / "bob", "bob", register=False)
        assert wait_for(bob, C.MessageReceived, timeout=20).text == "carol's, behind them"
        bob.who()  # its Ack went before this request: once the answer is in, the server has handled it
        wait_for(bob, C.WhoList)
        assert len(server.storage.queued_for("bob", 0, 10)) == 4  # mallory's wait for /accept, not lost
        carol.close()
        bob.close()


def test_the_ids_of_messages_shown_are_remembered_across_a_restart(tmp_path):
    class Stub:
        identity = None

    box = offline.Mailbox(Stub())
    box.open_store(tmp_path, "bob", "srv", "pw")
    assert box.seen_before("alice", b"\x05" * 16) is False
    box.save()
    again = offline.Mailbox(Stub())
    again.open_store(tmp_path, "bob", "srv", "pw")
    assert again.seen_before("alice", b"\x05" * 16) is True


def test_an_offline_open_answered_while_a_live_conversation_comes_up_is_still_used(tmp_path):
    """The race behind a lost receipt: the OfflineKey arrives, then a ConversationReady drops the
    cached offline session before the waiting sender reads it; the answer it asked for is used."""
    with running_server(tmp_path / "srv") as server:
        _away(server, tmp_path / "bob", "bob")
        alice = logged_in_client(server, tmp_path / "alice", "alice")
        original = alice.mailbox.on_offline_key

        def racing(msg):
            original(msg)
            alice.mailbox.forget_outbound(msg.peer)  # what ConversationReady does, in between

        alice.mailbox.on_offline_key = racing
        alice.send_offline("bob", "still sent")
        assert wait_for(alice, C.MessageStored).text == "still sent"
        alice.close()


def test_bad_store_and_forward_frames_get_clear_answers_and_disturb_nobody(tmp_path):
    with running_server(tmp_path / "srv") as server:
        _away(server, tmp_path / "bob", "bob")
        alice = logged_in_client(server, tmp_path / "alice", "alice")
        for bad in (
            P.OfflineOpen(peer="alice"),
            P.OfflineOpen(peer="no such user"),
            P.PublishPrekeys(signed_prekey=b"", one_time=b"\0" * P.ONE_TIME_PREKEY_BYTES),
            P.PublishPrekeys(signed_prekey=b"", one_time=b"x" * 7),
            P.Ack(queue_id=2**63),
            P.Defer(queue_id=0),
            P.Defer(queue_id=2**63),
        ):
            alice.send_frame(bad)
        results = []
        alice.mailbox.on_store_result = results.append
        alice.send_frame(P.Store(conversation_id=99, generation=1, msg_ref=b"\1" * 16, payload=b"junk"))
        alice.send_frame(
            P.Store(conversation_id=2**64 - 1, generation=1, msg_ref=b"\2" * 16, payload=b"junk")
        )
        alice.who()
        seen = []
        while not isinstance(e := wait_for(alice, object), C.WhoList):
            seen.append(e)
        reasons = [e.text for e in seen if isinstance(e, C.ServerNotice)]
        assert any("yourself" in r for r in reasons) and any("id 0 is reserved" in r for r in reasons)
        assert any("Malformed prekeys" in r for r in reasons)
        assert [e.peer for e in seen if isinstance(e, C.PeerUnknown)] == ["no such user"]
        assert [(r.status, r.reason) for r in results] == [
            (P.StoreStatus.REFUSED, "No such conversation.")
        ] * 2
        del alice.mailbox.on_store_result  # the real handler again
        alice.send_offline("bob", "still served")  # the session and the server go on
        assert wait_for(alice, C.MessageStored).text == "still served"
        alice.close()
