"""In-memory client/server protocol pairs for tests (no sockets)."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from secureim import proto as P

IK = bytes(32)  # a placeholder identity key for protocol-level tests


def handshake(suite: str = "3des", group: str = "x25519", identity=None, **kw):
    identity = identity or Ed25519PrivateKey.generate()
    server = P.ServerProtocol(identity, suite=suite, **kw)
    client = P.ClientProtocol(group=group, **{k: v for k, v in kw.items() if k == "update_after_bytes"})
    server.receive_data(client.initiate())
    client_events = client.receive_data(server.data_to_send())
    server_events = server.receive_data(client.data_to_send())
    assert isinstance(client_events[0], P.HandshakeComplete)
    assert isinstance(server_events[0], P.HandshakeComplete)
    return client, server


def logged_in(**kw):
    client, server = handshake(**kw)
    server.receive_data(client.send(P.Login(username="alice", password=b"pw", identity_key=IK)))
    client.receive_data(server.send(P.AuthOk(username="alice", created=False)))
    return client, server


def split_frames(data: bytes) -> list[bytes]:
    """Split a byte string of whole frames into frames (header included)."""
    frames, pos = [], 0
    while pos < len(data):
        (n,) = P.FRAME_HEADER.unpack_from(data, pos)
        frames.append(data[pos : pos + 4 + n])
        pos += 4 + n
    return frames
