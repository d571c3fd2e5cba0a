"""Property tests (hypothesis): round trips, and garbage only ever raises the protocol's error."""

from __future__ import annotations

import dataclasses

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_helpers import handshake

from secureim import proto as P
from secureim.errors import MalformedMessage, ProtocolError

IDENTITY = Ed25519PrivateKey.generate()


def _field_strategy(f):
    meta = f.metadata
    kind = meta["kind"]
    if kind is P.Kind.U8:
        return st.integers(0, 255)
    if kind is P.Kind.U32:
        return st.integers(0, 2**32 - 1)
    if kind is P.Kind.U64:
        return st.integers(0, 2**64 - 1)
    if kind is P.Kind.BOOL:
        return st.booleans()
    if kind is P.Kind.BYTES:
        if meta["exact"] is not None:
            return st.binary(min_size=meta["exact"], max_size=meta["exact"])
        return st.binary(max_size=min(meta["max_len"], 2000))
    text = st.text(max_size=meta["max_len"] // 4)
    if kind is P.Kind.TEXT:
        return text
    return st.lists(text, max_size=min(20, meta["max_items"])).map(tuple)


messages = st.sampled_from(list(P.MESSAGE_TYPES.values())).flatmap(
    lambda cls: st.builds(cls, **{f.name: _field_strategy(f) for f in dataclasses.fields(cls)})
)


@given(messages)
def test_message_round_trip(msg):
    assert P.decode_message(msg.encode()) == msg


@given(st.lists(st.binary(max_size=3000), max_size=8), st.data())
def test_frame_round_trip_any_chunking(bodies, data):
    stream = b"".join(P.encode_frame(b) for b in bodies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    dec, got, prev = P.FrameDecoder(), [], 0
    for cut in cuts + [len(stream)]:
        dec.feed(stream[prev:cut])
        prev = cut
        while (frame := dec.next_frame()) is not None:
            got.append(frame)
    assert got == bodies


@given(st.binary(max_size=400))
def test_decoding_arbitrary_bytes_raises_only_malformed(raw):
    try:
        P.decode_message(raw)
    except MalformedMessage:
        pass


@given(st.sampled_from(sorted(P.MESSAGE_TYPES)), st.binary(max_size=300))
def test_decoding_arbitrary_bodies_of_every_type_raises_only_malformed(type_id, body):
    try:
        P.decode_message(bytes([type_id]) + body)
    except MalformedMessage:
        pass


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=5))
def test_server_fed_garbage_raises_only_protocol_errors(chunks):
    server = P.ServerProtocol(IDENTITY)
    try:
        for chunk in chunks:
            server.receive_data(chunk)
    except ProtocolError:
        assert server.state is P.State.CLOSED


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=5))
def test_client_fed_garbage_raises_only_protocol_errors(chunks):
    client = P.ClientProtocol()
    client.initiate()
    try:
        for chunk in chunks:
            client.receive_data(chunk)
    except ProtocolError:
        assert client.state is P.State.CLOSED


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None, max_examples=50)
@given(st.binary(min_size=1, max_size=300))
def test_established_session_fed_garbage_frames_raises_only_protocol_errors(body):
    _client, server = handshake()
    try:
        server.receive_data(P.encode_frame(body))
    except ProtocolError:
        assert server.state is P.State.CLOSED
    else:  # pragma: no cover - forging a record is the thing that must not happen
        raise AssertionError("a random frame was accepted as a record")
