"""rooms.py, sans-IO: signed membership, sender keys and room messages (docs/PROTOCOL.md section 16)."""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import crypto_utils as cu
import e2e
import rooms as R
from room_helpers import any_key_opens
from errors import ChangeRefused, DecryptionFailed, InvalidRoomName

SUITE = cu.get_suite("3des").suite_id
NOW = 1_800_000_000.0


class User:
    def __init__(self, name: str) -> None:
        self.name = name
        self.key = Ed25519PrivateKey.generate()
        self.pub = cu.public_bytes(self.key)


@pytest.fixture
def people():
    return {n: User(n) for n in ("alice", "bob", "carol", "dave", "mallory")}


def _create(alice: User, name: str = "#team") -> tuple[R.RoomSession, R.Change]:
    change = R.make_change(alice.key, action=R.CREATE, uid=cu.random_bytes(16), room=name, epoch=1, at_ms=1,
                           prev_head=R.ZERO_HEAD, actor="alice", target="", admin="alice", members=["alice"])
    room = R.RoomSession.first_contact("alice", change, alice.pub, SUITE, my_identity=alice.pub)
    room.set_kdc_key(1, cu.random_bytes(32))
    return room, change


def _join(admin_room: R.RoomSession, admin: User, newcomer: User, kdc: bytes) -> tuple[R.RoomSession, R.Change]:
    change = admin_room.next_change(admin.key, R.ADD, newcomer.name, 2)
    admin_room.apply(change, admin.pub, kdc)
    room = R.RoomSession.first_contact(newcomer.name, change, admin.pub, SUITE)
    room.set_kdc_key(change.epoch, kdc)
    return room, change


def _give_keys(sender_room: R.RoomSession, *receivers: R.RoomSession) -> None:
    content, missing = sender_room.distribution()
    for room in receivers:
        assert room.me in missing
        assert room.receive_distribution(sender_room.me, content) == "ok"
    sender_room.mark_sent([r.me for r in receivers])


@pytest.fixture
def team(people):
    """alice (admin), bob and carol in #team at epoch 3, each with the others' sender keys."""
    a, _ = _create(people["alice"])
    b, ch_b = _join(a, people["alice"], people["bob"], cu.random_bytes(32))
    kdc3 = cu.random_bytes(32)
    c, ch_c = _join(a, people["alice"], people["carol"], kdc3)
    b.apply(ch_c, None, kdc3)
    for sender in (a, b, c):
        _give_keys(sender, *[r for r in (a, b, c) if r is not sender])
    return a, b, c


def test_room_names_follow_the_rules():
    assert R.normalize_room(" #Team-1 ") == "#team-1"
    for bad in ("team", "#", "#" + "a" * 33, "#te am", "#tëam", "##x"):
        with pytest.raises(InvalidRoomName):
            R.normalize_room(bad)


def test_a_message_reaches_every_member_and_each_one_opens_it_once(team):
    a, b, c = team
    payload = a.seal("hello team", e2e.new_msg_id(), NOW)
    assert b.open("alice", payload, now=NOW).text == "hello team"
    assert c.open("alice", payload, now=NOW).text == "hello team"
    with pytest.raises(DecryptionFailed, match="replayed"):
        b.open("alice", payload, now=NOW)
    reply = b.seal("hi alice", e2e.new_msg_id(), NOW)
    assert a.open("bob", reply, now=NOW).text == "hi alice"


def test_a_member_cannot_pass_off_a_message_as_another_members(team):
    a, b, c = team
    payload = bytearray(c.seal("from carol", e2e.new_msg_id(), NOW))
    with pytest.raises(DecryptionFailed):
        b.open("alice", bytes(payload), now=NOW)      # carol's message relabelled as alice's
    payload[-1] ^= 1
    with pytest.raises(DecryptionFailed, match="not signed"):
        b.open("carol", bytes(payload), now=NOW)


def test_a_removed_member_cannot_read_what_follows_even_keeping_every_key(team, people):
    a, b, c = team
    kept = R.RoomSession.from_dict("carol", c.to_dict())      # carol keeps everything (a bad client)
    removal = a.next_change(people["alice"].key, R.REMOVE, "carol", 3)
    kdc4 = cu.random_bytes(32)
    a.apply(removal, people["alice"].pub, kdc4)
    assert b.apply(removal, None, kdc4).text == "alice removed carol from #team."
    applied = c.apply(removal, None)
    assert applied.me_gone
    _give_keys(a, b)
    content, missing = a.distribution()
    assert missing == [] and "carol" not in a.members
    payload = a.seal("carol is gone", e2e.new_msg_id(), NOW)
    assert b.open("alice", payload, now=NOW).text == "carol is gone"
    for holder in (kept, c):
        with pytest.raises(DecryptionFailed, match="does not hold"):
            holder.open("alice", payload, now=NOW)
    # Every chain key and room key carol ever held, at every counter she could reach: none opens it.
    assert not any_key_opens(kept, "alice", payload)


def test_a_member_who_joins_cannot_read_what_was_sent_before(team, people):
    a, b, _c = team
    before = a.seal("before dave", e2e.new_msg_id(), NOW)
    d, ch = _join(a, people["alice"], people["dave"], cu.random_bytes(32))
    b.apply(ch, None, a.epochs[ch.epoch].kdc_key)
    _give_keys(a, b, d)
    with pytest.raises(DecryptionFailed):
        d.open("alice", before, now=NOW)
    assert not any_key_opens(d, "alice", before)
    assert d.open("alice", a.seal("welcome", e2e.new_msg_id(), NOW), now=NOW).text == "welcome"


def test_a_forged_add_is_refused_and_changes_nothing(team, people):
    a, b, _c = team
    mallory = people["mallory"]
    forged = R.make_change(mallory.key, action=R.ADD, uid=b.uid, room="#team", epoch=b.epoch + 1, at_ms=5,
                           prev_head=b.head, actor="alice", target="mallory", admin="alice",
                           members=[*b.members, "mallory"])
    before = b.to_dict()
    with pytest.raises(ChangeRefused, match="forged"):
        b.apply(forged, mallory.pub)   # whatever key the server claims, the admin's pinned key decides
    assert b.to_dict() == before
    # Nor may a member add anyone, even signing correctly with their own key.
    by_bob = R.make_change(people["bob"].key, action=R.ADD, uid=b.uid, room="#team", epoch=b.epoch + 1, at_ms=5,
                           prev_head=b.head, actor="bob", target="mallory", admin="alice",
                           members=[*b.members, "mallory"])
    with pytest.raises(ChangeRefused, match="Only the admin"):
        b.apply(by_bob, people["bob"].pub)


def test_changes_must_follow_in_order_without_gaps_or_forks(team, people):
    a, b, _c = team
    alice = people["alice"]
    first = a.next_change(alice.key, R.ADD, "dave", 1)
    a.apply(first, alice.pub, b"k" * 32)
    second = a.next_change(alice.key, R.REMOVE, "dave", 2)
    with pytest.raises(ChangeRefused, match="withheld"):
        b.apply(second, None)
    b.apply(first, None)
    assert b.apply(first, None) is None                  # a redelivery: nothing new
    fork = R.make_change(alice.key, action=R.ADD, uid=b.uid, room="#team", epoch=first.epoch, at_ms=9,
                         prev_head=first.prev_head, actor="alice", target="mallory", admin="alice",
                         members=[*first.members[:0], "alice", "bob", "carol", "mallory"])
    with pytest.raises(ChangeRefused, match="different histories"):
        b.apply(fork, None)
    wrong_list = R.make_change(alice.key, action=R.REMOVE, uid=b.uid, room="#team", epoch=b.epoch + 1, at_ms=9,
                               prev_head=b.head, actor="alice", target="dave", admin="alice",
                               members=["alice", "bob"])
    with pytest.raises(ChangeRefused, match="does not follow"):
        b.apply(wrong_list, None)
    off_chain = R.make_change(alice.key, action=R.REMOVE, uid=b.uid, room="#team", epoch=b.epoch + 1, at_ms=9,
                              prev_head=first.prev_head, actor="alice", target="dave", admin="alice",
                              members=["alice", "bob", "carol"])
    with pytest.raises(ChangeRefused, match="does not follow the last one"):
        b.apply(off_chain, None)


def test_a_change_from_another_room_is_refused(team, people):
    a, b, _c = team
    other, _ = _create(people["alice"], "#team")   # same name, another uid (a room made again)
    replayed = other.next_change(people["alice"].key, R.ADD, "mallory", 1)
    with pytest.raises(ChangeRefused, match="another room"):
        b.apply(replayed, None)


def test_a_message_from_another_room_does_not_open(team, people):
    a, b, _c = team
    other, _ = _create(people["alice"], "#side")
    ob, ch = _join(other, people["alice"], people["bob"], cu.random_bytes(32))
    _give_keys(other, ob)
    payload = other.seal("side room", e2e.new_msg_id(), NOW)
    with pytest.raises(DecryptionFailed):
        b.open("alice", payload, now=NOW)


def test_leave_is_signed_by_who_leaves_and_the_admin_cannot_leave_but_closes(team, people):
    a, b, c = team
    leave = b.next_change(people["bob"].key, R.LEAVE, "bob", 3)
    with pytest.raises(ChangeRefused, match="not signed"):
        c.apply(leave, people["mallory"].pub)
    assert c.apply(leave, people["bob"].pub).text == "bob left #team."
    with pytest.raises(ChangeRefused):
        a.next_change(people["alice"].key, R.LEAVE, "alice", 4)
    close = a.next_change(people["alice"].key, R.CLOSE, "", 4)
    a.apply(leave, people["bob"].pub)
    close = a.next_change(people["alice"].key, R.CLOSE, "", 4)
    applied = c.apply(close, None)
    assert applied.me_gone and applied.text == "alice closed #team."


def test_sender_keys_for_a_future_epoch_wait_and_stale_or_foreign_ones_are_refused(team, people):
    a, b, c = team
    alice = people["alice"]
    add = a.next_change(alice.key, R.ADD, "dave", 1)
    a.apply(add, alice.pub, b"k" * 32)
    content, _missing = a.distribution()
    assert b.receive_distribution("alice", content) == "later"
    b.apply(add, None, b"k" * 32)
    assert [s for s, _ in b.take_pending()] == ["alice"]
    with pytest.raises(ChangeRefused, match="not a member"):
        b.receive_distribution("mallory", content)


def test_the_servers_room_key_is_an_input_of_every_message_key(team):
    a, b, _c = team
    payload = a.seal("needs the room key", e2e.new_msg_id(), NOW)
    with pytest.raises(DecryptionFailed, match="integrity"):
        b.open("alice", payload, now=NOW, kdc_key=cu.random_bytes(32))
    assert b.open("alice", payload, now=NOW).text == "needs the room key"


def test_a_stored_message_may_be_old_but_not_from_the_future(team):
    a, b, _c = team
    old = a.seal("from last week", e2e.new_msg_id(), NOW - 7 * 86400)
    with pytest.raises(DecryptionFailed, match="too old"):
        b.open("alice", old, now=NOW)
    assert b.open("alice", old, now=NOW, stored_at=NOW - 7 * 86400 + 1).text == "from last week"


def test_state_survives_a_restart_and_a_replay_after_it_is_refused(team):
    a, b, _c = team
    payload = a.seal("once", e2e.new_msg_id(), NOW)
    assert b.open("alice", payload, now=NOW).text == "once"
    again = R.RoomSession.from_dict("bob", b.to_dict())
    with pytest.raises(DecryptionFailed, match="replayed"):
        again.open("alice", payload, now=NOW)
    assert again.open("alice", a.seal("twice", e2e.new_msg_id(), NOW), now=NOW).text == "twice"


def test_a_sender_key_is_never_reused_across_epochs_or_restarts(team, people):
    a, b, _c = team
    first = a.own_key()
    again = R.RoomSession.from_dict("alice", a.to_dict())   # the sender's own key is not kept at rest
    assert again.own_key().key_id != first.key_id and again.own_key().chain.key != first.chain.key
    add = a.next_change(people["alice"].key, R.ADD, "dave", 1)
    a.apply(add, people["alice"].pub, b"k" * 32)
    assert a.own_key().key_id != first.key_id


def test_malformed_changes_and_messages_are_refused_cleanly(team):
    a, b, _c = team
    for junk in (b"", b"\x01" * 10, bytes(200)):
        with pytest.raises(ChangeRefused):
            R.parse_change(junk)
    for junk in (b"", b"\x10" + bytes(80), bytes(200)):
        with pytest.raises(DecryptionFailed):
            b.open("alice", junk, now=time.time())
