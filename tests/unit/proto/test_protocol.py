"""The sans-IO protocol: codec bytes, framing, handshake, records, state table."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from protocol_helpers import handshake, logged_in, split_frames

import crypto_utils as cu
from secureim import proto as P

IK = bytes(32)  # a placeholder identity key for protocol-level tests
from diffiehellman import DEFAULT_GROUP, DiffieHellman
from secureim.errors import (
    FrameTooLarge,
    HandshakeFailed,
    LocalProtocolError,
    MalformedMessage,
    RecordAuthenticationFailed,
    RemoteProtocolError,
    SequenceExhausted,
    ServerKeyMismatch,
    UnexpectedMessage,
)


# --- codec: literal bytes -----------------------------------------------------
@pytest.mark.parametrize(
    "msg,hexbytes",
    [
        (
            P.Login(username="al", password=b"pw", identity_key=IK),
            "11 0002 616c 0002 7077 0020 0000000000000000000000000000000000000000000000000000000000000000",
        ),
        (
            P.Register(username="bob", password=b"", identity_key=IK),
            "10 0003 626f62 0000 0020 0000000000000000000000000000000000000000000000000000000000000000",
        ),
        (P.PeerStatus(peer="bob", online=True, known=True), "21 0003 626f62 01 01 00"),
        (P.Relay(conversation_id=7, payload=b"\xff"), "23 0000000000000007 0001 ff"),
        (P.WhoRequest(), "30"),
        (P.WhoResponse(users=("a", "bc"), total=2), "31 0002 0001 61 0002 6263 00000002"),
        (P.AuthFailed(code=2, retry_after_s=60, reason="x"), "13 02 0000003c 0001 78"),
        (P.HandshakeError(code=3), "05 03"),
        (P.KeyUpdate(), "42"),
    ],
)
def test_messages_encode_to_literal_bytes(msg, hexbytes):
    raw = bytes.fromhex(hexbytes.replace(" ", ""))
    assert msg.encode() == raw
    assert P.decode_message(raw) == msg


@pytest.mark.parametrize(
    "raw,why",
    [
        (b"", "Empty"),
        (b"\xee", "Unknown message type"),
        (bytes.fromhex("11 0002 61"), "truncated"),
        (bytes.fromhex("30 00"), "Trailing"),
        (bytes.fromhex("11 0002 616c 0002 7077 0003 616263"), "length"),  # identity_key must be 32 bytes
        (bytes.fromhex("21 0003 626f62 02 01"), "boolean"),
        (bytes.fromhex("11 0002 ff fe 0000"), "UTF-8"),
        (bytes.fromhex("11 0021") + b"a" * 33 + bytes.fromhex("0000"), "length"),
        (bytes.fromhex("04 0003 616263"), "length"),  # ClientFinished.confirm must be 64 bytes
    ],
)
def test_malformed_messages_raise_malformed(raw, why):
    with pytest.raises(MalformedMessage, match=why):
        P.decode_message(raw)


def test_repr_hides_passwords_and_keys():
    text = repr(P.Login(username="alice", password=b"hunter2", identity_key=IK))
    assert "hunter2" not in text and "alice" in text
    assert "sekrit" not in repr(
        P.ConversationKey(conversation_id=1, peer="b", suite=1, generation=0, key=b"sekrit", peer_identity=IK)
    )


def test_encoding_out_of_bounds_is_a_local_error():
    with pytest.raises(LocalProtocolError):
        P.Login(username="a" * 33, password=b"", identity_key=IK).encode()
    with pytest.raises(LocalProtocolError):
        P.Relay(conversation_id=-1, payload=b"").encode()
    with pytest.raises(LocalProtocolError):
        P.Relay(conversation_id=1, payload=b"x" * (P.MAX_PAYLOAD_BYTES + 1)).encode()


# --- framing ------------------------------------------------------------------
def test_frame_layout_is_big_endian_length_prefix():
    assert P.encode_frame(b"abc") == b"\x00\x00\x00\x03abc"


def test_frames_fed_one_byte_at_a_time():
    dec = P.FrameDecoder()
    stream = P.encode_frame(b"hello") + P.encode_frame(b"") + P.encode_frame(b"world")
    got = []
    for i in range(len(stream)):
        dec.feed(stream[i : i + 1])
        while (frame := dec.next_frame()) is not None:
            got.append(frame)
    assert got == [b"hello", b"", b"world"]


def test_oversized_frame_refused_from_its_header_alone():
    dec = P.FrameDecoder()
    with pytest.raises(FrameTooLarge):
        dec.feed(P.FRAME_HEADER.pack(P.MAX_FRAME_BYTES + 1))
    assert dec.buffered == 4  # the body was never waited for
    P.FrameDecoder().feed(P.FRAME_HEADER.pack(P.MAX_FRAME_BYTES))  # the limit itself is fine
    with pytest.raises(LocalProtocolError):
        P.encode_frame(b"x" * (P.MAX_FRAME_BYTES + 1))


def test_oversized_frame_closes_the_connection():
    server = P.ServerProtocol(Ed25519PrivateKey.generate())
    with pytest.raises(FrameTooLarge):
        server.receive_data(b"\xff\xff\xff\xff")
    assert server.state is P.State.CLOSED
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"")


# --- handshake ------------------------------------------------------------------
@pytest.mark.parametrize("suite", cu.SUITE_NAMES)
@pytest.mark.parametrize("group", ["x25519", "ffdhe2048", "modp2048"])
def test_handshake_and_messages_both_ways(suite, group):
    client, server = handshake(suite=suite, group=group)
    assert client.suite.name == server.suite.name == suite
    assert server.receive_data(client.send(P.Login(username="alice", password=b"pw", identity_key=IK))) == [
        P.Login(username="alice", password=b"pw", identity_key=IK)
    ]
    assert client.receive_data(server.send(P.AuthOk(username="alice", created=True))) == [
        P.AuthOk(username="alice", created=True)
    ]
    assert client.state is server.state is P.State.AUTHENTICATED


def test_handshake_fed_byte_by_byte():
    identity = Ed25519PrivateKey.generate()
    server, client = P.ServerProtocol(identity), P.ClientProtocol()
    hello = client.initiate()
    for b in hello:
        server.receive_data(bytes([b]))
    events = []
    for b in server.data_to_send():
        events += client.receive_data(bytes([b]))
    assert [type(e) for e in events] == [P.HandshakeComplete]
    assert events[0].fingerprint == cu.fingerprint(cu.public_bytes(identity))
    events = []
    for b in client.data_to_send():
        events += server.receive_data(bytes([b]))
    assert [type(e) for e in events] == [P.HandshakeComplete]


def test_session_keys_differ_per_direction():
    client, server = handshake()
    assert client._send_keys._secret == server._recv_keys._secret
    assert client._send_keys._secret != client._recv_keys._secret


def _server_flight(identity=None, **kw):
    identity = identity or Ed25519PrivateKey.generate()
    client = P.ClientProtocol(**kw)
    server = P.ServerProtocol(identity)
    server.receive_data(client.initiate())
    return client, server, split_frames(server.data_to_send())


def _replace(frame: bytes, **changes) -> bytes:
    msg = P.decode_message(frame[4:])
    return P.encode_frame(dataclasses.replace(msg, **changes).encode())


def test_substituted_server_dh_value_is_caught_by_the_signature():
    client, _server, (hello, auth) = _server_flight()
    mitm_answer, _ = DiffieHellman.respond(DEFAULT_GROUP, DiffieHellman(DEFAULT_GROUP).public_bytes)
    with pytest.raises(HandshakeFailed, match="signature"):
        client.receive_data(_replace(hello, public=mitm_answer) + auth)
    assert client.state is P.State.CLOSED


def test_substituted_client_dh_value_is_caught_by_the_signature():
    identity = Ed25519PrivateKey.generate()
    client = P.ClientProtocol()
    server = P.ServerProtocol(identity)
    hello = client.initiate()
    server.receive_data(_replace(hello, public=DiffieHellman(DEFAULT_GROUP).public_bytes))
    with pytest.raises(HandshakeFailed, match="signature"):
        client.receive_data(server.data_to_send())


def test_server_signing_with_another_key_is_refused():
    client, _server, (hello, auth) = _server_flight()
    forged = Ed25519PrivateKey.generate()
    with pytest.raises(HandshakeFailed, match="signature"):  # refused by the signature check itself
        client.receive_data(_replace(hello, server_key=cu.public_bytes(forged)) + auth)


def test_bad_key_confirmation_is_refused():
    client, _server, (hello, auth) = _server_flight()
    msg = P.decode_message(auth[4:])
    bad = bytes([msg.confirm[0] ^ 1]) + msg.confirm[1:]
    with pytest.raises(HandshakeFailed, match="confirmation"):
        client.receive_data(hello + _replace(auth, confirm=bad))


def test_impostor_server_with_valid_signature_but_unpinned_key_is_refused():
    pinned = Ed25519PrivateKey.generate()
    impostor = Ed25519PrivateKey.generate()
    client = P.ClientProtocol(expected_server_key=cu.public_bytes(pinned))
    server = P.ServerProtocol(impostor)
    server.receive_data(client.initiate())
    with pytest.raises(ServerKeyMismatch) as info:
        client.receive_data(server.data_to_send())
    assert cu.fingerprint(cu.public_bytes(pinned)) in str(info.value)
    assert client.data_to_send() == b""  # no ClientFinished to an impostor


def test_bad_client_finished_is_refused():
    client, server, frames = _server_flight()
    client.receive_data(b"".join(frames))
    with pytest.raises(RemoteProtocolError, match="confirmation"):
        server.receive_data(P.encode_frame(P.ClientFinished(confirm=b"\0" * 64).encode()))
    assert server.state is P.State.CLOSED


@pytest.mark.parametrize(
    "hello_changes,code",
    [
        ({"group": "modp1024", "groups": ("modp1024",)}, P.HandshakeErrorCode.UNSUPPORTED_GROUP),
        ({"version": 9}, P.HandshakeErrorCode.UNSUPPORTED_VERSION),
        ({"suites": b"\x07"}, P.HandshakeErrorCode.UNSUPPORTED_SUITE),
        ({"public": b"\0" * 32}, P.HandshakeErrorCode.BAD_PUBLIC_VALUE),
    ],
)
def test_server_refuses_bad_hello_with_a_code_the_client_understands(hello_changes, code):
    client = P.ClientProtocol()
    server = P.ServerProtocol(Ed25519PrivateKey.generate())
    with pytest.raises(RemoteProtocolError):
        server.receive_data(_replace(client.initiate(), **hello_changes))
    reply = server.data_to_send()
    assert P.decode_message(reply[4:]) == P.HandshakeError(code=code)
    with pytest.raises(HandshakeFailed, match=code.name.lower().replace("_", " ")):
        client.receive_data(reply)


@pytest.mark.parametrize("y", ["zero", "one", "p-1", "p"])
def test_server_refuses_bad_finite_field_values(y):
    client = P.ClientProtocol(group="ffdhe2048")
    server = P.ServerProtocol(Ed25519PrivateKey.generate())
    p = DiffieHellman("ffdhe2048").group.p
    value = {"zero": 0, "one": 1, "p-1": p - 1, "p": p}[y]
    with pytest.raises(RemoteProtocolError):
        server.receive_data(_replace(client.initiate(), public=value.to_bytes(256, "big")))
    assert P.decode_message(server.data_to_send()[4:]).code == P.HandshakeErrorCode.BAD_PUBLIC_VALUE


def test_server_refuses_groups_disabled_by_configuration():
    server = P.ServerProtocol(Ed25519PrivateKey.generate(), allowed_groups=frozenset({"x25519"}))
    with pytest.raises(RemoteProtocolError, match="disabled"):
        server.receive_data(P.ClientProtocol(group="ffdhe2048").initiate())


def test_login_before_handshake_is_refused():
    server = P.ServerProtocol(Ed25519PrivateKey.generate())
    with pytest.raises(UnexpectedMessage):
        server.receive_data(P.encode_frame(P.Login(username="a", password=b"b", identity_key=IK).encode()))
    client = P.ClientProtocol()
    with pytest.raises(LocalProtocolError):
        client.send(P.Login(username="a", password=b"b", identity_key=IK))


# --- records: tamper, replay, reorder, drop, truncate ---------------------------
def _three_records():
    client, server = handshake()
    frames = [client.send(P.Login(username=f"user{i}", password=b"pw", identity_key=IK)) for i in range(3)]
    return server, frames


def test_records_in_order_are_accepted():
    server, frames = _three_records()
    assert len(server.receive_data(b"".join(frames))) == 3


@pytest.mark.parametrize("attack", ["replay", "reorder", "drop", "truncate", "tamper", "inject", "empty"])
def test_record_attacks_end_the_session_with_a_reason(attack):
    server, frames = _three_records()
    server.receive_data(frames[0])
    if attack == "replay":
        bad = frames[0]
    elif attack == "reorder":
        bad = frames[2]
    elif attack == "drop":
        bad = frames[2]
    elif attack == "truncate":
        body = frames[1][4:-1]
        bad = P.encode_frame(body)
    elif attack == "tamper":
        bad = frames[1][:10] + bytes([frames[1][10] ^ 4]) + frames[1][11:]
    elif attack == "inject":
        bad = P.encode_frame(cu.random_bytes(64))
    else:
        bad = P.encode_frame(b"")
    with pytest.raises(RecordAuthenticationFailed) as info:
        server.receive_data(bad)
    assert "tampered" in str(info.value)
    assert server.state is P.State.CLOSED and server.close_reason


def test_plaintext_message_after_handshake_is_refused():
    client, server = handshake()
    with pytest.raises(RecordAuthenticationFailed):
        server.receive_data(P.encode_frame(P.Login(username="a", password=b"b", identity_key=IK).encode()))


def test_key_update_rekeys_and_resets_sequence_numbers():
    client, server = logged_in(update_after_bytes=100)
    first_secret = client._send_keys._secret
    for i in range(20):
        msg = P.Relay(conversation_id=i, payload=b"x" * 30)
        assert server.receive_data(client.send(msg)) == [msg]
    assert client._send_keys._secret != first_secret
    assert client._send_keys.seq < 20 and server._recv_keys.seq == client._send_keys.seq


def test_replay_across_a_key_update_fails():
    client, server = logged_in(update_after_bytes=10)
    old = client.send(P.WhoRequest())
    server.receive_data(old)
    server.receive_data(client.send(P.Relay(conversation_id=1, payload=b"y" * 20)))
    with pytest.raises(RecordAuthenticationFailed):
        server.receive_data(old)


def test_sequence_numbers_never_wrap():
    client, _server = logged_in()
    client._send_keys.seq = P.SEQUENCE_LIMIT
    with pytest.raises(SequenceExhausted):
        client.send(P.WhoRequest())


def test_goodbye_closes_both_sides():
    client, server = logged_in()
    server.receive_data(client.send(P.Goodbye(reason="bye")))
    assert server.state is P.State.CLOSED and "bye" in server.close_reason
    assert client.state is P.State.CLOSED


# --- the state table ----------------------------------------------------------------
def _sample(cls):
    values = {}
    for f in dataclasses.fields(cls):
        kind = f.metadata["kind"]
        values[f.name] = {
            P.Kind.U8: 1,
            P.Kind.U32: 1,
            P.Kind.U64: 1,
            P.Kind.BOOL: True,
            P.Kind.TEXT: "a",
            P.Kind.TEXT_LIST: ("a",),
        }.get(kind, b"\0" * (f.metadata["exact"] or 1))
    return cls(**values)


def _at_state(role: P.Role, state: P.State):
    """A protocol object of ``role`` in ``state``, plus its peer."""
    if state in (P.State.AWAITING_CLIENT_HELLO,):
        return P.ServerProtocol(Ed25519PrivateKey.generate()), None
    if state is P.State.AWAITING_SERVER_HELLO:
        c = P.ClientProtocol()
        c.initiate()
        return c, None
    if state is P.State.AWAITING_SERVER_AUTH:
        client, _server, (hello, _auth) = _server_flight()
        client.receive_data(hello)
        return client, None
    if state is P.State.AWAITING_CLIENT_FINISHED:
        _client, server, _frames = _server_flight()
        return server, None
    c, s = handshake() if state is P.State.ESTABLISHED else logged_in()
    return (c, s) if role is P.Role.CLIENT else (s, c)


@pytest.mark.parametrize("role,state", list(P.RECEIVE_TABLE))
@pytest.mark.parametrize("msg_type", list(P.MESSAGE_TYPES.values()), ids=lambda c: c.__name__)
def test_every_state_and_message_pair(role, state, msg_type):
    """Messages missing from the table close the connection; listed ones are accepted."""
    me, peer = _at_state(role, state)
    msg = _sample(msg_type)
    allowed = msg_type in P.RECEIVE_TABLE[(role, state)]
    if peer is not None:
        # Seal it as the peer would (bypassing the peer's own send table).
        peer_keys = peer._send_keys
        data = P.encode_frame(peer_keys.seal(msg.encode()))
    else:
        data = P.encode_frame(msg.encode())
    if msg_type is P.KeyUpdate and peer is not None:
        assert me.receive_data(data) == []  # record-layer message, valid in every session state
        return
    if allowed and peer is not None:
        assert me.receive_data(data) == [msg]
        return
    if allowed:
        return  # handshake messages with sample contents: covered by the handshake tests
    with pytest.raises(RemoteProtocolError):
        me.receive_data(data)
    assert me.state is P.State.CLOSED


def test_client_may_not_send_chat_messages_before_login():
    client, _server = handshake()
    for msg in (P.OpenConversation(peer="bob"), P.Relay(conversation_id=1, payload=b""), P.WhoRequest()):
        with pytest.raises(LocalProtocolError):
            client.send(msg)
    client2, _ = logged_in()
    with pytest.raises(LocalProtocolError):
        client2.send(P.Login(username="x", password=b"y", identity_key=IK))


# --- section 13: password change and direct-link requests (0x60-0x63) --------------------
@pytest.mark.parametrize(
    "msg, hexbytes",
    [
        (P.ChangePassword(old_password=b"old", new_password=b"new"), "60 0003 6f6c64 0003 6e6577"),
        (P.PasswordChanged(ticket=b"\x01\x02"), "61 0002 0102"),
        (
            P.PasswordChangeFailed(code=P.AuthCode.INVALID_CREDENTIALS, retry_after_s=0, reason="no"),
            "62 01 00000000 0002 6e6f",
        ),
        (P.DirectAsked(peer="bob"), "63 0003 626f62"),
    ],
)
def test_section_13_messages_encode_to_literal_bytes(msg, hexbytes):
    raw = bytes.fromhex(hexbytes.replace(" ", ""))
    assert msg.encode() == raw
    assert P.decode_message(raw) == msg


def test_change_password_only_after_login():
    assert P.ChangePassword not in P.RECEIVE_TABLE[(P.Role.SERVER, P.State.ESTABLISHED)]
    assert P.ChangePassword in P.RECEIVE_TABLE[(P.Role.SERVER, P.State.AUTHENTICATED)]
    assert P.PasswordChanged in P.RECEIVE_TABLE[(P.Role.CLIENT, P.State.AUTHENTICATED)]


@pytest.mark.parametrize(
    "cls",
    sorted(
        (c for c in P.MESSAGE_TYPES.values() if any(m["kind"] is P.Kind.BYTES for _n, m in c.FIELDS)),
        key=lambda c: c.TYPE,
    ),
    ids=lambda c: c.__name__,
)
def test_a_bytes_field_longer_than_its_bound_is_refused_by_the_decoder(cls):
    """Every bounded field is checked when decoding, before the message exists (the compiled codec)."""
    name, meta = next((n, m) for n, m in cls.FIELDS if m["kind"] is P.Kind.BYTES)
    too_long = (meta["exact"] + 1) if meta["exact"] is not None else meta["max_len"] + 1
    out = bytearray((cls.TYPE,))
    for n, m in cls.FIELDS:
        if n == name:
            out += too_long.to_bytes(2, "big") + b"\0" * too_long
            break
        enc = dict(cls.ENCODERS)[n]
        sample = {
            P.Kind.U8: 0,
            P.Kind.U32: 0,
            P.Kind.U64: 0,
            P.Kind.BOOL: False,
            P.Kind.BYTES: b"",
            P.Kind.TEXT: "",
            P.Kind.TEXT_LIST: (),
        }[m["kind"]]
        if m["kind"] is P.Kind.BYTES and m["exact"] is not None:
            sample = b"\0" * m["exact"]
        enc(out, sample)
    with pytest.raises(MalformedMessage, match="bad length"):
        P.decode_message(bytes(out))
