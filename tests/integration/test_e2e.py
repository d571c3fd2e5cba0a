"""End-to-end layer: identities at rest, peer pinning, safety numbers, signed shares, the ratchet.

The last tests run a real server that turns curious (records everything it relays,
keeps every KDC key) or active (substitutes DH shares and identity keys).
"""

from __future__ import annotations

import copy
import json
import stat
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from server_fixtures import RecordingSuite, logged_in_client, running_server, wait_for

import crypto_utils as cu
from secureim import client as C
from secureim import proto as P
from secureim.e2e import sessions as e2e
from secureim.errors import DecryptionFailed, InvalidKey


# --- sans-IO pairs -----------------------------------------------------------------------
def _pair(suite="3des", clock=time.time, generation=1):
    ida, idb = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    s = cu.get_suite(suite)
    alice = e2e.E2ESession("alice", ida, "bob", cu.public_bytes(idb), 42, s, clock=clock)
    bob = e2e.E2ESession("bob", idb, "alice", cu.public_bytes(ida), 42, s, clock=clock)
    _rekey(alice, bob, generation, s.generate_key())
    return alice, bob


def _rekey(alice, bob, generation, kdc_key):
    share_a = alice.new_generation(generation, kdc_key)
    share_b = bob.new_generation(generation, kdc_key)
    _answer(alice, bob, share_a, share_b)


def _answer(alice, bob, share_a, share_b):
    """Each side answers the other's share with its ML-KEM reply; then both are ready."""
    reply_a, reply_b = alice.receive_share(share_b), bob.receive_share(share_a)
    assert alice.receive_share(reply_b) is None and bob.receive_share(reply_a) is None


@pytest.mark.parametrize("suite", cu.SUITE_NAMES)
def test_messages_flow_both_ways(suite):
    alice, bob = _pair(suite)
    assert bob.open(alice.seal("hello"))[0] == "hello"
    assert alice.open(bob.seal("hi ✓"))[0] == "hi ✓"


def _recording_message_keys(session):
    keys = []
    original = session._message_cipher

    def record(message_key):
        keys.append(message_key)
        return original(message_key)

    session._message_cipher = record
    return keys


def test_every_message_has_a_fresh_key():
    alice, bob = _pair()
    keys = _recording_message_keys(alice)
    for i in range(50):
        bob.open(alice.seal(f"m{i}"))
    assert len(set(keys)) == 50


def test_an_old_message_key_does_not_open_new_messages():
    alice, bob = _pair()
    keys = _recording_message_keys(alice)
    first = alice.seal("one")
    second = alice.seal("two")
    header = e2e.MESSAGE_HEADER.size
    cipher = e2e.E2ESession._message_cipher(alice, keys[0])
    with pytest.raises(DecryptionFailed):
        cipher.open(second[header:], alice._aad("alice", "bob", 1, 1))
    assert bob.open(first)[0] == "one" and bob.open(second)[0] == "two"


def test_stolen_state_does_not_open_earlier_messages():
    alice, bob = _pair()
    sent = [alice.seal(f"m{i}") for i in range(5)]
    for payload in sent:
        bob.open(payload)
    stolen = copy.deepcopy(bob)  # today's keys, stolen after the messages were read
    for payload in sent:
        with pytest.raises(DecryptionFailed, match="replayed"):
            stolen.open(payload)


def test_a_rekey_heals_a_stolen_state_even_with_the_kdc_key():
    alice, bob = _pair()
    stolen = copy.deepcopy(bob)
    kdc_key = cu.get_suite("3des").generate_key()
    share_a = alice.new_generation(2, kdc_key)
    share_b = bob.new_generation(2, kdc_key)
    reply_a, reply_b = alice.receive_share(share_b), bob.receive_share(share_a)
    alice.receive_share(reply_b)
    bob.receive_share(reply_a)
    later = alice.seal("after the rekey")
    assert bob.open(later)[0] == "after the rekey"
    # The thief has the old state *and* the new KDC key, but not a DH private key of the new step.
    stolen.new_generation(2, kdc_key)
    stolen.receive_share(share_a)
    with pytest.raises(e2e.ShareRejected):  # alice's reply answers bob's ML-KEM key, not the thief's
        stolen.receive_share(reply_a)
    with pytest.raises(DecryptionFailed):
        stolen.open(later)


def test_replayed_messages_are_refused():
    alice, bob = _pair()
    payload = alice.seal("once")
    bob.open(payload)
    with pytest.raises(DecryptionFailed, match="replayed"):
        bob.open(payload)


def test_too_old_and_future_messages_are_refused():
    now = time.time()
    alice, bob = _pair(clock=lambda: now)
    alice._clock = lambda: now - e2e.FRESHNESS_WINDOW_S - 5
    with pytest.raises(DecryptionFailed, match="too old"):
        bob.open(alice.seal("stale"))
    alice._clock = lambda: now + e2e.FRESHNESS_WINDOW_S + 5
    with pytest.raises(DecryptionFailed, match="too old"):
        bob.open(alice.seal("from the future"))
    alice._clock = lambda: now - 30  # within the window
    assert bob.open(alice.seal("fine"))[0] == "fine"


def test_out_of_order_within_the_bound_and_refused_beyond():
    alice, bob = _pair()
    msgs = [alice.seal(f"m{i}") for i in range(4)]
    assert [bob.open(m)[0] for m in (msgs[2], msgs[0], msgs[3], msgs[1])] == ["m2", "m0", "m3", "m1"]
    for _ in range(e2e.MAX_SKIP + 1):
        alice._generations[1].send.step()  # messages that never arrive
    with pytest.raises(DecryptionFailed, match="skipped more than"):
        bob.open(alice.seal("too far"))


def test_a_replayed_out_of_order_message_is_refused():
    """A skipped message's stored key opens it once, then is deleted: a replay is refused."""
    alice, bob = _pair()
    msgs = [alice.seal(f"m{i}") for i in range(3)]
    assert bob.open(msgs[2])[0] == "m2"  # m0 and m1 skipped: their keys are stored
    assert bob.open(msgs[0])[0] == "m0"
    with pytest.raises(DecryptionFailed, match="replayed"):
        bob.open(msgs[0])
    assert bob.open(msgs[1])[0] == "m1"
    for payload in msgs:
        with pytest.raises(DecryptionFailed, match="replayed"):
            bob.open(payload)


def test_a_tampered_message_consumes_nothing():
    alice, bob = _pair()
    payload = alice.seal("intact")
    bad = payload[:-1] + bytes([payload[-1] ^ 1])
    with pytest.raises(DecryptionFailed, match="integrity"):
        bob.open(bad)
    assert bob.open(payload)[0] == "intact"


def test_shares_must_be_signed_by_the_peer_for_this_conversation():
    ida, idb, mallory = (Ed25519PrivateKey.generate() for _ in range(3))
    s = cu.get_suite("aes256")
    key = s.generate_key()
    bob = e2e.E2ESession("bob", idb, "alice", cu.public_bytes(ida), 7, s)
    bob.new_generation(1, key)
    # signed by someone else
    forged = e2e.E2ESession("alice", mallory, "bob", cu.public_bytes(idb), 7, s).new_generation(1, key)
    with pytest.raises(e2e.ShareRejected, match="not signed"):
        bob.receive_share(forged)
    # signed by alice, but for another conversation
    other_conv = e2e.E2ESession("alice", ida, "bob", cu.public_bytes(idb), 8, s).new_generation(1, key)
    with pytest.raises(e2e.ShareRejected):
        bob.receive_share(other_conv)
    # alice's genuine share with the DH value swapped
    genuine = e2e.E2ESession("alice", ida, "bob", cu.public_bytes(idb), 7, s).new_generation(1, key)
    kind, gen, _share, ek, sig = e2e.SHARE.unpack(genuine)
    swapped = e2e.SHARE.pack(kind, gen, X25519PrivateKey.generate().public_key().public_bytes_raw(), ek, sig)
    with pytest.raises(e2e.ShareRejected):
        bob.receive_share(swapped)
    with pytest.raises(e2e.ShareRejected, match="malformed"):
        bob.receive_share(genuine[:-1])


def test_safety_numbers_equal_on_both_sides_and_differ_for_other_keys():
    a, b, c = (cu.public_bytes(Ed25519PrivateKey.generate()) for _ in range(3))
    n1 = e2e.safety_number("alice", a, "bob", b)
    assert n1 == e2e.safety_number("bob", b, "alice", a)
    assert len(n1.replace(" ", "")) == 30 and n1.replace(" ", "").isdigit()
    assert n1 != e2e.safety_number("alice", a, "bob", c)
    assert n1 != e2e.safety_number("alice", c, "bob", b)


# --- identities at rest and trust ---------------------------------------------------------
def test_identity_file_is_useless_without_the_password(tmp_path):
    store = e2e.IdentityStore(tmp_path, "127.0.0.1:5151")
    key = Ed25519PrivateKey.generate()
    store.save("alice", "the password", key)
    path = store.path("alice")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    raw = path.read_bytes()
    assert seed not in raw and cu.b64encode(seed).encode() not in raw
    assert json.loads(raw)["kdf"] == "scrypt"
    assert store.load("alice", "wrong password") is None
    copied = tmp_path / "elsewhere"
    copied.mkdir()
    (copied / "identities").mkdir()
    (copied / "identities" / path.name).write_bytes(raw)  # copying the directory is not enough
    assert e2e.IdentityStore(copied, "127.0.0.1:5151").load("alice", "guess") is None
    loaded = e2e.IdentityStore(copied, "127.0.0.1:5151").load("alice", "the password")
    assert cu.public_bytes(loaded) == cu.public_bytes(key)


def test_peer_trust_pins_refuses_changes_and_marks_verified(tmp_path):
    trust = e2e.PeerTrust(tmp_path, "alice", "h:1")
    k1, k2 = b"\x01" * 32, b"\x02" * 32
    assert trust.check("bob", k1) is False
    assert trust.check("bob", k1) is False
    with pytest.raises(e2e.IdentityChanged) as info:
        trust.check("bob", k2)
    assert cu.fingerprint(k1) in str(info.value) and cu.fingerprint(k2) in str(info.value)
    assert trust.mark_verified("bob") and trust.check("bob", k1) is True
    trust.accept("bob", k2)
    assert trust.check("bob", k2) is False  # an accepted new key starts unverified


# --- a curious and an active server ----------------------------------------------------------
def _spy_relay(server, rewrite=None):
    recorded = []
    original = server.service.conversations.relay

    def relay(session, msg):
        recorded.append(msg.payload)
        if rewrite is not None:
            msg = rewrite(session, msg)
        return original(session, msg)

    server.service.router.override(P.Relay, relay)
    return recorded


def _open_pair(server, tmp_path):
    alice = logged_in_client(server, tmp_path / "alice", "alice")
    bob = logged_in_client(server, tmp_path / "bob", "bob")
    alice.open_conversation("bob")
    return alice, bob


def _server_transcript(cid, generation, shares, replies, identities):
    """The e2e root's salt, computed (as the server can) from public values only: the
    conversation id, the generation, per user in name order their name, their relayed share
    (X25519 || ML-KEM encapsulation key) and the relayed ML-KEM ciphertext sent *to* them
    (the other user's reply), then both identity keys."""
    names = sorted(shares)
    sent_to = {n: replies[other] for n in names for other in names if other != n}
    return cu.sha256(
        b"secureim/v1 e2e root"
        + cid.to_bytes(8, "big")
        + generation.to_bytes(4, "big")
        + b"".join(bytes([len(n)]) + n.encode() + shares[n] + sent_to[n] for n in names)
        + b"".join(sorted(identities.values()))
    )


_ROOT_LABELS = ("e2e root x25519-mlkem768", "e2e root")


def _server_candidate_roots(kdc_keys, cid, generation, shares, replies, identities, secrets=None):
    """Every root key the server could derive from what it holds: every KDC key it made, the
    relayed shares (X25519 publics, ML-KEM encapsulation keys), the relayed ML-KEM ciphertexts,
    the identity keys, names and ids; under the real transcript or no salt, the current or the
    pre-hybrid label; and the raw material itself taken as a root.

    ``shares`` maps each user to their relayed X25519 || encapsulation key, ``replies`` each
    user to the ML-KEM ciphertext they sent.  The server lacks three secrets (the X25519
    output and the two ML-KEM secrets); in their place it tries what it can compute.  The
    control test passes the real ones as ``secrets`` = (dh, {user: ML-KEM secret encapsulated
    to that user}) to show the candidates then include the clients' root exactly."""
    transcript = _server_transcript(cid, generation, shares, replies, identities)
    names = sorted(shares)
    publics = [shares[n] for n in names]
    xs, eks = [p[:32] for p in publics], [p[32:] for p in publics]
    cts = [replies[n] for n in names]
    ids = sorted(identities.values())
    dh_guesses = [bytes(32), *xs]
    kem_guesses = [[bytes(32), *(cu.sha256(c) for c in cts), *(cu.sha256(e) for e in eks)] for _n in names]
    if secrets is not None:
        dh, kem_secrets = secrets
        if dh is not None:
            dh_guesses.append(dh)
        for guesses, n in zip(kem_guesses, names):
            if n in kem_secrets:
                guesses.append(kem_secrets[n])
    hybrids = [d + a + b for d in dh_guesses for a in kem_guesses[0] for b in kem_guesses[1]]
    ikms = [
        transcript,
        b"".join(publics),
        b"".join(reversed(publics)),
        b"".join(cts),
        b"".join(ids),
        bytes(32),
    ]
    for k in kdc_keys:
        ikms += [
            k,
            k + transcript,
            k + b"".join(publics),
            k + b"".join(reversed(publics)),
            k + b"".join(cts),
            k + b"".join(ids),
            *(k + p for p in publics),
            *(k + d for d in dh_guesses),
            *(k + h for h in hybrids),
        ]
    for ikm in ikms:
        for label in _ROOT_LABELS:
            for salt in (transcript, None):
                yield cu.hkdf(ikm, salt=salt, info=cu.label(label), length=32)
        yield ikm[:32].ljust(32, b"\0")


def _opened_by_any_root(roots, payload, sender, recipient, cid, suite):
    """Text if one of ``roots`` opens the relayed message ``payload`` (else None)."""
    _kind, generation, counter = e2e.MESSAGE_HEADER.unpack_from(payload)
    reader = e2e.E2ESession(recipient, Ed25519PrivateKey.generate(), sender, bytes(32), cid, suite)
    aad = reader._aad(sender, recipient, generation, counter)
    for root in roots:
        for chain_key in (
            cu.hkdf(root, salt=None, info=cu.label(f"chain {sender}>{recipient}"), length=32),
            root,
        ):
            chain = e2e.Chain(chain_key)
            for _ in range(counter + 1):
                _i, message_key = chain.step()
            try:
                body = reader._message_cipher(message_key).open(payload[e2e.MESSAGE_HEADER.size :], aad)
            except (DecryptionFailed, InvalidKey):
                continue
            return body[e2e.BODY_HEADER.size :].decode("utf-8", "replace")
    return None


def test_the_server_side_reconstruction_opens_messages_given_the_dh_secret():
    """Control for the curious-server test: its derivations mirror the clients' exactly, so
    with the secrets the server lacks (the X25519 output and both ML-KEM secrets) they open
    the message; without them, or with only some of them, not."""
    suite = cu.get_suite("3des")
    ida, idb = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    alice = e2e.E2ESession("alice", ida, "bob", cu.public_bytes(idb), 42, suite)
    bob = e2e.E2ESession("bob", idb, "alice", cu.public_bytes(ida), 42, suite)
    kdc_key = suite.generate_key()
    share_a, share_b = alice.new_generation(3, kdc_key), bob.new_generation(3, kdc_key)
    alice_private = alice._generations[3].my_private
    alice_kem, bob_kem = alice._generations[3].my_kem, bob._generations[3].my_kem
    reply_a, reply_b = alice.receive_share(share_b), bob.receive_share(share_a)
    assert alice.receive_share(reply_b) is None and bob.receive_share(reply_a) is None
    payload = [alice.seal(f"m{i}") for i in range(3)][2]
    shares = {
        user: b"".join(e2e.SHARE.unpack(share)[2:4]) for user, share in (("alice", share_a), ("bob", share_b))
    }
    replies = {"alice": e2e.KEM_REPLY.unpack(reply_a)[2], "bob": e2e.KEM_REPLY.unpack(reply_b)[2]}
    identities = {"alice": cu.public_bytes(ida), "bob": cu.public_bytes(idb)}
    dh = alice_private.exchange(X25519PublicKey.from_public_bytes(shares["bob"][:32]))
    kem_secrets = {
        "alice": alice_kem.decapsulate(replies["bob"]),
        "bob": bob_kem.decapsulate(replies["alice"]),
    }

    def opened(secrets):
        roots = _server_candidate_roots([kdc_key], 42, 3, shares, replies, identities, secrets)
        return _opened_by_any_root(roots, payload, "alice", "bob", 42, suite)

    assert opened(None) is None
    assert opened((dh, {})) is None  # X25519 alone
    assert opened((None, kem_secrets)) is None  # ML-KEM alone
    assert opened((dh, {"alice": kem_secrets["alice"]})) is None  # one ML-KEM secret short
    assert opened((dh, kem_secrets)) == "m2"


def test_curious_server_cannot_read_messages(tmp_path):
    """The server records everything it relays and keeps every KDC key, then computes every
    derivation it can reproduce (real transcript, real ids and names, relayed X25519 shares,
    ML-KEM encapsulation keys and ciphertexts, identity keys) and tries each on every message.
    None may open."""
    secrets_sent = [f"secret number {i}" for i in range(10)]
    relayed = []
    # A rekey itself takes 4 relays (2 shares, 2 ML-KEM replies): a limit of 6 keeps rekeys
    # from cascading (min_rekey_interval_s=0) while 10 messages still span several generations.
    with running_server(tmp_path / "srv", rekey_after_messages=6, min_rekey_interval_s=0) as server:
        kdc = server.service.suite = RecordingSuite(server.service.suite)
        original = server.service.conversations.relay

        def spy(session, msg):
            relayed.append((session.username, msg.conversation_id, msg.payload))
            return original(session, msg)

        server.service.router.override(P.Relay, spy)
        alice, bob = _open_pair(server, tmp_path)
        wait_for(alice, C.ConversationReady, peer="bob")
        wait_for(bob, C.ConversationReady, peer="alice")
        for text in secrets_sent:
            alice.send_message("bob", text)
            assert wait_for(bob, C.MessageReceived).text == text
        bob.send_message("alice", "a reply")
        assert wait_for(alice, C.MessageReceived).text == "a reply"
        alice.close()
        bob.close()
        identities = {u: server.storage.get_identity_key(u) for u in ("alice", "bob")}
    assert len(kdc.keys) >= 3  # several generations were keyed by the KDC
    everything = b"".join(p for _u, _c, p in relayed)
    for text in secrets_sent:
        assert text.encode() not in everything
    shares: dict[tuple[int, int], dict[str, bytes]] = {}
    replies: dict[tuple[int, int], dict[str, bytes]] = {}
    for sender, cid, payload in relayed:
        if payload[:1] == bytes([e2e.KIND_SHARE]):
            _kind, generation, x_public, encapsulation_key, _sig = e2e.SHARE.unpack(payload)
            shares.setdefault((cid, generation), {})[sender] = x_public + encapsulation_key
        elif payload[:1] == bytes([e2e.KIND_KEM_REPLY]):
            _kind, generation, ciphertext, _sig = e2e.KEM_REPLY.unpack(payload)
            replies.setdefault((cid, generation), {})[sender] = ciphertext
    messages = [(s, c, p) for s, c, p in relayed if p[:1] == bytes([e2e.KIND_MESSAGE])]
    assert len(messages) >= len(secrets_sent) + 1  # the texts, and the receipts that answer them
    suite = cu.get_suite("3des")
    for sender, cid, payload in messages:
        generation = e2e.MESSAGE_HEADER.unpack_from(payload)[1]
        gen_shares = shares[(cid, generation)]
        gen_replies = replies[(cid, generation)]
        assert set(gen_shares) == set(gen_replies) == {"alice", "bob"}  # it saw both shares and both replies
        recipient = "bob" if sender == "alice" else "alice"
        roots = _server_candidate_roots(kdc.keys, cid, generation, gen_shares, gen_replies, identities)
        assert _opened_by_any_root(roots, payload, sender, recipient, cid, suite) is None


def test_active_server_swapping_dh_shares_is_caught_by_both_clients(tmp_path):
    mallory = Ed25519PrivateKey.generate()

    def swap_shares(session, msg):
        if msg.payload[:1] != bytes([e2e.KIND_SHARE]):
            return msg
        _kind, generation, _share, _ek, _sig = e2e.SHARE.unpack(msg.payload)
        mine = X25519PrivateKey.generate().public_key().public_bytes_raw()
        ek = cu.MLKEM768KeyPair().encapsulation_key
        peer = "bob" if session.username == "alice" else "alice"
        sig = mallory.sign(
            e2e._share_transcript(msg.conversation_id, generation, session.username, peer, mine + ek)
        )
        return P.Relay(
            conversation_id=msg.conversation_id,
            payload=e2e.SHARE.pack(e2e.KIND_SHARE, generation, mine, ek, sig),
        )

    with running_server(tmp_path / "srv") as server:
        _spy_relay(server, rewrite=swap_shares)
        alice, bob = _open_pair(server, tmp_path)
        for client, peer in ((alice, "bob"), (bob, "alice")):
            warning = wait_for(client, C.SecurityWarning, peer=peer)
            assert "not signed" in warning.text and "refused" in warning.text
            assert not client.has_conversation(peer)
        with pytest.raises(Exception):
            alice.send_message("bob", "should not be sent")
        alice.close()
        bob.close()


class _IdentityProxy:
    """A session whose identity key the (malicious) server misreports to peers."""

    def __init__(self, session, fake_key):
        self._session, self.identity_key = session, fake_key

    def __getattr__(self, name):
        return getattr(self._session, name)


def test_active_server_substituting_identities_is_refused_after_pinning(tmp_path):
    with running_server(tmp_path / "srv") as server:
        alice, bob = _open_pair(server, tmp_path)  # first contact: honest, keys get pinned
        wait_for(alice, C.ConversationReady, peer="bob")
        wait_for(bob, C.ConversationReady, peer="alice")
        assert alice.safety_number("bob") == bob.safety_number("alice")
        alice.close()
        bob.close()

        # The server turns: it hands out its own identity key for both and re-signs shares.
        mallory = Ed25519PrivateKey.generate()
        fake = cu.public_bytes(mallory)
        registry = server.service.registry
        real_session_of = registry.session_of
        registry.session_of = lambda user: _IdentityProxy(s, fake) if (s := real_session_of(user)) else None
        alice = logged_in_client(server, tmp_path / "alice", "alice", register=False)
        bob = logged_in_client(server, tmp_path / "bob", "bob", register=False)
        alice.open_conversation("bob")
        for client, peer in ((alice, "bob"), (bob, "alice")):
            warning = wait_for(client, C.SecurityWarning, peer=peer)
            assert "identity key changed" in warning.text and cu.fingerprint(fake) in warning.text
            assert not client.has_conversation(peer)
        alice.close()
        bob.close()


def test_changed_identity_refused_until_accepted(tmp_path):
    with running_server(tmp_path / "srv") as server:
        alice, bob = _open_pair(server, tmp_path)
        wait_for(alice, C.ConversationReady, peer="bob")
        wait_for(bob, C.ConversationReady, peer="alice")
        before = alice.safety_number("bob")
        assert before == bob.safety_number("alice")
        bob.close()
        # bob logs in from a new machine: a new identity key
        bob = logged_in_client(server, tmp_path / "bob-laptop", "bob", register=False)
        warning = wait_for(alice, C.SecurityWarning, peer="bob")
        assert "/accept bob" in warning.text
        assert not alice.has_conversation("bob")
        # /verify shows the number for the key being presented, to compare before accepting
        presented = alice.safety_number("bob")
        assert presented != before
        assert alice.accept_identity("bob")
        wait_for(alice, C.ConversationReady, peer="bob")
        wait_for(bob, C.ConversationReady, peer="alice")
        assert alice.safety_number("bob") == bob.safety_number("alice") == presented
        alice.send_message("bob", "new laptop?")
        assert wait_for(bob, C.MessageReceived).text == "new laptop?"
        assert not alice.is_verified("bob")
        assert alice.mark_verified("bob") and alice.is_verified("bob")
        alice.close()
        bob.close()


def test_files_stay_inside_the_home_whatever_the_server_address(tmp_path):
    for server_id in ("../../etc:22", "/abs/path:1", "..:..", "a/b\\c:5"):
        store = e2e.IdentityStore(tmp_path, server_id)
        assert store.path("alice").parent == tmp_path / "identities"
        trust = e2e.PeerTrust(tmp_path, "alice", server_id)
        assert trust.path.parent == tmp_path / "known_peers"
        assert "/" not in trust.path.name and "/" not in store.path("alice").name
