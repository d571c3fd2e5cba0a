"""Frames (a length prefix with a hard maximum) and the record layer's traffic keys."""

from __future__ import annotations

import crypto_utils as cu
from secureim.errors import (
    DecryptionFailed,
    FrameTooLarge,
    LocalProtocolError,
    RecordAuthenticationFailed,
    SequenceExhausted,
)
from secureim.proto.limits import FRAME_HEADER, MAX_FRAME_BYTES, SEQUENCE_LIMIT


# =============================================================================
# Framing
# =============================================================================
def encode_frame(body: bytes) -> bytes:
    if len(body) > MAX_FRAME_BYTES:
        raise LocalProtocolError(f"Frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}.")
    return FRAME_HEADER.pack(len(body)) + body


class FrameDecoder:
    """Turns a byte stream into frames; one recv() is never assumed to be one frame."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_frame_bytes

    def feed(self, data: bytes) -> None:
        self._buffer += data
        self._check_header()

    def _check_header(self) -> None:
        if len(self._buffer) >= FRAME_HEADER.size:
            (length,) = FRAME_HEADER.unpack_from(self._buffer)
            if length > self._max:  # refused from the header, before the body is buffered
                raise FrameTooLarge(f"Frame of {length} bytes exceeds the {self._max}-byte limit.")

    def next_frame(self) -> bytes | None:
        """The next complete frame body, or None when more data is needed."""
        if len(self._buffer) < FRAME_HEADER.size:
            return None
        (length,) = FRAME_HEADER.unpack_from(self._buffer)
        end = FRAME_HEADER.size + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[FRAME_HEADER.size : end])
        del self._buffer[:end]
        self._check_header()
        return body

    @property
    def buffered(self) -> int:
        return len(self._buffer)


# =============================================================================
# Record layer: sealed frames with implicit per-direction sequence numbers
# =============================================================================
RECORD_AAD_PREFIX = b"secureim/v1 record"


class TrafficKeys:
    """One direction's keys: a traffic secret, its cipher, and the next sequence number.

    The sequence number is never sent: it is authenticated as associated data, so
    a replayed, reordered, dropped or truncated record fails to open.  It resets
    only when the traffic secret is updated (KeyUpdate), and never wraps.
    """

    def __init__(self, suite: cu.Suite, secret: bytes, update_after_bytes: int) -> None:
        self.suite = suite
        self.update_after_bytes = update_after_bytes
        self._install(secret)

    def _install(self, secret: bytes) -> None:
        self._secret = secret
        material = cu.hkdf(secret, salt=None, info=cu.label("record key"), length=self.suite.key_bytes)
        self._cipher = self.suite.record_cipher(self.suite.key_from_material(material))
        self.seq = 0
        self.bytes_protected = 0

    def update(self) -> None:
        self._install(cu.hkdf(self._secret, salt=None, info=cu.label("traffic update"), length=32))

    def _aad(self) -> bytes:
        if self.seq >= SEQUENCE_LIMIT:
            raise SequenceExhausted()
        return RECORD_AAD_PREFIX + self.seq.to_bytes(8, "big")

    def seal(self, plaintext: bytes) -> bytes:
        record = self._cipher.seal(plaintext, self._aad())
        self.seq += 1
        self.bytes_protected += len(plaintext)
        return record

    def open(self, record: bytes) -> bytes:
        try:
            plaintext = self._cipher.open(record, self._aad())
        except DecryptionFailed:
            raise RecordAuthenticationFailed() from None
        self.seq += 1
        self.bytes_protected += len(plaintext)
        return plaintext

    @property
    def needs_update(self) -> bool:
        return self.bytes_protected >= self.update_after_bytes
