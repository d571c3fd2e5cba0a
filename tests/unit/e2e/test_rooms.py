"""rooms.py, sans-IO: signed membership, sender keys and room messages (docs/PROTOCOL.md section 16)."""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from room_helpers import any_key_opens

import crypto_utils as cu
from secureim.e2e import rooms as R
from secureim.e2e import sessions as e2e
from secureim.errors import ChangeRefused, DecryptionFailed, InvalidRoomName

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
    change = R.make_change(
        alice.key,
        action=R.CREATE,
        uid=cu.random_bytes(16),
        room=name,
        epoch=1,
        at_ms=1,
        prev_head=R.ZERO_HEAD,
        actor="alice",
        target="",
        admin="alice",
        roster=[("alice", alice.pub)],
    )
    room = R.RoomSession.first_contact("alice", change, alice.pub, SUITE)
    room.set_kdc_key(1, cu.random_bytes(32))
    return room, change


def _join(
    admin_room: R.RoomSession, admin: User, newcomer: User, kdc: bytes
) -> tuple[R.RoomSession, R.Change]:
    change = admin_room.next_change(admin.key, R.ADD, newcomer.name, 2, newcomer.pub)
    admin_room.apply(change, kdc)
    room = R.RoomSession.first_contact(newcomer.name, change, newcomer.pub, SUITE)
    room.set_kdc_key(change.epoch, kdc)
    return room, change


def _key_of(room: R.RoomSession) -> bytes:
    """The identity key the room's roster gives its own client (as its pairwise session shows it)."""
    return room.epochs[room.epoch].identity_of(room.me)


def _give_keys(sender_room: R.RoomSession, *receivers: R.RoomSession) -> None:
    content, missing = sender_room.distribution()
    for room in receivers:
        assert room.me in missing
        assert room.receive_distribution(sender_room.me, content, _key_of(sender_room)) == "ok"
    sender_room.mark_sent([r.me for r in receivers])


@pytest.fixture
def team(people):
    """alice (admin), bob and carol in #team at epoch 3, each with the others' sender keys."""
    a, _ = _create(people["alice"])
    b, ch_b = _join(a, people["alice"], people["bob"], cu.random_bytes(32))
    kdc3 = cu.random_bytes(32)
    c, ch_c = _join(a, people["alice"], people["carol"], kdc3)
    b.apply(ch_c, kdc3)
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
        b.open("alice", bytes(payload), now=NOW)  # carol's message relabelled as alice's
    payload[-1] ^= 1
    with pytest.raises(DecryptionFailed, match="not signed"):
        b.open("carol", bytes(payload), now=NOW)


def test_a_removed_member_cannot_read_what_follows_even_keeping_every_key(team, people):
    a, b, c = team
    kept = R.RoomSession.from_dict("carol", c.to_dict())  # carol keeps everything (a bad client)
    removal = a.next_change(people["alice"].key, R.REMOVE, "carol", 3)
    kdc4 = cu.random_bytes(32)
    a.apply(removal, kdc4)
    assert b.apply(removal, kdc4).text == "alice removed carol from #team."
    applied = c.apply(removal)
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
    b.apply(ch, a.epochs[ch.epoch].kdc_key)
    _give_keys(a, b, d)
    with pytest.raises(DecryptionFailed):
        d.open("alice", before, now=NOW)
    assert not any_key_opens(d, "alice", before)
    assert d.open("alice", a.seal("welcome", e2e.new_msg_id(), NOW), now=NOW).text == "welcome"


def test_a_forged_add_is_refused_and_changes_nothing(team, people):
    a, b, _c = team
    mallory = people["mallory"]
    forged = R.make_change(
        mallory.key,
        action=R.ADD,
        uid=b.uid,
        room="#team",
        epoch=b.epoch + 1,
        at_ms=5,
        prev_head=b.head,
        actor="alice",
        target="mallory",
        admin="alice",
        roster=[*b.roster, ("mallory", mallory.pub)],
    )
    before = b.to_dict()
    with pytest.raises(ChangeRefused, match="forged"):
        b.apply(forged)  # whatever key the server claims, the admin's pinned key decides
    assert b.to_dict() == before
    # Nor may a member add anyone, even signing correctly with their own key.
    by_bob = R.make_change(
        people["bob"].key,
        action=R.ADD,
        uid=b.uid,
        room="#team",
        epoch=b.epoch + 1,
        at_ms=5,
        prev_head=b.head,
        actor="bob",
        target="mallory",
        admin="alice",
        roster=[*b.roster, ("mallory", mallory.pub)],
    )
    with pytest.raises(ChangeRefused, match="Only the admin"):
        b.apply(by_bob)


def test_changes_must_follow_in_order_without_gaps_or_forks(team, people):
    a, b, _c = team
    alice = people["alice"]
    first = a.next_change(alice.key, R.ADD, "dave", 1, people["dave"].pub)
    a.apply(first, b"k" * 32)
    second = a.next_change(alice.key, R.REMOVE, "dave", 2)
    with pytest.raises(ChangeRefused, match="withheld"):
        b.apply(second)
    b.apply(first)
    assert b.apply(first) is None  # a redelivery: nothing new
    fork = R.make_change(
        alice.key,
        action=R.ADD,
        uid=b.uid,
        room="#team",
        epoch=first.epoch,
        at_ms=9,
        prev_head=first.prev_head,
        actor="alice",
        target="mallory",
        admin="alice",
        roster=[*a.epochs[first.epoch - 1].roster, ("mallory", people["mallory"].pub)],
    )
    with pytest.raises(ChangeRefused, match="different histories"):
        b.apply(fork)
    wrong_list = R.make_change(
        alice.key,
        action=R.REMOVE,
        uid=b.uid,
        room="#team",
        epoch=b.epoch + 1,
        at_ms=9,
        prev_head=b.head,
        actor="alice",
        target="dave",
        admin="alice",
        roster=[e for e in b.roster if e[0] in ("alice", "bob")],
    )
    with pytest.raises(ChangeRefused, match="does not follow"):
        b.apply(wrong_list)
    swapped = R.make_change(
        alice.key,
        action=R.REMOVE,
        uid=b.uid,
        room="#team",
        epoch=b.epoch + 1,
        at_ms=9,
        prev_head=b.head,
        actor="alice",
        target="dave",
        admin="alice",
        roster=[(m, people["mallory"].pub if m == "carol" else k) for m, k in b.roster if m != "dave"],
    )
    with pytest.raises(ChangeRefused, match="does not follow"):
        b.apply(swapped)  # the admin cannot quietly give a member another key either
    off_chain = R.make_change(
        alice.key,
        action=R.REMOVE,
        uid=b.uid,
        room="#team",
        epoch=b.epoch + 1,
        at_ms=9,
        prev_head=first.prev_head,
        actor="alice",
        target="dave",
        admin="alice",
        roster=[e for e in b.roster if e[0] != "dave"],
    )
    with pytest.raises(ChangeRefused, match="does not follow the last one"):
        b.apply(off_chain)


def test_a_change_from_another_room_is_refused(team, people):
    a, b, _c = team
    other, _ = _create(people["alice"], "#team")  # same name, another uid (a room made again)
    replayed = other.next_change(people["alice"].key, R.ADD, "mallory", 1, people["mallory"].pub)
    with pytest.raises(ChangeRefused, match="another room"):
        b.apply(replayed)


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
    forged = R.make_change(
        people["mallory"].key,
        action=R.LEAVE,
        uid=c.uid,
        room="#team",
        epoch=c.epoch + 1,
        at_ms=3,
        prev_head=c.head,
        actor="bob",
        target="bob",
        admin="alice",
        roster=[e for e in c.roster if e[0] != "bob"],
    )
    with pytest.raises(ChangeRefused, match="not signed"):
        c.apply(forged)  # checked with the key the roster gives bob, whatever the server says
    assert c.apply(leave).text == "bob left #team."
    with pytest.raises(ChangeRefused):
        a.next_change(people["alice"].key, R.LEAVE, "alice", 4)
    a.apply(leave)
    close = a.next_change(people["alice"].key, R.CLOSE, "", 4)
    applied = c.apply(close)
    assert applied.me_gone and applied.text == "alice closed #team."


def test_sender_keys_for_a_future_epoch_wait_and_stale_or_foreign_ones_are_refused(team, people):
    a, b, c = team
    alice = people["alice"]
    add = a.next_change(alice.key, R.ADD, "dave", 1, people["dave"].pub)
    a.apply(add, b"k" * 32)
    content, _missing = a.distribution()
    assert b.receive_distribution("alice", content, people["alice"].pub) == "later"
    b.apply(add, b"k" * 32)
    assert [p[0] for p in b.take_pending()] == ["alice"]
    with pytest.raises(ChangeRefused, match="not a member"):
        b.receive_distribution("mallory", content, people["mallory"].pub)


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
    again = R.RoomSession.from_dict("alice", a.to_dict())  # the sender's own key is not kept at rest
    assert again.own_key().key_id != first.key_id and again.own_key().chain.key != first.chain.key
    add = a.next_change(people["alice"].key, R.ADD, "dave", 1, people["dave"].pub)
    a.apply(add, b"k" * 32)
    assert a.own_key().key_id != first.key_id


def test_malformed_changes_and_messages_are_refused_cleanly(team):
    a, b, _c = team
    for junk in (b"", b"\x01" * 10, bytes(200)):
        with pytest.raises(ChangeRefused):
            R.parse_change(junk)
    for junk in (b"", b"\x10" + bytes(80), bytes(200)):
        with pytest.raises(DecryptionFailed):
            b.open("alice", junk, now=time.time())


def test_the_server_cannot_forge_this_clients_own_leave(team, people):
    a, b, c = team
    forged = R.make_change(
        people["mallory"].key,
        action=R.LEAVE,
        uid=b.uid,
        room="#team",
        epoch=b.epoch + 1,
        at_ms=3,
        prev_head=b.head,
        actor="bob",
        target="bob",
        admin="alice",
        roster=[e for e in b.roster if e[0] != "bob"],
    )
    with pytest.raises(ChangeRefused, match="not signed"):
        b.apply(forged)
    assert "bob" in b.members


def test_a_first_contact_must_name_this_clients_own_key_and_another_admin(people):
    alice, bob, mallory = people["alice"], people["bob"], people["mallory"]
    a, _ = _create(alice)
    add = a.next_change(alice.key, R.ADD, "bob", 2, mallory.pub)  # the admin vouched another key as bob
    with pytest.raises(ChangeRefused, match="someone else's key"):
        R.RoomSession.first_contact("bob", add, bob.pub, SUITE)
    # The server invents a room "administered" by bob himself, signed with its own key.
    fake = R.make_change(
        mallory.key,
        action=R.ADD,
        uid=cu.random_bytes(16),
        room="#ops",
        epoch=2,
        at_ms=1,
        prev_head=R.ZERO_HEAD,
        actor="bob",
        target="bob",
        admin="bob",
        roster=[("bob", bob.pub), ("eve", mallory.pub)],
    )
    with pytest.raises(ChangeRefused):
        R.RoomSession.first_contact("bob", fake, bob.pub, SUITE)
    create = R.make_change(
        mallory.key,
        action=R.CREATE,
        uid=cu.random_bytes(16),
        room="#ops",
        epoch=1,
        at_ms=1,
        prev_head=R.ZERO_HEAD,
        actor="bob",
        target="",
        admin="bob",
        roster=[("bob", bob.pub)],
    )
    with pytest.raises(ChangeRefused, match="not signed"):
        R.RoomSession.first_contact("bob", create, bob.pub, SUITE)


def test_an_old_add_replayed_after_a_removal_is_refused(team, people):
    a, b, c = team
    alice, carol = people["alice"], people["carol"]
    joined = [ch for ch in (a.epochs[e] for e in sorted(a.epochs))]  # carol joined at epoch 3
    assert joined[-1].members == ("alice", "bob", "carol")
    old_add_epoch = c.epoch
    removal = a.next_change(alice.key, R.REMOVE, "carol", 4)
    a.apply(removal, cu.random_bytes(32))
    assert c.apply(removal).me_gone
    # carol's client records where its membership ended; the server replays the add of epoch 3.
    replay = R.make_change(
        alice.key,
        action=R.ADD,
        uid=a.uid,
        room="#team",
        epoch=old_add_epoch,
        at_ms=2,
        prev_head=a.epochs[old_add_epoch - 1].head,
        actor="alice",
        target="carol",
        admin="alice",
        roster=a.epochs[old_add_epoch].roster,
    )
    with pytest.raises(ChangeRefused, match="replayed"):
        R.RoomSession.first_contact("carol", replay, carol.pub, SUITE, left_at=removal.epoch)
    again = a.next_change(alice.key, R.ADD, "carol", 5, carol.pub)  # a real new add is newer: it joins
    a.apply(again, cu.random_bytes(32))
    assert (
        R.RoomSession.first_contact("carol", again, carol.pub, SUITE, left_at=removal.epoch).epoch
        == again.epoch
    )


def test_a_removed_member_cannot_post_into_an_earlier_epoch(team, people):
    a, b, c = team
    alice = people["alice"]
    early = c.seal("before I went", e2e.new_msg_id(), NOW - 60)
    removal = a.next_change(alice.key, R.REMOVE, "carol", int(NOW * 1000))
    kdc = cu.random_bytes(32)
    a.apply(removal, kdc)
    b.apply(removal, kdc)
    assert b.open("carol", early, now=NOW).text == "before I went"  # sent before: still shown
    late = c.seal("after I went", e2e.new_msg_id(), NOW + R.e2e.FRESHNESS_WINDOW_S + 5)
    with pytest.raises(DecryptionFailed, match="no longer in"):
        b.open("carol", late, now=NOW + R.e2e.FRESHNESS_WINDOW_S + 5)
    c2 = R.RoomSession.from_dict("carol", c.to_dict())
    c2.own = None
    content, _ = c2.distribution()  # a brand-new key of the old epoch, from carol
    with pytest.raises(ChangeRefused, match="no longer in"):
        b.receive_distribution("carol", content, people["carol"].pub)


def test_a_second_copy_of_a_sender_key_does_not_rewind_its_chain(team, people):
    a, b, _c = team
    content, _ = a.distribution()
    first = a.seal("pay bob 100", e2e.new_msg_id(), NOW)
    assert b.open("alice", first, now=NOW).text == "pay bob 100"
    assert b.receive_distribution("alice", content, people["alice"].pub) == "known"
    with pytest.raises(DecryptionFailed, match="replayed"):
        b.open("alice", first, now=NOW)


def test_sender_keys_are_taken_only_from_the_key_the_admin_vouched_for(team, people):
    a, b, _c = team
    a.own = None
    content, _ = a.distribution()
    with pytest.raises(ChangeRefused, match="other than the one"):
        b.receive_distribution("alice", content, people["mallory"].pub)
    with pytest.raises(ChangeRefused, match="other than the one"):
        b.receive_distribution("alice", content, None)


def test_early_sender_keys_are_bounded_per_sender_and_in_how_far_ahead(team, people):
    a, b, _c = team
    alice = people["alice"]
    for n in range(1, 6):  # a future epoch's key, five times from one member: two are kept
        probe = R.RoomSession.from_dict("alice", a.to_dict())
        probe.epoch += 1
        probe.epochs[probe.epoch] = probe.epochs[a.epoch]
        content, _ = probe.distribution()
        assert b.receive_distribution("alice", content, alice.pub) == "later"
    assert len(b.pending) == R.MAX_PENDING_PER_SENDER
    far = R.RoomSession.from_dict("alice", a.to_dict())
    far.epoch += 100
    far.epochs[far.epoch] = far.epochs[a.epoch]
    content, _ = far.distribution()
    with pytest.raises(ChangeRefused):
        b.receive_distribution("alice", content, alice.pub)


def test_random_bytes_never_escape_as_anything_but_a_refusal(team):
    """Whatever the server sends (a change, a sender key, a message), the sans-IO core answers with
    ChangeRefused or DecryptionFailed and changes nothing."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    a, b, _c = team
    before = b.to_dict()
    content, _ = a.distribution()
    message = a.seal("x", e2e.new_msg_id(), NOW)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.binary(max_size=400), st.integers(0, 400), st.integers(0, 255))
    def run(junk, at, flip):
        for blob in (junk, _flip(content, at, flip), _flip(message, at, flip)):
            try:
                b.apply(R.parse_change(blob))
            except ChangeRefused:
                pass
            try:
                b.receive_distribution("alice", blob, b"\x00" * 32)
            except ChangeRefused:
                pass
            try:
                b.open("alice", blob, now=NOW)
            except DecryptionFailed:
                pass

    run()
    assert b.to_dict() == before


def _flip(data: bytes, at: int, value: int) -> bytes:
    if not data:
        return data
    i = at % len(data)
    return data[:i] + bytes([data[i] ^ (value or 1)]) + data[i + 1 :]
