"""Store and forward end to end (prekeys.py, docs/PROTOCOL.md section 15), sans-IO."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import crypto_utils as cu
from secureim.e2e import prekeys as K
from secureim.e2e import sessions as e2e
from secureim.errors import DecryptionFailed

SUITE = cu.get_suite("aes256")
CID, GEN = 7, 3


class Bob:
    """A recipient with its prekey store; ``server`` is what the server would hold of the bundle."""

    def __init__(self, home, password="bob password", identity=None):
        self.identity = identity or Ed25519PrivateKey.generate()
        self.home, self.password = home, password
        self.store = K.PrekeyStore(home, "bob", "srv", password)
        signed, one_time, _replace = self.store.plan_publish(self.identity, 0, 0)
        self.server_signed = signed
        self.server_one_time = [
            one_time[i : i + K.ONE_TIME.size] for i in range(0, len(one_time), K.ONE_TIME.size)
        ]
        self.inbound = K.InboundSessions(self.store)

    def take(self, *, one_time=True) -> tuple[bytes, bytes]:
        return self.server_signed, (self.server_one_time.pop(0) if one_time and self.server_one_time else b"")

    def ctx(self, alice_identity, kdc_key, generation=GEN):
        return K.StoredContext(
            "bob", self.identity, "alice", cu.public_bytes(alice_identity), CID, generation, kdc_key, SUITE
        )


def alice_to(bob: Bob, *, one_time=True, kdc_key=None, identity=None):
    identity = identity or Ed25519PrivateKey.generate()
    kdc_key = kdc_key or SUITE.generate_key()
    signed, otk = bob.take(one_time=one_time)
    bundle = K.verify_bundle("bob", cu.public_bytes(bob.identity), signed, otk)
    out = K.OutboundSession(
        "alice", identity, "bob", cu.public_bytes(bob.identity), CID, GEN, kdc_key, SUITE, bundle
    )
    return out, identity, kdc_key


def text(out: K.OutboundSession, words: str) -> bytes:
    return out.seal(e2e.BODY_TEXT, e2e.new_msg_id(), words.encode())


def test_three_stored_messages_open_in_order_and_a_receipt_names_them(tmp_path):
    bob = Bob(tmp_path)
    out, alice, kdc = alice_to(bob)
    payloads = [text(out, f"m{i}") for i in range(3)]
    opened = [bob.inbound.open(bob.ctx(alice, kdc), p) for p in payloads]
    assert [o.text for o in opened] == ["m0", "m1", "m2"]
    receipt = e2e.receipt_content(o.msg_id for o in opened)
    assert len(receipt) == 48


def test_a_one_time_prekey_is_used_once_and_a_replay_is_refused(tmp_path):
    bob = Bob(tmp_path)
    out, alice, kdc = alice_to(bob)
    first = text(out, "hello")
    before = len(bob.store.one_time)
    assert bob.inbound.open(bob.ctx(alice, kdc), first).text == "hello"
    assert len(bob.store.one_time) == before - 1
    with pytest.raises(DecryptionFailed, match="replayed"):
        bob.inbound.open(bob.ctx(alice, kdc), first)  # the chain moved on
    restarted = K.PrekeyStore(tmp_path, "bob", "srv", "bob password")
    with pytest.raises(DecryptionFailed, match="replayed"):
        K.InboundSessions(restarted).open(bob.ctx(alice, kdc), first)  # a restarted client: the same
    restarted.inbound.clear()  # even with the session itself forgotten
    with pytest.raises(DecryptionFailed, match="one-time prekey that was already used"):
        K.InboundSessions(restarted).open(bob.ctx(alice, kdc), first)


def test_a_later_message_of_a_session_opens_after_the_recipient_restarts(tmp_path):
    bob = Bob(tmp_path)
    out, alice, kdc = alice_to(bob)
    first, second, third = text(out, "one"), text(out, "two"), text(out, "three")
    assert bob.inbound.open(bob.ctx(alice, kdc), first).text == "one"
    restarted = K.InboundSessions(K.PrekeyStore(tmp_path, "bob", "srv", "bob password"))
    assert restarted.open(bob.ctx(alice, kdc), third).text == "three"  # skipped "two": its key is kept
    again = K.InboundSessions(K.PrekeyStore(tmp_path, "bob", "srv", "bob password"))
    assert again.open(bob.ctx(alice, kdc), second).text == "two"


def test_the_signed_prekey_alone_works_when_one_time_prekeys_are_exhausted_and_is_not_replayable(tmp_path):
    bob = Bob(tmp_path)
    bob.server_one_time.clear()  # the server has none left
    out, alice, kdc = alice_to(bob)
    first = text(out, "fallback")
    assert first[9:13] == b"\0\0\0\0"  # one-time prekey id 0: none used
    assert bob.inbound.open(bob.ctx(alice, kdc), first).text == "fallback"
    store = K.PrekeyStore(tmp_path, "bob", "srv", "bob password")
    store.inbound.clear()  # a restarted client that forgot the session
    with pytest.raises(DecryptionFailed, match="replayed"):
        K.InboundSessions(store).open(bob.ctx(alice, kdc), first)


def test_stored_messages_may_be_old_but_not_from_the_future(tmp_path):
    bob = Bob(tmp_path)
    out, alice, kdc = alice_to(bob)
    now = bob.inbound._clock()
    for age in (3600, 44 * 86400):
        out._clock = lambda a=age: now - a
        assert bob.inbound.open(bob.ctx(alice, kdc), text(out, f"{age} s old")).text == f"{age} s old"
    out._clock = lambda: now + 3600
    with pytest.raises(DecryptionFailed, match="too old"):
        bob.inbound.open(bob.ctx(alice, kdc), text(out, "from the future"))


def test_a_new_prekey_store_never_reuses_an_id(tmp_path):
    first = Bob(tmp_path / "a")
    again = Bob(tmp_path / "b", identity=first.identity)  # a lost store made again

    def ids(b):
        return {K.SIGNED.unpack(b.server_signed)[0]} | {K.ONE_TIME.unpack(e)[0] for e in b.server_one_time}

    assert not ids(first) & ids(again)


def test_the_prekey_store_moves_to_a_new_password(tmp_path):
    bob = Bob(tmp_path)
    keys = dict(bob.store.one_time)
    bob.store.change_password("a new password")
    assert K.PrekeyStore(tmp_path, "bob", "srv", "a new password").one_time == keys
    assert K.PrekeyStore(tmp_path, "bob", "srv", "bob password").created


def test_one_time_prekeys_handed_out_and_never_used_do_not_stop_the_top_up(tmp_path):
    identity = Ed25519PrivateKey.generate()
    store = K.PrekeyStore(tmp_path, "bob", "srv", "pw")
    spk = K.SIGNED.unpack(store.plan_publish(identity, 0, 0)[0])[0]
    for _ in range(20):  # every bundle taken, no message ever sent
        plan = store.plan_publish(identity, 0, spk)
        assert plan is not None and len(plan[1]) == K.ONE_TIME_TARGET * K.ONE_TIME.size
    assert len(store.one_time) == K.MAX_ONE_TIME_KEPT


def _server_tries(payload: bytes, kdc: bytes, alice, bob) -> list[str]:
    """Every root the server can compute from what it holds (the KDC key, the public bundle, the
    header, the identities, zero or public values standing in for the DH and ML-KEM secrets),
    tried on the payload; returns what opened."""
    header = payload[: K.INIT.size]
    signed = bob.server_signed
    spk_x, spk_ek = signed[4:36], signed[36 : 36 + 1184]
    publics = [spk_x, header[17:49], bytes(32)]
    candidates = (
        [[], [bytes(32)], [bytes(32)] * 2, [bytes(32)] * 3]
        + [[p] for p in publics]
        + [[a, b] for a in publics for b in publics]
        + [[spk_ek[:32]]]
    )
    ids = (cu.public_bytes(alice), cu.public_bytes(bob.identity))
    opened = []
    for secrets in candidates:
        root = K._root(kdc, secrets, CID, GEN, "alice", "bob", ids, header)
        chain = e2e.Chain(K._chain_key(root, "alice", "bob"))
        _n, message_key = chain.step()
        try:
            opened.append(
                K._cipher(SUITE, message_key)
                .open(payload[K.INIT.size + 8 :], K._aad(CID, "alice", "bob", header, 0))
                .decode("latin-1")
            )
        except DecryptionFailed:
            pass
    return opened


def test_the_server_alone_cannot_open_a_stored_message(tmp_path):
    """Everything the server has (the KDC key, the public bundle, the stored bytes, the
    identities) without Bob's private prekeys: no derivation it can make opens the message,
    and a "recipient" with a prekey store of its own gets nowhere either."""
    bob = Bob(tmp_path / "bob")
    out, alice, kdc = alice_to(bob)
    payload = text(out, "secret")
    assert b"secret" not in payload
    assert _server_tries(payload, kdc, alice, bob) == []
    mallory = Bob(tmp_path / "mallory", identity=bob.identity)
    with pytest.raises(DecryptionFailed):
        mallory.inbound.open(mallory.ctx(alice, kdc), payload)


def test_the_kdc_key_is_an_input_too(tmp_path):
    bob = Bob(tmp_path)
    out, alice, _kdc = alice_to(bob)
    with pytest.raises(DecryptionFailed, match="integrity"):
        bob.inbound.open(bob.ctx(alice, SUITE.generate_key()), text(out, "x"))


def test_a_forged_init_is_refused_before_any_key_is_spent(tmp_path):
    bob = Bob(tmp_path)
    mallory = Ed25519PrivateKey.generate()
    out, _alice, kdc = alice_to(bob, identity=mallory)  # signed by someone else than the pinned alice
    left = len(bob.store.one_time)
    with pytest.raises(DecryptionFailed, match="not signed by alice"):
        bob.inbound.open(bob.ctx(Ed25519PrivateKey.generate(), kdc), text(out, "i am alice"))
    assert len(bob.store.one_time) == left


def test_a_tampered_bundle_is_refused_by_the_sender(tmp_path):
    bob = Bob(tmp_path)
    signed, otk = bob.take()
    forged = signed[:4] + bytes(32) + signed[36:]
    with pytest.raises(K.BundleRejected, match="not signed"):
        K.verify_bundle("bob", cu.public_bytes(bob.identity), forged, otk)
    with pytest.raises(K.BundleRejected, match="one-time prekey is not signed"):
        K.verify_bundle("bob", cu.public_bytes(bob.identity), signed, otk[:4] + bytes(32) + otk[36:])
    with pytest.raises(K.BundleRejected, match="malformed"):
        K.verify_bundle("bob", cu.public_bytes(bob.identity), signed[:-1], otk)


def test_the_prekey_store_is_sealed_and_needs_the_password(tmp_path):
    bob = Bob(tmp_path)
    doc = json.loads(bob.store.path.read_text())
    assert set(doc) >= {"salt", "nonce", "sealed"} and "one_time" not in doc
    raw = bob.store.path.read_bytes()
    for key in bob.store.one_time.values():
        assert cu.b64encode(key).encode() not in raw
    assert oct(bob.store.path.stat().st_mode & 0o777) == "0o600"
    wrong = K.PrekeyStore(tmp_path, "bob", "srv", "another password")
    assert wrong.created and not wrong.one_time


def test_publishing_tops_up_and_rotates_the_signed_prekey(tmp_path):
    now = [1_000_000.0]
    identity = Ed25519PrivateKey.generate()
    store = K.PrekeyStore(tmp_path, "bob", "srv", "pw", clock=lambda: now[0])
    signed, one_time, replace = store.plan_publish(identity, 0, 0)
    assert replace and len(one_time) == K.ONE_TIME_TARGET * K.ONE_TIME.size
    spk_id = K.SIGNED.unpack(signed)[0]
    assert store.plan_publish(identity, K.ONE_TIME_TARGET, spk_id) is None  # nothing due
    top = store.plan_publish(identity, K.ONE_TIME_LOW - 1, spk_id)
    assert (
        top is not None
        and top[0] == b""
        and len(top[1]) // K.ONE_TIME.size == K.ONE_TIME_TARGET - K.ONE_TIME_LOW + 1
    )
    now[0] += K.SIGNED_PREKEY_LIFETIME_S + 1
    rotated = store.plan_publish(identity, K.ONE_TIME_TARGET, spk_id)
    assert rotated is not None and K.SIGNED.unpack(rotated[0])[0] != spk_id
    assert any(s.id == spk_id and s.retired for s in store.signed)  # the old one still opens stored messages


def test_stored_messages_too_old_are_refused(tmp_path):
    bob = Bob(tmp_path)
    out, alice, kdc = alice_to(bob)
    out._clock = lambda: 0.0  # sent in 1970
    with pytest.raises(DecryptionFailed, match="too old"):
        bob.inbound.open(bob.ctx(alice, kdc), text(out, "ancient"))


def test_random_and_mutated_stored_payloads_are_only_ever_refused(tmp_path):
    import random

    bob = Bob(tmp_path)
    out, alice, kdc = alice_to(bob)
    good = text(out, "the real one")
    rng = random.Random(12)
    before = (dict(bob.store.one_time), dict(bob.store.inbound))
    for i in range(300):  # bounded: truncations, bit flips, random bytes
        if i % 3 == 0:
            payload = good[: rng.randrange(len(good))]
        elif i % 3 == 1:
            flip = bytearray(good)
            flip[rng.randrange(len(flip))] ^= 1 << rng.randrange(8)
            payload = bytes(flip)
        else:
            payload = bytes([K.KIND_INIT]) + rng.randbytes(rng.randrange(2000))
        with pytest.raises(DecryptionFailed):
            bob.inbound.open(bob.ctx(alice, kdc), payload)
    assert (dict(bob.store.one_time), dict(bob.store.inbound)) == before  # nothing spent by what failed
    assert bob.inbound.open(bob.ctx(alice, kdc), good).text == "the real one"
