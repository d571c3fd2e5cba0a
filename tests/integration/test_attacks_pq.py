"""Attack suite, post-quantum part (issue 18): the hybrid X25519 + ML-KEM-768 handshake and shares.

Each case names the attack and asserts the specific defence (docs/SECURITY.md, cases PQ01-PQ14):
downgrade to a classical group, malformed and wrong-size ML-KEM keys and ciphertexts in the
handshake and in the end-to-end shares, and "harvest now, decrypt later": a recording of a whole
session cannot be opened with the X25519 secrets alone, nor with the ML-KEM secrets alone.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import time

import pytest
from conftest import VECTORS
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from mitm import MitmProxy
from protocol_helpers import split_frames
from server_fixtures import logged_in_client, running_server, wait_for

import crypto_utils as cu
from diffiehellman import DEFAULT_GROUP, GROUPS, DiffieHellman
from secureim import client as C
from secureim import proto as P
from secureim.e2e import sessions as e2e
from secureim.errors import HandshakeFailed, MalformedMessage, RecordAuthenticationFailed, RemoteProtocolError

HYBRID = GROUPS["x25519-mlkem768"]


def _unreduced_encapsulation_key() -> bytes:
    """A 1,184-byte ML-KEM-768 key with a coefficient >= q (Wycheproof, CCTV/modulus)."""
    data = json.loads((VECTORS / "wycheproof" / "mlkem_768_encaps_test.json").read_text())
    return next(
        bytes.fromhex(t["ek"])
        for g in data["testGroups"]
        for t in g["tests"]
        if "ModulusOverflow" in t["flags"]
    )


def _replace(frame: bytes, **changes) -> bytes:
    return P.encode_frame(dataclasses.replace(P.decode_message(frame[4:]), **changes).encode())


def _on(direction_wanted: str, index_wanted: int, fn):
    def tamper(direction, index, frame):
        return fn(frame) if (direction, index) == (direction_wanted, index_wanted) else [frame]

    return tamper


def _raw_exchange(server, data: bytes) -> list:
    """Send ``data``, then every plaintext message the server answers until it closes."""
    s = socket.create_connection(server.server_address, timeout=10)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    decoder, out = P.FrameDecoder(), []
    while chunk := s.recv(65536):
        decoder.feed(chunk)
        while (body := decoder.next_frame()) is not None:
            out.append(P.decode_message(body))
    s.close()
    return out


def _pair(**server_kw):
    identity = Ed25519PrivateKey.generate()
    return P.ClientProtocol(), P.ServerProtocol(identity, **server_kw)


# =============================================================================
# Downgrade from the hybrid group to a classical one
# =============================================================================
def test_the_default_is_hybrid_and_offers_x25519_only_as_a_fallback():
    client, server = _pair()
    hello = P.decode_message(client.initiate()[4:])
    assert DEFAULT_GROUP == "x25519-mlkem768"
    assert hello.group == "x25519-mlkem768" and hello.groups == ("x25519-mlkem768", "x25519")
    assert len(hello.public) == HYBRID.byte_length == 1216
    server.receive_data(P.encode_frame(hello.encode()))
    events = client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    assert events[0].group == "x25519-mlkem768" and server.group == "x25519-mlkem768"


def test_PQ01_forged_group_retry_is_refused_by_the_server_as_a_downgrade():
    """An attacker answers the hybrid hello with a forged GroupRetry(x25519)."""
    client, server = _pair()
    client.initiate()  # the attacker swallows it
    client.receive_data(P.encode_frame(P.GroupRetry(group="x25519").encode()))
    second = client.data_to_send()
    assert P.decode_message(second[4:]).groups == ("x25519-mlkem768", "x25519")  # the list is unchanged
    with pytest.raises(RemoteProtocolError, match="Downgrade refused"):
        server.receive_data(second)
    assert server.group is None and not server.established
    with pytest.raises(HandshakeFailed, match="downgrade"):
        client.receive_data(server.data_to_send())
    assert not client.established


def test_PQ02_forged_retry_plus_a_stripped_group_list_breaks_the_signature():
    """The attacker also removes the hybrid group from the list: the server agrees, the client does not."""
    client, server = _pair()
    client.initiate()
    client.receive_data(P.encode_frame(P.GroupRetry(group="x25519").encode()))
    server.receive_data(_replace(client.data_to_send(), groups=("x25519",)))
    assert server.group == "x25519"  # the server was fooled ...
    with pytest.raises(HandshakeFailed, match="signature"):
        client.receive_data(server.data_to_send())  # ... but the signed transcript is not the client's
    assert not client.established


def test_PQ03_client_refuses_a_retry_for_a_group_it_did_not_offer_or_a_second_retry():
    client = P.ClientProtocol()
    client.initiate()
    with pytest.raises(HandshakeFailed, match="did not offer"):
        client.receive_data(P.encode_frame(P.GroupRetry(group="modp2048").encode()))
    client = P.ClientProtocol()
    client.initiate()
    client.receive_data(P.encode_frame(P.GroupRetry(group="x25519").encode()))
    with pytest.raises(HandshakeFailed, match="twice"):
        client.receive_data(P.encode_frame(P.GroupRetry(group="x25519-mlkem768").encode()))
    classical = P.ClientProtocol(group="x25519")  # chosen explicitly: nothing to fall back to
    hello = P.decode_message(classical.initiate()[4:])
    assert hello.groups == ("x25519",)


def test_PQ04_a_server_without_the_hybrid_group_retries_once_and_then_refuses():
    client, server = _pair(allowed_groups=frozenset({"x25519"}))
    server.receive_data(client.initiate())
    retry = server.data_to_send()
    assert P.decode_message(retry[4:]) == P.GroupRetry(group="x25519")
    client.receive_data(retry)
    server.receive_data(client.data_to_send())  # the honest fallback: x25519, signed list intact
    events = client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    assert events[0].group == "x25519" and server.established
    # A client that ignores the retry and sends the refused group again is refused.
    client, server = _pair(allowed_groups=frozenset({"x25519"}))
    hello = client.initiate()
    server.receive_data(hello)
    server.data_to_send()
    with pytest.raises(RemoteProtocolError, match="ignored the group retry"):
        server.receive_data(hello)


def test_PQ04_on_the_wire_the_fallback_is_one_retry_on_the_same_connection(tmp_path):
    with running_server(tmp_path / "srv", allowed_groups=frozenset({"x25519"})) as server:
        proxy = MitmProxy(server.server_address)
        client = C.ChatClient(*proxy.address, home=tmp_path / "a")
        client.connect()
        kinds = [P.decode_message(f[4:]) for d, f in proxy.recorded if d == "s2c"][:2]
        assert kinds[0] == P.GroupRetry(group="x25519") and isinstance(kinds[1], P.ServerHello)
        client.register("alice", "correct horse battery")
        assert client.username == "alice"
        client.close()
        proxy.close()


def test_PQ05_share_outside_the_offered_list_is_refused():
    client, server = _pair()
    with pytest.raises(RemoteProtocolError, match="did not offer"):
        server.receive_data(_replace(client.initiate(), groups=("x25519",)))
    assert P.decode_message(server.data_to_send()[4:]).code == P.HandshakeErrorCode.PROTOCOL


def test_PQ06_on_the_wire_a_classical_share_with_the_hybrid_list_is_a_downgrade(tmp_path):
    """A real server behind an attacker who rewrites the hello to an X25519 share."""
    forced = DiffieHellman("x25519").public_bytes
    with running_server(tmp_path / "srv") as server:
        proxy = MitmProxy(
            server.server_address, _on("c2s", 0, lambda f: [_replace(f, group="x25519", public=forced)])
        )
        client = C.ChatClient(*proxy.address, home=tmp_path / "victim")
        client.timeout_s = 3
        with pytest.raises(HandshakeFailed, match="downgrade"):
            client.connect()
        proxy.close()
        # Stripping the hybrid group from the list as well: the server answers in x25519, which
        # the client (still holding its hybrid share) refuses; a rewritten answer breaks the signature.
        proxy = MitmProxy(
            server.server_address,
            _on("c2s", 0, lambda f: [_replace(f, group="x25519", public=forced, groups=("x25519",))]),
        )
        client = C.ChatClient(*proxy.address, home=tmp_path / "victim2")
        client.timeout_s = 3
        with pytest.raises(RemoteProtocolError, match="exactly 1120 bytes"):
            client.connect()
        assert client.username is None
        proxy.close()
        logged_in_client(server, tmp_path / "ok", "bystander").close()  # the server is unharmed


# =============================================================================
# Malformed and wrong-size ML-KEM values in the handshake
# =============================================================================
@pytest.mark.parametrize("size", [0, 32, 1184, 1215])  # over 1,216: PQ08
def test_PQ07_wrong_size_hybrid_share_is_refused_before_any_work(monkeypatch, size):
    calls = []
    monkeypatch.setattr(DiffieHellman, "respond", classmethod(lambda *a: calls.append(a)))
    server = P.ServerProtocol(Ed25519PrivateKey.generate())
    with pytest.raises(RemoteProtocolError, match="exactly 1216 bytes"):
        server.receive_data(_replace(P.ClientProtocol().initiate(), public=bytes(size)))
    assert P.decode_message(server.data_to_send()[4:]) == P.HandshakeError(
        code=P.HandshakeErrorCode.BAD_PUBLIC_VALUE
    )
    assert calls == []  # no key work was done for a share of the wrong size


def test_PQ08_oversized_public_values_do_not_decode():
    hello = P.decode_message(P.ClientProtocol().initiate()[4:])
    body = bytearray(hello.encode())
    at = body.index(hello.public) - 2
    body[at : at + 2] = (P.MAX_PUBLIC_VALUE_BYTES + 1).to_bytes(2, "big")
    body[at + 2 : at + 2] = b"\0"
    with pytest.raises(MalformedMessage, match="public has a bad length"):
        P.decode_message(bytes(body))
    assert P.MAX_PUBLIC_VALUE_BYTES == 1216 and P.MAX_RESPONSE_VALUE_BYTES == 1120
    assert len(P.ClientProtocol().initiate()) < P.MAX_FRAME_BYTES // 40  # far below the 64 KiB frame limit


def test_PQ09_malformed_encapsulation_key_is_refused_with_a_clear_error(tmp_path):
    bad = _unreduced_encapsulation_key() + X25519PrivateKey.generate().public_key().public_bytes_raw()
    server = P.ServerProtocol(Ed25519PrivateKey.generate())
    with pytest.raises(RemoteProtocolError, match="not reduced modulo q"):
        server.receive_data(_replace(P.ClientProtocol().initiate(), public=bad))
    assert P.decode_message(server.data_to_send()[4:]).code == P.HandshakeErrorCode.BAD_PUBLIC_VALUE
    with running_server(tmp_path / "srv") as real:  # on the wire: a clear refusal, and the server lives
        hello = _replace(P.ClientProtocol().initiate(), public=bad)
        assert _raw_exchange(real, hello) == [P.HandshakeError(code=P.HandshakeErrorCode.BAD_PUBLIC_VALUE)]
        logged_in_client(real, tmp_path / "ok", "bystander").close()


def _server_flight():
    client, server = _pair()
    server.receive_data(client.initiate())
    hello, auth = split_frames(server.data_to_send())
    return client, hello, auth


def test_PQ10_wrong_size_or_forged_server_answer(monkeypatch):
    decapsulated = []
    real = cu.MLKEM768KeyPair.decapsulate
    monkeypatch.setattr(
        cu.MLKEM768KeyPair, "decapsulate", lambda self, ct: decapsulated.append(ct) or real(self, ct)
    )
    for cut in (lambda a: a[:-1], lambda a: a[: cu.MLKEM768_CIPHERTEXT_BYTES], lambda a: a[:32]):
        client, hello, auth = _server_flight()
        wrong = cut(P.decode_message(hello[4:]).public)
        with pytest.raises(RemoteProtocolError, match="exactly 1120 bytes"):
            client.receive_data(_replace(hello, public=wrong) + auth)
        assert not client.established
    assert decapsulated == []  # refused from its size, before any ML-KEM work
    client, hello, auth = _server_flight()
    answer = P.decode_message(hello[4:]).public
    # A ciphertext of the right size but changed decapsulates to another secret (implicit
    # rejection): the signature over the transcript catches it.
    flipped = bytes([answer[0] ^ 1]) + answer[1:]
    with pytest.raises(HandshakeFailed, match="signature"):
        client.receive_data(_replace(hello, public=flipped) + auth)


# =============================================================================
# The end-to-end shares
# =============================================================================
def _sessions(cid=7):
    ida, idb = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    suite = cu.get_suite("aes256")
    alice = e2e.E2ESession("alice", ida, "bob", cu.public_bytes(idb), cid, suite)
    bob = e2e.E2ESession("bob", idb, "alice", cu.public_bytes(ida), cid, suite)
    return alice, bob, ida, idb, suite


def test_PQ11_wrong_size_shares_and_replies_are_refused():
    alice, bob, *_ = _sessions()
    key = cu.get_suite("aes256").generate_key()
    share_a, share_b = alice.new_generation(1, key), bob.new_generation(1, key)
    for bad in (
        share_a[:-1],
        share_a + b"\0",
        share_a[: e2e.SHARE.size - cu.MLKEM768_ENCAPSULATION_KEY_BYTES],
    ):
        with pytest.raises(e2e.ShareRejected, match=f"must be {e2e.SHARE.size} bytes"):
            bob.receive_share(bad)
    reply_b = bob.receive_share(share_a)
    assert len(share_a) == 1285 and len(reply_b) == 1157
    alice.receive_share(share_b)
    for bad in (reply_b[:-1], reply_b + b"\0"):
        with pytest.raises(e2e.ShareRejected, match=f"must be {e2e.KEM_REPLY.size} bytes"):
            alice.receive_share(bad)
    assert alice.receive_share(reply_b) is None  # the genuine reply still works afterwards


def test_PQ12_malformed_encapsulation_key_in_a_signed_share_is_refused():
    """Even a correctly signed share (a buggy or hostile peer) cannot crash the receiver."""
    alice, bob, ida, _idb, _suite = _sessions()
    key = cu.get_suite("aes256").generate_key()
    alice.new_generation(1, key)
    bob.new_generation(1, key)
    x_public = X25519PrivateKey.generate().public_key().public_bytes_raw()
    bad_ek = _unreduced_encapsulation_key()
    signature = ida.sign(e2e._share_transcript(7, 1, "alice", "bob", x_public + bad_ek))
    with pytest.raises(e2e.ShareRejected, match="not reduced modulo q"):
        bob.receive_share(e2e.SHARE.pack(e2e.KIND_SHARE, 1, x_public, bad_ek, signature))
    assert not bob.ready


def test_PQ13_swapped_ciphertext_or_early_reply_is_refused():
    alice, bob, *_ = _sessions()
    key = cu.get_suite("aes256").generate_key()
    share_a, share_b = alice.new_generation(1, key), bob.new_generation(1, key)
    reply_b = bob.receive_share(share_a)
    with pytest.raises(e2e.ShareRejected, match="before the key share"):
        alice.receive_share(reply_b)  # a reply before the share it belongs to
    alice.receive_share(share_b)
    _kind, gen, _ct, signature = e2e.KEM_REPLY.unpack(reply_b)
    _ss, other_ct = cu.mlkem768_encapsulate(alice._generations[1].my_kem.encapsulation_key)
    with pytest.raises(e2e.ShareRejected, match="not signed"):  # the server swaps in its own ciphertext
        alice.receive_share(e2e.KEM_REPLY.pack(e2e.KIND_KEM_REPLY, gen, other_ct, signature))
    assert not alice.ready


# =============================================================================
# Harvest now, decrypt later: a recorded session against each secret alone
# =============================================================================
def _open_first_record(suite, secret: bytes, record: bytes) -> bytes:
    keys = P.TrafficKeys(suite, secret, 1 << 30)
    return keys.open(record)


def test_PQ14_recorded_handshake_session_needs_both_x25519_and_mlkem_secrets():
    identity = Ed25519PrivateKey.generate()
    client, server = P.ClientProtocol(), P.ServerProtocol(identity)
    recording = []  # every byte on the wire, as an eavesdropper stores it today
    recording.append(("c2s", client.initiate()))
    server.receive_data(recording[-1][1])
    recording.append(("s2c", server.data_to_send()))
    client.receive_data(recording[-1][1])
    recording.append(("c2s", client.data_to_send()))
    server.receive_data(recording[-1][1])
    recording.append(
        ("c2s", client.send(P.Login(username="alice", password=b"correct horse", identity_key=bytes(32))))
    )
    server.receive_data(recording[-1][1])

    ch, sh_frame, sa_frame = recording[0][1], *split_frames(recording[1][1])
    sh = P.decode_message(sh_frame[4:])
    th1 = cu.sha256(ch[4:] + sh_frame[4:])
    record = split_frames(recording[3][1])[0][4:]
    # The future attacker's quantum computer gives each secret in turn: X25519 (from the
    # recorded public values) and ML-KEM (the client's decapsulation key stands in for it).
    x_secret = client._dh._x25519.exchange(X25519PublicKey.from_public_bytes(sh.public[-32:]))
    kem_secret = client._dh._mlkem.decapsulate(sh.public[: cu.MLKEM768_CIPHERTEXT_BYTES])
    suite = client.suite

    def attempt(ikm: bytes) -> bytes | None:
        keys = P.derive_handshake_keys(ikm, th1)
        try:
            return _open_first_record(suite, keys.c2s, record)
        except RecordAuthenticationFailed:
            return None

    # Control: with both secrets this method does open the recording (so the refusals below mean something).
    assert P.decode_message(attempt(kem_secret + x_secret)).password == b"correct horse"
    zeros = bytes(32)
    for guess in (
        x_secret,
        zeros + x_secret,
        x_secret + zeros,
        kem_secret,
        kem_secret + zeros,
        zeros + kem_secret,
        x_secret + kem_secret,
    ):
        assert attempt(guess) is None
    assert sa_frame  # the ServerAuth was recorded too; nothing in it helps


def test_PQ15_recorded_conversation_needs_both_x25519_and_mlkem_secrets():
    alice, bob, ida, idb, suite = _sessions(cid=42)
    kdc_key = suite.generate_key()  # the server knows this one: assume the attacker does too
    share_a, share_b = alice.new_generation(1, kdc_key), bob.new_generation(1, kdc_key)
    a_x, a_kem = alice._generations[1].my_private, alice._generations[1].my_kem
    b_kem = bob._generations[1].my_kem
    reply_a, reply_b = alice.receive_share(share_b), bob.receive_share(share_a)
    alice.receive_share(reply_b)
    bob.receive_share(reply_a)
    payload = alice.seal("meet at noon")
    recorded = [share_a, share_b, reply_a, reply_b, payload]  # what the relay saw

    _k, g, xa, eka, _s = e2e.SHARE.unpack(recorded[0])
    _k, _g, xb, ekb, _s = e2e.SHARE.unpack(recorded[1])
    ct_to_bob = e2e.KEM_REPLY.unpack(recorded[2])[2]  # alice encapsulated to bob's key
    ct_to_alice = e2e.KEM_REPLY.unpack(recorded[3])[2]
    transcript = e2e.root_transcript(
        42,
        g,
        [("alice", xa + eka, ct_to_alice), ("bob", xb + ekb, ct_to_bob)],
        (cu.public_bytes(ida), cu.public_bytes(idb)),
    )
    dh = a_x.exchange(X25519PublicKey.from_public_bytes(xb))
    ss_alice, ss_bob = a_kem.decapsulate(ct_to_alice), b_kem.decapsulate(ct_to_bob)
    _kind, generation, counter = e2e.MESSAGE_HEADER.unpack_from(payload)

    def attempt(root: bytes) -> str | None:
        chain = e2e.Chain(cu.hkdf(root, salt=None, info=cu.label("chain alice>bob"), length=32))
        for _ in range(counter + 1):
            _i, message_key = chain.step()
        try:
            body = bob._message_cipher(message_key).open(
                payload[e2e.MESSAGE_HEADER.size :], bob._aad("alice", "bob", generation, counter)
            )
        except Exception:  # noqa: BLE001 - any failure to open counts as "could not read"
            return None
        return body[e2e.BODY_HEADER.size :].decode()

    zeros = bytes(32)
    assert attempt(e2e.derive_root(kdc_key, dh, (ss_alice, ss_bob), transcript)) == "meet at noon"  # control
    x25519_only = [
        e2e.derive_root(kdc_key, dh, (zeros, zeros), transcript),
        cu.hkdf(kdc_key + dh, salt=transcript, info=cu.label("e2e root x25519-mlkem768"), length=32),
        cu.hkdf(kdc_key + dh, salt=transcript, info=cu.label("e2e root"), length=32),
    ]
    mlkem_only = [
        e2e.derive_root(kdc_key, zeros, (ss_alice, ss_bob), transcript),
        cu.hkdf(
            kdc_key + ss_alice + ss_bob, salt=transcript, info=cu.label("e2e root x25519-mlkem768"), length=32
        ),
    ]
    one_kem_secret = [
        e2e.derive_root(kdc_key, dh, (ss_alice, zeros), transcript),
        e2e.derive_root(kdc_key, dh, (zeros, ss_bob), transcript),
    ]
    for root in x25519_only + mlkem_only + one_kem_secret:
        assert attempt(root) is None


def test_PQ16_every_rekey_repeats_the_mlkem_exchange(tmp_path):
    with running_server(tmp_path / "srv", rekey_after_messages=6, min_rekey_interval_s=0) as server:
        seen = []
        original = server.service.conversations.relay

        def spy(session, msg):
            seen.append(msg.payload)
            return original(session, msg)

        server.service.router.override(P.Relay, spy)
        alice = logged_in_client(server, tmp_path / "a", "alice")
        bob = logged_in_client(server, tmp_path / "b", "bob")
        alice.open_conversation("bob")
        wait_for(alice, C.ConversationReady, peer="bob")
        wait_for(bob, C.ConversationReady, peer="alice")
        for i in range(6):
            alice.send_message("bob", f"m{i}")
            assert wait_for(bob, C.MessageReceived).text == f"m{i}"
        deadline = time.monotonic() + 10
        while alice.conversations["bob"].current < 2 and time.monotonic() < deadline:
            alice.send_message("bob", "more")
            wait_for(bob, C.MessageReceived)
        completed = alice.conversations["bob"].current
        alice.close()
        bob.close()
    assert completed >= 2  # a rekey happened ...
    shares = [p for p in seen if p[0] == e2e.KIND_SHARE]
    replies = [p for p in seen if p[0] == e2e.KIND_KEM_REPLY]
    for generation in range(1, completed + 1):  # ... and each one had both shares and both ML-KEM replies
        assert sum(e2e.SHARE.unpack(p)[1] == generation for p in shares) == 2
        assert sum(e2e.KEM_REPLY.unpack(p)[1] == generation for p in replies) == 2
    encapsulation_keys = [e2e.SHARE.unpack(p)[3] for p in shares]
    assert len(set(encapsulation_keys)) == len(encapsulation_keys)  # fresh ML-KEM keys every time
