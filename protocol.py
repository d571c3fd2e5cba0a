"""The secureim wire protocol, sans-IO: frames, typed messages, handshake and records.

This module never touches a socket, a thread, a database or the terminal.  Both
``server.py`` and ``clientlib.py`` drive it the same way::

    events = proto.receive_data(bytes_from_socket)   # typed events out
    sock.sendall(proto.data_to_send())               # handshake replies
    sock.sendall(proto.send(SomeMessage(...)))       # sealed application messages

Every byte layout, state and key below is described in docs/PROTOCOL.md.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import crypto_utils as cu
from diffiehellman import (
    DEFAULT_GROUP,
    GROUPS,
    MAX_GROUP_NAME_BYTES,
    POST_QUANTUM_GROUPS,
    DiffieHellman,
    get_group,
    share_length,
)
from puzzle import PuzzleGate
from puzzle import solve as puzzle_solve
from errors import (
    DecryptionFailed,
    DHError,
    FrameTooLarge,
    InvalidUsername,
    HandshakeFailed,
    LocalProtocolError,
    MalformedMessage,
    ProtocolError,
    RecordAuthenticationFailed,
    RemoteProtocolError,
    SequenceExhausted,
    ServerKeyMismatch,
    UnexpectedMessage,
    UnsupportedGroup,
)

PROTOCOL_VERSION = 1
DEFAULT_PORT = 5151
FRAME_HEADER = struct.Struct(">I")
# Largest frame body accepted, checked from the 4-byte header before buffering.
MAX_FRAME_BYTES = 64 * 1024
NONCE_BYTES = 32
MAX_USERNAME_BYTES = 32
MAX_PASSWORD_BYTES = 1024
# Largest relayed end-to-end payload; with the record overhead it fits a frame.
MAX_PAYLOAD_BYTES = 60 * 1024
MAX_REASON_BYTES = 512
MAX_WHO_USERS = 1000
MAX_TICKET_BYTES = 256
# Key shares: 1,216 bytes from the client for x25519-mlkem768 (512 for 4096-bit groups), 1,120 back.
MAX_PUBLIC_VALUE_BYTES = max(share_length(g) for g in GROUPS.values())
MAX_RESPONSE_VALUE_BYTES = max(share_length(g, response=True) for g in GROUPS.values())
MAX_OFFERED_GROUPS = 8
SEQUENCE_LIMIT = (1 << 64) - 1  # a sequence number never wraps (TLS 1.3 section 5.3)

# Usernames: ASCII only (no Unicode look-alikes), case-insensitive, safe as file names.
USERNAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")
USERNAME_RULES = (
    "Usernames are 1 to 32 characters: letters a-z, digits, '_', '.' or '-', "
    "starting with a letter or digit (case does not matter)."
)


def normalize_username(raw: str) -> str:
    """Lower-case and check a username; raises :class:`InvalidUsername` with the rules."""
    if not isinstance(raw, str):
        raise InvalidUsername(USERNAME_RULES)
    name = raw.strip().lower() if raw.isascii() else raw
    if not USERNAME_RE.fullmatch(name):
        raise InvalidUsername(USERNAME_RULES)
    return name


# =============================================================================
# Field codec: one encode/decode pair, driven by each message's field metadata.
# =============================================================================
class Kind(enum.Enum):
    __hash__ = object.__hash__  # members are singletons; Enum's __hash__ is Python code, run per field
    U8 = "u8"
    U32 = "u32"
    U64 = "u64"
    BOOL = "bool"
    BYTES = "bytes"  # u16 length + bytes
    TEXT = "text"  # u16 length + strict UTF-8
    TEXT_LIST = "list"  # u16 count + TEXT items


_INT_STRUCTS = {Kind.U8: struct.Struct(">B"), Kind.U32: struct.Struct(">I"), Kind.U64: struct.Struct(">Q")}
_U16 = struct.Struct(">H")


def wire(
    kind: Kind,
    *,
    max_len: int = 0,
    exact: int | None = None,
    max_items: int = 0,
    default: Any = dataclasses.MISSING,
) -> Any:
    """Declare a message field's wire encoding (and its bounds)."""
    return field(
        default=default, metadata={"kind": kind, "max_len": max_len, "exact": exact, "max_items": max_items}
    )


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise MalformedMessage("Message truncated.")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk


def _encode_field(out: bytearray, name: str, meta: dict, value: Any) -> None:
    kind = meta["kind"]
    if kind in _INT_STRUCTS:
        try:
            out += _INT_STRUCTS[kind].pack(value)
        except (struct.error, TypeError):
            raise LocalProtocolError(f"Field {name} out of range.") from None
    elif kind is Kind.BOOL:
        out.append(1 if value else 0)
    elif kind is Kind.BYTES:
        _encode_bytes(out, name, meta, bytes(value))
    elif kind is Kind.TEXT:
        _encode_bytes(out, name, meta, value.encode("utf-8"))
    elif kind is Kind.TEXT_LIST:
        if len(value) > meta["max_items"]:
            raise LocalProtocolError(f"Field {name} has too many items.")
        out += _U16.pack(len(value))
        for item in value:
            _encode_bytes(out, name, meta, item.encode("utf-8"))


def _encode_bytes(out: bytearray, name: str, meta: dict, raw: bytes) -> None:
    if meta["exact"] is not None and len(raw) != meta["exact"]:
        raise LocalProtocolError(f"Field {name} must be {meta['exact']} bytes.")
    if len(raw) > meta["max_len"]:
        raise LocalProtocolError(f"Field {name} is longer than {meta['max_len']} bytes.")
    out += _U16.pack(len(raw))
    out += raw


def _decode_bytes(r: _Reader, name: str, meta: dict) -> bytes:
    (n,) = _U16.unpack(r.take(2))
    if n > meta["max_len"] or (meta["exact"] is not None and n != meta["exact"]):
        raise MalformedMessage(f"Field {name} has a bad length.")
    return r.take(n)


def _decode_text(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise MalformedMessage(f"Field {name} is not valid UTF-8.") from None


def _decode_field(r: _Reader, name: str, meta: dict) -> Any:
    kind = meta["kind"]
    if kind in _INT_STRUCTS:
        st = _INT_STRUCTS[kind]
        return st.unpack(r.take(st.size))[0]
    if kind is Kind.BOOL:
        b = r.take(1)[0]
        if b > 1:
            raise MalformedMessage(f"Field {name} is not a boolean.")
        return b == 1
    if kind is Kind.BYTES:
        return _decode_bytes(r, name, meta)
    if kind is Kind.TEXT:
        return _decode_text(_decode_bytes(r, name, meta), name)
    (count,) = _U16.unpack(r.take(2))
    if count > meta["max_items"]:
        raise MalformedMessage(f"Field {name} has too many items.")
    return tuple(_decode_text(_decode_bytes(r, name, meta), name) for _ in range(count))


def _compile_field(name: str, meta: dict) -> tuple[Callable, Callable]:
    """One field's encoder ``(out, value)`` and decoder ``(data, pos) -> (value, pos)``, specialised
    once per message class: the same encoding and bounds as _encode_field / _decode_field, without
    looking the kind up for every field of every frame (the relay codes two messages per frame)."""
    kind, exact, max_len = meta["kind"], meta["exact"], meta["max_len"]
    if kind in _INT_STRUCTS:
        st = _INT_STRUCTS[kind]
        pack, unpack, size = st.pack, st.unpack_from, st.size

        def enc(out: bytearray, value: Any) -> None:
            try:
                out += pack(value)
            except (struct.error, TypeError):
                raise LocalProtocolError(f"Field {name} out of range.") from None

        def dec(data: bytes, pos: int) -> tuple[Any, int]:
            if pos + size > len(data):
                raise MalformedMessage("Message truncated.")
            return unpack(data, pos)[0], pos + size

        return enc, dec
    if kind is Kind.BYTES or kind is Kind.TEXT:
        text = kind is Kind.TEXT
        u16_pack, u16_unpack = _U16.pack, _U16.unpack_from

        def enc(out: bytearray, value: Any) -> None:
            raw = value.encode("utf-8") if text else bytes(value)
            if exact is not None and len(raw) != exact:
                raise LocalProtocolError(f"Field {name} must be {exact} bytes.")
            if len(raw) > max_len:
                raise LocalProtocolError(f"Field {name} is longer than {max_len} bytes.")
            out += u16_pack(len(raw))
            out += raw

        def dec(data: bytes, pos: int) -> tuple[Any, int]:
            if pos + 2 > len(data):
                raise MalformedMessage("Message truncated.")
            (n,) = u16_unpack(data, pos)
            if n > max_len or (exact is not None and n != exact):
                raise MalformedMessage(f"Field {name} has a bad length.")
            end = pos + 2 + n
            if end > len(data):
                raise MalformedMessage("Message truncated.")
            raw = data[pos + 2 : end]
            return (_decode_text(raw, name) if text else raw), end

        return enc, dec

    def enc_generic(out: bytearray, value: Any) -> None:
        _encode_field(out, name, meta, value)

    def dec_generic(data: bytes, pos: int) -> tuple[Any, int]:
        r = _Reader(data)
        r.pos = pos
        value = _decode_field(r, name, meta)
        return value, r.pos

    return enc_generic, dec_generic


# =============================================================================
# Messages
# =============================================================================
MESSAGE_TYPES: dict[int, type] = {}


class Message:
    """Base of every typed message; ``TYPE`` is its one-byte wire tag."""

    TYPE: ClassVar[int]
    FIELDS: ClassVar[tuple] = ()  # (name, metadata) per field, computed once at registration

    ENCODERS: ClassVar[tuple] = ()  # (name, encoder) per field, compiled at registration
    DECODERS: ClassVar[tuple] = ()  # (name, decoder) per field

    def encode(self) -> bytes:
        out = bytearray((self.TYPE,))
        for name, enc in self.ENCODERS:
            enc(out, getattr(self, name))
        return bytes(out)

    def __repr__(self) -> str:  # never print secrets (passwords, keys) in logs
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("kind") is Kind.BYTES:
                value = f"<{len(value)} bytes>"
            shown.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"


def message(type_id: int) -> Callable[[type], type]:
    def register(cls: type) -> type:
        if type_id in MESSAGE_TYPES:
            raise RuntimeError(f"duplicate message type {type_id:#x}")
        cls.TYPE = type_id
        cls = dataclass(frozen=True, repr=False)(cls)
        cls.FIELDS = tuple((f.name, dict(f.metadata)) for f in dataclasses.fields(cls))
        compiled = [(name, _compile_field(name, meta)) for name, meta in cls.FIELDS]
        cls.ENCODERS = tuple((name, enc) for name, (enc, _dec) in compiled)
        cls.DECODERS = tuple((name, dec) for name, (_enc, dec) in compiled)
        MESSAGE_TYPES[type_id] = cls
        return cls

    return register


def decode_message(data: bytes) -> Message:
    """Decode one message; anything malformed raises :class:`MalformedMessage` only."""
    if not data:
        raise MalformedMessage("Empty message.")
    cls = MESSAGE_TYPES.get(data[0])
    if cls is None:
        raise MalformedMessage(f"Unknown message type {data[0]:#04x}.")
    values, pos = {}, 1
    for name, dec in cls.DECODERS:
        values[name], pos = dec(data, pos)
    if pos != len(data):
        raise MalformedMessage("Trailing bytes after message.")
    return cls(**values)


# --- handshake (plaintext frames) ---------------------------------------------
@message(0x01)
class ClientHello(Message):
    version: int = wire(Kind.U8)
    group: str = wire(Kind.TEXT, max_len=MAX_GROUP_NAME_BYTES)
    public: bytes = wire(Kind.BYTES, max_len=MAX_PUBLIC_VALUE_BYTES)
    nonce: bytes = wire(Kind.BYTES, exact=NONCE_BYTES, max_len=NONCE_BYTES)
    suites: bytes = wire(Kind.BYTES, max_len=8)  # suite ids the client accepts
    puzzle_challenge: bytes = wire(Kind.BYTES, max_len=64)  # empty unless answering a Puzzle
    puzzle_solution: bytes = wire(Kind.BYTES, max_len=16)
    # Every group the client accepts, best first; ``group`` is one of them.  Signed with the
    # transcript, so the server can refuse a downgrade (docs/PROTOCOL.md, group negotiation).
    groups: tuple = wire(
        Kind.TEXT_LIST, max_len=MAX_GROUP_NAME_BYTES, max_items=MAX_OFFERED_GROUPS, default=()
    )


@message(0x02)
class ServerHello(Message):
    version: int = wire(Kind.U8)
    suite: int = wire(Kind.U8)
    public: bytes = wire(Kind.BYTES, max_len=MAX_RESPONSE_VALUE_BYTES)
    nonce: bytes = wire(Kind.BYTES, exact=NONCE_BYTES, max_len=NONCE_BYTES)
    server_key: bytes = wire(Kind.BYTES, exact=32, max_len=32)


@message(0x03)
class ServerAuth(Message):
    signature: bytes = wire(Kind.BYTES, exact=64, max_len=64)
    confirm: bytes = wire(Kind.BYTES, exact=64, max_len=64)


@message(0x04)
class ClientFinished(Message):
    confirm: bytes = wire(Kind.BYTES, exact=64, max_len=64)


class HandshakeErrorCode(enum.IntEnum):
    PROTOCOL = 1
    UNSUPPORTED_VERSION = 2
    UNSUPPORTED_GROUP = 3
    UNSUPPORTED_SUITE = 4
    BAD_PUBLIC_VALUE = 5
    BUSY = 6
    PUZZLE_FAILED = 7
    DOWNGRADE = 8


@message(0x05)
class HandshakeError(Message):
    """Sent in the clear before keys exist; the client shows only its own text for the code."""

    code: int = wire(Kind.U8)


@message(0x06)
class Puzzle(Message):
    """Server under load: solve this (puzzle.py) and send the ClientHello again."""

    challenge: bytes = wire(Kind.BYTES, max_len=64)
    difficulty: int = wire(Kind.U8)


@message(0x70)
class GroupRetry(Message):
    """The server does not allow the client's group but allows ``group``, which the
    client also offered: send the ClientHello again with a share in it (at most once)."""

    group: str = wire(Kind.TEXT, max_len=MAX_GROUP_NAME_BYTES)


# --- session (sealed records) --------------------------------------------------
@message(0x10)
class Register(Message):
    username: str = wire(Kind.TEXT, max_len=MAX_USERNAME_BYTES)
    password: bytes = wire(Kind.BYTES, max_len=MAX_PASSWORD_BYTES)
    identity_key: bytes = wire(Kind.BYTES, exact=32, max_len=32)  # the user's Ed25519 public key


@message(0x11)
class Login(Message):
    username: str = wire(Kind.TEXT, max_len=MAX_USERNAME_BYTES)
    password: bytes = wire(Kind.BYTES, max_len=MAX_PASSWORD_BYTES)
    identity_key: bytes = wire(Kind.BYTES, exact=32, max_len=32)


@message(0x12)
class AuthOk(Message):
    username: str = wire(Kind.TEXT, max_len=MAX_USERNAME_BYTES)
    created: bool = wire(Kind.BOOL)
    ticket: bytes = wire(Kind.BYTES, max_len=MAX_TICKET_BYTES, default=b"")  # resumption ticket (section 7.1)


@message(0x14)
class Resume(Message):
    """Log in again with a resumption ticket instead of the password (no bcrypt)."""

    ticket: bytes = wire(Kind.BYTES, max_len=MAX_TICKET_BYTES)
    identity_key: bytes = wire(Kind.BYTES, exact=32, max_len=32)


class AuthCode(enum.IntEnum):
    INVALID_CREDENTIALS = 1
    LOCKED = 2
    USERNAME_TAKEN = 3
    INVALID_USERNAME = 4
    INVALID_PASSWORD = 5
    UNAVAILABLE = 6
    TOO_MANY_ATTEMPTS = 7
    INVALID_IDENTITY = 8
    BANNED = 9  # the reason says until when and why (section 14)


@message(0x13)
class AuthFailed(Message):
    code: int = wire(Kind.U8)
    retry_after_s: int = wire(Kind.U32)
    reason: str = wire(Kind.TEXT, max_len=MAX_REASON_BYTES)


@message(0x20)
class OpenConversation(Message):
    """Destination request: "I want to talk to ``peer``"."""

    peer: str = wire(Kind.TEXT, max_len=MAX_USERNAME_BYTES)


@message(0x21)
class PeerStatus(Message):
    """``peer`` is online or offline: an answer to OpenConversation, or (``notice``)
    unasked, when the peer logs in or leaves."""

    peer: str = wire(Kind.TEXT, max_len=MAX_USERNAME_BYTES)
    online: bool = wire(Kind.BOOL)
    known: bool = wire(Kind.BOOL)
    notice: bool = wire(Kind.BOOL, default=False)


@message(0x22)
class ConversationKey(Message):
    """KDC key delivery: a fresh per-conversation key, sealed in the session."""

    conversation_id: int = wire(Kind.U64)
    peer: str = wire(Kind.TEXT, max_len=MAX_USERNAME_BYTES)
    suite: int = wire(Kind.U8)
    generation: int = wire(Kind.U32)
    key: bytes = wire(Kind.BYTES, max_len=64)
    peer_identity: bytes = wire(Kind.BYTES, exact=32, max_len=32)  # the peer's Ed25519 public key


@message(0x23)
class Relay(Message):
    """Client to server: forward ``payload`` (end-to-end sealed) to the conversation's peer."""

    conversation_id: int = wire(Kind.U64)
    payload: bytes = wire(Kind.BYTES, max_len=MAX_PAYLOAD_BYTES)


@message(0x24)
class Deliver(Message):
    """Server to client: ``sender`` sent ``payload`` in ``conversation_id``."""

    conversation_id: int = wire(Kind.U64)
    sender: str = wire(Kind.TEXT, max_len=MAX_USERNAME_BYTES)
    payload: bytes = wire(Kind.BYTES, max_len=MAX_PAYLOAD_BYTES)


@message(0x30)
class WhoRequest(Message):
    pass


@message(0x31)
class WhoResponse(Message):
    users: tuple = wire(Kind.TEXT_LIST, max_len=MAX_USERNAME_BYTES, max_items=MAX_WHO_USERS)
    total: int = wire(Kind.U32)


@message(0x50)
class RegisterEndpoint(Message):
    """Direct mode: the UDP port this client listens on (its address is the TCP source)."""

    port: int = wire(Kind.U32)


@message(0x51)
class DirectRequest(Message):
    peer: str = wire(Kind.TEXT, max_len=MAX_USERNAME_BYTES)


@message(0x52)
class DirectOffer(Message):
    """The peer's UDP endpoint and a ticket sealed for the peer (section 12.2)."""

    peer: str = wire(Kind.TEXT, max_len=MAX_USERNAME_BYTES)
    host: str = wire(Kind.TEXT, max_len=64)
    port: int = wire(Kind.U32)
    ticket: bytes = wire(Kind.BYTES, max_len=MAX_TICKET_BYTES)


@message(0x53)
class DirectUnavailable(Message):
    peer: str = wire(Kind.TEXT, max_len=MAX_USERNAME_BYTES)
    reason: str = wire(Kind.TEXT, max_len=MAX_REASON_BYTES)


@message(0x60)
class ChangePassword(Message):
    """Change this account's password (section 13): the old one proves it is the owner."""

    old_password: bytes = wire(Kind.BYTES, max_len=MAX_PASSWORD_BYTES)
    new_password: bytes = wire(Kind.BYTES, max_len=MAX_PASSWORD_BYTES)


@message(0x61)
class PasswordChanged(Message):
    """The password was changed; every earlier resumption ticket of the account has ended.
    ``ticket`` replaces this session's ticket."""

    ticket: bytes = wire(Kind.BYTES, max_len=MAX_TICKET_BYTES, default=b"")


@message(0x62)
class PasswordChangeFailed(Message):
    """The password was not changed; ``code`` is an :class:`AuthCode`."""

    code: int = wire(Kind.U8)
    retry_after_s: int = wire(Kind.U32)
    reason: str = wire(Kind.TEXT, max_len=MAX_REASON_BYTES)


@message(0x63)
class DirectAsked(Message):
    """Server to client: ``peer`` asked for a direct link, but this client has not opted in
    (registered no UDP endpoint); it may accept with its own DirectRequest (section 13.2)."""

    peer: str = wire(Kind.TEXT, max_len=MAX_USERNAME_BYTES)


# --- account self-service (section 14.1; type codes 0x68-0x6F) -----------------
@message(0x68)
class DeleteAccount(Message):
    """Delete my account: the password again, and the username typed as confirmation."""

    password: bytes = wire(Kind.BYTES, max_len=MAX_PASSWORD_BYTES)
    confirm: str = wire(Kind.TEXT, max_len=MAX_USERNAME_BYTES)


@message(0x69)
class AccountDeleted(Message):
    """The answer to DeleteAccount; when ``deleted`` the server then closes the session."""

    deleted: bool = wire(Kind.BOOL)
    reason: str = wire(Kind.TEXT, max_len=MAX_REASON_BYTES)


# --- store and forward (section 15; type codes 0x80-0x8F) --------------------------
SIGNED_PREKEY_BYTES = 4 + 32 + cu.MLKEM768_ENCAPSULATION_KEY_BYTES + 64  # id, X25519, ML-KEM ek, signature
ONE_TIME_PREKEY_BYTES = 4 + 32 + 64  # id, X25519, signature
MAX_PREKEYS_PER_PUBLISH = 100
MSG_REF_BYTES = 16


@message(0x80)
class PublishPrekeys(Message):
    """Client to server: a new signed prekey (or none: keep the current one) and one-time prekeys;
    ``replace`` drops every one-time prekey the server still holds first."""

    signed_prekey: bytes = wire(Kind.BYTES, max_len=SIGNED_PREKEY_BYTES)
    one_time: bytes = wire(Kind.BYTES, max_len=ONE_TIME_PREKEY_BYTES * MAX_PREKEYS_PER_PUBLISH)
    replace: bool = wire(Kind.BOOL, default=False)


@message(0x81)
class PrekeyStatus(Message):
    """Server to client, after login and after PublishPrekeys: what the server holds of its prekeys."""

    one_time_left: int = wire(Kind.U32)
    signed_prekey_id: int = wire(Kind.U32)  # 0: none
    signed_prekey_age_s: int = wire(Kind.U32)


@message(0x82)
class OfflineOpen(Message):
    """Client to server: start an offline conversation with ``peer`` (its prekey bundle and a KDC key)."""

    peer: str = wire(Kind.TEXT, max_len=MAX_USERNAME_BYTES)


@message(0x83)
class OfflineKey(Message):
    """The answer to OfflineOpen: the KDC key of a new generation, the peer's identity and prekeys."""

    conversation_id: int = wire(Kind.U64)
    peer: str = wire(Kind.TEXT, max_len=MAX_USERNAME_BYTES)
    suite: int = wire(Kind.U8)
    generation: int = wire(Kind.U32)
    key: bytes = wire(Kind.BYTES, max_len=64)
    peer_identity: bytes = wire(Kind.BYTES, exact=32, max_len=32)
    signed_prekey: bytes = wire(Kind.BYTES, exact=SIGNED_PREKEY_BYTES, max_len=SIGNED_PREKEY_BYTES)
    one_time_prekey: bytes = wire(Kind.BYTES, max_len=ONE_TIME_PREKEY_BYTES)  # empty: none left


@message(0x84)
class Store(Message):
    """Client to server: keep ``payload`` for the other member of ``conversation_id`` until it is acknowledged."""

    conversation_id: int = wire(Kind.U64)
    generation: int = wire(Kind.U32)
    msg_ref: bytes = wire(Kind.BYTES, exact=MSG_REF_BYTES, max_len=MSG_REF_BYTES)
    payload: bytes = wire(Kind.BYTES, max_len=MAX_PAYLOAD_BYTES)


class StoreStatus(enum.IntEnum):
    STORED = 1  # kept for the recipient, who is offline
    HANDED_OVER = 2  # kept, and sent to the recipient's session now
    REFUSED = 3  # not kept: the reason says why (a bound, no such conversation)
    NO_KEY = 4  # not kept: the offline key of that generation is gone; open a new one


@message(0x85)
class StoreResult(Message):
    conversation_id: int = wire(Kind.U64)
    msg_ref: bytes = wire(Kind.BYTES, exact=MSG_REF_BYTES, max_len=MSG_REF_BYTES)
    status: int = wire(Kind.U8)
    reason: str = wire(Kind.TEXT, max_len=MAX_REASON_BYTES)


@message(0x86)
class StoredMessage(Message):
    """Server to client: a stored message, with the KDC key of its generation, until acknowledged."""

    queue_id: int = wire(Kind.U64)
    conversation_id: int = wire(Kind.U64)
    sender: str = wire(Kind.TEXT, max_len=MAX_USERNAME_BYTES)
    suite: int = wire(Kind.U8)
    generation: int = wire(Kind.U32)
    key: bytes = wire(Kind.BYTES, max_len=64)
    sender_identity: bytes = wire(Kind.BYTES, exact=32, max_len=32)
    stored_at_ms: int = wire(Kind.U64)
    payload: bytes = wire(Kind.BYTES, max_len=MAX_PAYLOAD_BYTES)


@message(0x87)
class Ack(Message):
    """Client to server: the stored message ``queue_id`` reached this client; delete it."""

    queue_id: int = wire(Kind.U64)


@message(0x88)
class Defer(Message):
    """Client to server: keep ``queue_id`` (its sender's identity waits for /accept, or its key is
    missing), send it again at the next login, and count it no longer against the window."""

    queue_id: int = wire(Kind.U64)


# --- group rooms (section 16; type codes 0x90-0x9F) --------------------------------
MAX_CHANGE_BYTES = 40 * 1024  # a signed membership change lists every member (rooms.HARD_MAX_MEMBERS)
MAX_ROOM_NAME_BYTES = 33


@message(0x90)
class RoomCreate(Message):
    """Client to server: a new room; ``change`` is its creation, signed by the creator (rooms.py)."""

    change: bytes = wire(Kind.BYTES, max_len=MAX_CHANGE_BYTES)


@message(0x91)
class RoomChange(Message):
    """Client to server: add, remove (the admin), leave (a member) or close (the admin), signed."""

    room_id: int = wire(Kind.U64)
    change: bytes = wire(Kind.BYTES, max_len=MAX_CHANGE_BYTES)


class RoomStatus(enum.IntEnum):
    OK = 1  # done: committed, and sent to every member
    STALE = 2  # the room changed meanwhile (``epoch`` is its epoch now): the change waits in the queue
    REFUSED = 3  # not done: the reason says why (unknown room, not the admin, full, unknown user...)


@message(0x92)
class RoomResult(Message):
    """The answer to RoomCreate, RoomChange; on OK the room's handle, the new epoch, and its room key."""

    room: str = wire(Kind.TEXT, max_len=MAX_ROOM_NAME_BYTES)
    room_id: int = wire(Kind.U64)
    epoch: int = wire(Kind.U32)
    status: int = wire(Kind.U8)
    suite: int = wire(Kind.U8)
    key: bytes = wire(Kind.BYTES, max_len=64)
    reason: str = wire(Kind.TEXT, max_len=MAX_REASON_BYTES)


@message(0x93)
class RoomSend(Message):
    """Client to server: ``payload`` (sealed end to end, rooms.py) for every other member of the room."""

    room_id: int = wire(Kind.U64)
    epoch: int = wire(Kind.U32)
    msg_ref: bytes = wire(Kind.BYTES, exact=MSG_REF_BYTES, max_len=MSG_REF_BYTES)
    payload: bytes = wire(Kind.BYTES, max_len=MAX_PAYLOAD_BYTES)


@message(0x94)
class RoomSendResult(Message):
    """The answer to RoomSend: sent (to so many online, stored for so many), stale, or refused."""

    room_id: int = wire(Kind.U64)
    msg_ref: bytes = wire(Kind.BYTES, exact=MSG_REF_BYTES, max_len=MSG_REF_BYTES)
    status: int = wire(Kind.U8)
    epoch: int = wire(Kind.U32)
    online: int = wire(Kind.U32)
    stored: int = wire(Kind.U32)
    reason: str = wire(Kind.TEXT, max_len=MAX_REASON_BYTES)


@message(0x95)
class RoomMessage(Message):
    """Server to client: a room message, live (``queue_id`` 0) or stored (acknowledged with Ack;
    ``key`` is then the room key of its epoch)."""

    queue_id: int = wire(Kind.U64)
    room_id: int = wire(Kind.U64)
    sender: str = wire(Kind.TEXT, max_len=MAX_USERNAME_BYTES)
    epoch: int = wire(Kind.U32)
    key: bytes = wire(Kind.BYTES, max_len=64)
    stored_at_ms: int = wire(Kind.U64)
    payload: bytes = wire(Kind.BYTES, max_len=MAX_PAYLOAD_BYTES)


@message(0x96)
class RoomChanged(Message):
    """Server to client, through the queue (acknowledged with Ack): a signed membership change, the
    identity key of whoever made it, and the room key of the new epoch (none for who left it)."""

    queue_id: int = wire(Kind.U64)
    room_id: int = wire(Kind.U64)
    suite: int = wire(Kind.U8)
    key: bytes = wire(Kind.BYTES, max_len=64)
    actor_identity: bytes = wire(Kind.BYTES, exact=32, max_len=32)
    change: bytes = wire(Kind.BYTES, max_len=MAX_CHANGE_BYTES)


class ErrorCode(enum.IntEnum):
    PROTOCOL = 1
    NOT_AUTHENTICATED = 2
    UNKNOWN_USER = 3
    PEER_OFFLINE = 4
    NOT_A_MEMBER = 5
    UNAVAILABLE = 6
    BAD_REQUEST = 7
    RATE_LIMITED = 8


@message(0x40)
class Error(Message):
    code: int = wire(Kind.U8)
    reason: str = wire(Kind.TEXT, max_len=MAX_REASON_BYTES)


@message(0x41)
class Goodbye(Message):
    """The sender is closing the session, for the reason given."""

    reason: str = wire(Kind.TEXT, max_len=MAX_REASON_BYTES)


@message(0x42)
class KeyUpdate(Message):
    """Record layer: the sender's following records use the next traffic key."""


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


# =============================================================================
# Handshake and session state machines
# =============================================================================
class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"
    # Members are singletons: hash by identity, in C (Enum's own __hash__ is Python code, and
    # the state tables look up (role, state) pairs for every frame).
    __hash__ = object.__hash__


class State(enum.Enum):
    __hash__ = object.__hash__  # as Role: the state tables are read for every frame
    START = "start"
    AWAITING_SERVER_HELLO = "awaiting server hello"
    AWAITING_SERVER_AUTH = "awaiting server auth"
    AWAITING_CLIENT_HELLO = "awaiting client hello"
    AWAITING_CLIENT_FINISHED = "awaiting client finished"
    ESTABLISHED = "established (not logged in)"
    AUTHENTICATED = "authenticated"
    CLOSED = "closed"


@dataclass(frozen=True)
class HandshakeComplete:
    """Event: keys are established and the server proved its identity key."""

    server_key: bytes
    fingerprint: str
    suite: str
    group: str


SIGNATURE_CONTEXT = b"secureim/v1 server handshake signature\x00"

# Messages the *peer* may send us, per state.  A pair missing here closes the connection.
_SESSION_FROM_CLIENT_UNAUTH = {Register, Login, Resume, Goodbye}
_SESSION_FROM_CLIENT_AUTH = {OpenConversation, Relay, WhoRequest, RegisterEndpoint, DirectRequest, Goodbye}
_SESSION_FROM_SERVER_UNAUTH = {AuthOk, AuthFailed, Error, Goodbye}
_SESSION_FROM_SERVER_AUTH = {
    PeerStatus,
    ConversationKey,
    Deliver,
    WhoResponse,
    DirectOffer,
    DirectUnavailable,
    Error,
    Goodbye,
}
# Account self-service (section 14.1).
_SESSION_FROM_CLIENT_AUTH |= {DeleteAccount}
_SESSION_FROM_SERVER_AUTH |= {AccountDeleted}
# Store and forward (section 15).
_SESSION_FROM_CLIENT_AUTH |= {PublishPrekeys, OfflineOpen, Store, Ack, Defer}
_SESSION_FROM_SERVER_AUTH |= {PrekeyStatus, OfflineKey, StoreResult, StoredMessage}
# Group rooms (section 16).
_SESSION_FROM_CLIENT_AUTH |= {RoomCreate, RoomChange, RoomSend}
_SESSION_FROM_SERVER_AUTH |= {RoomResult, RoomSendResult, RoomMessage, RoomChanged}

RECEIVE_TABLE: dict[tuple[Role, State], frozenset] = {
    (Role.SERVER, State.AWAITING_CLIENT_HELLO): frozenset({ClientHello}),
    (Role.SERVER, State.AWAITING_CLIENT_FINISHED): frozenset({ClientFinished}),
    (Role.SERVER, State.ESTABLISHED): frozenset(_SESSION_FROM_CLIENT_UNAUTH),
    (Role.SERVER, State.AUTHENTICATED): frozenset(_SESSION_FROM_CLIENT_AUTH),
    (Role.CLIENT, State.AWAITING_SERVER_HELLO): frozenset({ServerHello, HandshakeError, Puzzle, GroupRetry}),
    (Role.CLIENT, State.AWAITING_SERVER_AUTH): frozenset({ServerAuth}),
    (Role.CLIENT, State.ESTABLISHED): frozenset(_SESSION_FROM_SERVER_UNAUTH),
    (Role.CLIENT, State.AUTHENTICATED): frozenset(_SESSION_FROM_SERVER_AUTH),
}
# Section 13: password change (message types 0x60-0x67), for logged-in clients only.
_SESSION_FROM_CLIENT_AUTH |= {ChangePassword}
_SESSION_FROM_SERVER_AUTH |= {PasswordChanged, PasswordChangeFailed, DirectAsked}
RECEIVE_TABLE[(Role.SERVER, State.AUTHENTICATED)] = frozenset(_SESSION_FROM_CLIENT_AUTH)
RECEIVE_TABLE[(Role.CLIENT, State.AUTHENTICATED)] = frozenset(_SESSION_FROM_SERVER_AUTH)
# What we may send, per state (after the handshake; handshake messages are internal).
SEND_TABLE: dict[tuple[Role, State], frozenset] = {
    (Role.CLIENT, State.ESTABLISHED): frozenset(_SESSION_FROM_CLIENT_UNAUTH),
    (Role.CLIENT, State.AUTHENTICATED): frozenset(_SESSION_FROM_CLIENT_AUTH),
    (Role.SERVER, State.ESTABLISHED): frozenset(_SESSION_FROM_SERVER_UNAUTH),
    (Role.SERVER, State.AUTHENTICATED): frozenset(_SESSION_FROM_SERVER_AUTH),
}


@dataclass
class _KeySchedule:
    c2s: bytes
    s2c: bytes
    server_confirm: bytes
    client_confirm: bytes
    direct_ticket: bytes


def derive_handshake_keys(shared_secret: bytes, transcript_hash: bytes) -> _KeySchedule:
    """HKDF over the DH secret, salted with the transcript hash (docs/PROTOCOL.md, key schedule)."""
    hs = cu.hkdf(shared_secret, salt=transcript_hash, info=cu.label("handshake secret"), length=32)

    def expand(purpose: str) -> bytes:
        return cu.hkdf(hs, salt=None, info=cu.label(purpose), length=32)

    return _KeySchedule(
        c2s=expand("c2s traffic"),
        s2c=expand("s2c traffic"),
        server_confirm=expand("server finished"),
        client_confirm=expand("client finished"),
        direct_ticket=expand("direct ticket"),
    )


class Connection:
    """Common machinery: frame decoding, the state table, the record layer."""

    role: Role

    def __init__(self, *, update_after_bytes: int | None = None) -> None:
        self._frames = FrameDecoder()
        self._outgoing = bytearray()
        self._send_keys: TrafficKeys | None = None
        self._recv_keys: TrafficKeys | None = None
        self._update_after_bytes = update_after_bytes
        self.suite: cu.Suite | None = None
        self.close_reason: str | None = None
        self._transcript = bytearray()
        # Shared by this client and the server only: seals direct-mode tickets for this client.
        self.direct_ticket_key: bytes | None = None

    state: State

    # -- public API --------------------------------------------------------
    def receive_data(self, data: bytes) -> list:
        """Feed bytes from the peer; return the events they complete.

        Raises :class:`ProtocolError` (and moves to CLOSED) on anything the
        protocol does not allow; nothing else escapes for any input.
        """
        if self.state is State.CLOSED:
            raise LocalProtocolError("The connection is closed.")
        events: list = []
        try:
            self._frames.feed(data)
            while self.state is not State.CLOSED:
                body = self._frames.next_frame()
                if body is None:
                    break
                event = self._receive_frame(body)
                if event is not None:
                    events.append(event)
        except ProtocolError as exc:
            self._fail(exc)
            raise
        except DHError as exc:
            self._fail(exc)
            raise RemoteProtocolError(str(exc)) from exc
        return events

    def data_to_send(self) -> bytes:
        """Handshake bytes produced by the state machine, to write to the peer."""
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def send(self, msg: Message) -> bytes:
        """Seal one application message into a frame; returns the bytes to write."""
        allowed = SEND_TABLE.get((self.role, self.state), frozenset())
        if type(msg) not in allowed:
            raise LocalProtocolError(f"Cannot send {type(msg).__name__} in state {self.state.value}.")
        assert self._send_keys is not None
        out = bytearray()
        if self._send_keys.needs_update:
            out += encode_frame(self._send_keys.seal(KeyUpdate().encode()))
            self._send_keys.update()
        out += encode_frame(self._send_keys.seal(msg.encode()))
        self._after_send(msg)
        return bytes(out)

    def farewell(self, reason: str) -> bytes:
        """After a failure: a sealed Goodbye telling the peer why, if keys exist (else b"")."""
        if self._send_keys is None:
            return b""
        try:
            return encode_frame(
                self._send_keys.seal(Goodbye(reason=reason[: MAX_REASON_BYTES // 4]).encode())
            )
        except ProtocolError:
            return b""

    def close(self, reason: str = "closed") -> None:
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            self.close_reason = reason

    @property
    def established(self) -> bool:
        return self.state in (State.ESTABLISHED, State.AUTHENTICATED)

    # -- internals -------------------------------------------------------------
    def _fail(self, exc: Exception) -> None:
        self.close(str(exc))

    def _after_send(self, msg: Message) -> None:
        if isinstance(msg, Goodbye):
            self.close("closed by us")

    def _after_receive(self, msg: Message) -> None:
        if isinstance(msg, Goodbye):
            self.close(f"closed by peer: {msg.reason}")

    def _receive_frame(self, body: bytes):
        if self.established:
            assert self._recv_keys is not None
            plaintext = self._recv_keys.open(body)
            msg = decode_message(plaintext)
            if isinstance(msg, KeyUpdate):
                self._recv_keys.update()
                return None
        else:
            msg = decode_message(body)
        allowed = RECEIVE_TABLE.get((self.role, self.state), frozenset())
        if type(msg) not in allowed:
            raise UnexpectedMessage(f"Unexpected {type(msg).__name__} in state {self.state.value}.")
        if not self.established:
            return self._handshake(msg, body)
        self._after_receive(msg)
        return msg

    def _emit_plain(self, msg: Message) -> bytes:
        body = msg.encode()
        self._outgoing += encode_frame(body)
        return body

    def _install_keys(self, suite: cu.Suite, send_secret: bytes, recv_secret: bytes) -> None:
        limit = self._update_after_bytes or suite.max_bytes_per_key // 2
        self._send_keys = TrafficKeys(suite, send_secret, limit)
        self._recv_keys = TrafficKeys(suite, recv_secret, limit)

    def _handshake(self, msg: Message, body: bytes):  # pragma: no cover - overridden
        raise NotImplementedError


class ClientProtocol(Connection):
    """The client's side: propose a group, check the server's signature and confirmation."""

    role = Role.CLIENT

    def __init__(
        self,
        *,
        group: str = DEFAULT_GROUP,
        suites: tuple[str, ...] = cu.SUITE_NAMES,
        expected_server_key: bytes | None = None,
        tdes_backend: str | None = None,
        update_after_bytes: int | None = None,
        fallback_groups: tuple[str, ...] | None = None,
    ) -> None:
        """``fallback_groups``: groups the server may ask for instead (GroupRetry).  By
        default a post-quantum group falls back to x25519 and a classical one to none."""
        super().__init__(update_after_bytes=update_after_bytes)
        self.state = State.START
        self._dh = DiffieHellman(group)
        if fallback_groups is None:
            fallback_groups = ("x25519",) if group in POST_QUANTUM_GROUPS else ()
        self._groups = tuple(
            dict.fromkeys((self._dh.group.name, *(get_group(g).name for g in fallback_groups)))
        )
        if len(self._groups) > MAX_OFFERED_GROUPS:
            raise LocalProtocolError(f"At most {MAX_OFFERED_GROUPS} groups can be offered.")
        self._group_retried = False
        self._suites = tuple(cu.get_suite(s, tdes_backend=tdes_backend) for s in suites)
        self._expected_server_key = expected_server_key
        self._server_hello: ServerHello | None = None
        self._keys: _KeySchedule | None = None
        self._puzzle_solved = False

    def initiate(self) -> bytes:
        """Start the handshake: returns the ClientHello frame."""
        if self.state is not State.START:
            raise LocalProtocolError("The handshake has already started.")
        self._send_hello()
        self.state = State.AWAITING_SERVER_HELLO
        return self.data_to_send()

    def _send_hello(self, challenge: bytes = b"", solution: bytes = b"") -> None:
        hello = ClientHello(
            version=PROTOCOL_VERSION,
            group=self._dh.group.name,
            public=self._dh.public_bytes,
            nonce=cu.random_bytes(NONCE_BYTES),
            suites=bytes(s.suite_id for s in self._suites),
            puzzle_challenge=challenge,
            puzzle_solution=solution,
            groups=self._groups,
        )
        self._transcript = bytearray(self._emit_plain(hello))  # only the final hello is in the transcript

    def _handshake(self, msg: Message, body: bytes):
        if isinstance(msg, GroupRetry):
            if self._group_retried or self._puzzle_solved:
                raise HandshakeFailed("The server asked for another group twice (or after a puzzle).")
            if msg.group not in self._groups or msg.group == self._dh.group.name:
                raise HandshakeFailed("The server asked for a group this client did not offer.")
            self._group_retried = True
            self._dh = DiffieHellman(msg.group)
            self._send_hello()
            return None
        if isinstance(msg, Puzzle):
            if self._puzzle_solved:
                raise HandshakeFailed("The server sent a second puzzle.")
            try:
                solution = puzzle_solve(msg.challenge, self._dh.public_bytes, msg.difficulty)
            except ValueError as exc:
                raise HandshakeFailed(str(exc)) from None
            self._puzzle_solved = True
            self._send_hello(msg.challenge, solution)
            return None
        if isinstance(msg, HandshakeError):
            try:
                code = HandshakeErrorCode(msg.code).name.lower().replace("_", " ")
            except ValueError:
                code = "unknown reason"
            raise HandshakeFailed(f"The server refused the handshake ({code}).")
        if isinstance(msg, ServerHello):
            if msg.version != PROTOCOL_VERSION:
                raise HandshakeFailed("The server speaks another protocol version.")
            suite = next((s for s in self._suites if s.suite_id == msg.suite), None)
            if suite is None:
                raise HandshakeFailed("The server chose a cipher suite this client did not offer.")
            self.suite = suite
            self._server_hello = msg
            self._transcript += body
            shared = self._dh.generate_shared_secret(msg.public)
            self._keys = derive_handshake_keys(shared, cu.sha256(bytes(self._transcript)))
            self.state = State.AWAITING_SERVER_AUTH
            return None
        assert isinstance(msg, ServerAuth) and self._server_hello and self._keys and self.suite
        th1 = cu.sha256(bytes(self._transcript))
        server_key = self._server_hello.server_key
        if not cu.verify_signature(server_key, msg.signature, SIGNATURE_CONTEXT + th1):
            raise HandshakeFailed("The server's handshake signature is invalid.")
        if not DiffieHellman.verify_hashed_key(self._keys.server_confirm, msg.confirm, th1):
            raise HandshakeFailed("The server's key confirmation is invalid.")
        if self._expected_server_key is not None and not cu.constant_time_equal(
            server_key, self._expected_server_key
        ):
            raise ServerKeyMismatch(
                f"The server's identity key {cu.fingerprint(server_key)} is not the expected "
                f"{cu.fingerprint(self._expected_server_key)}."
            )
        self._transcript += body
        th2 = cu.sha256(bytes(self._transcript))
        self._emit_plain(ClientFinished(confirm=DiffieHellman.hash_key(self._keys.client_confirm, th2)))
        self._install_keys(self.suite, self._keys.c2s, self._keys.s2c)
        self.direct_ticket_key = self._keys.direct_ticket
        self._keys = None
        self.state = State.ESTABLISHED
        return HandshakeComplete(
            server_key=server_key,
            fingerprint=cu.fingerprint(server_key),
            suite=self.suite.name,
            group=self._dh.group.name,
        )

    def _after_receive(self, msg: Message) -> None:
        super()._after_receive(msg)
        if isinstance(msg, AuthOk):
            self.state = State.AUTHENTICATED


class ServerProtocol(Connection):
    """The server's side: answer the group, sign the transcript, check the client's confirmation."""

    role = Role.SERVER

    def __init__(
        self,
        identity: Ed25519PrivateKey,
        *,
        suite: str = cu.DEFAULT_SUITE,
        allowed_groups: frozenset[str] | None = None,
        tdes_backend: str | None = None,
        update_after_bytes: int | None = None,
        puzzle: PuzzleGate | None = None,
        source: str = "",
    ) -> None:
        super().__init__(update_after_bytes=update_after_bytes)
        self.state = State.AWAITING_CLIENT_HELLO
        self._puzzle = puzzle
        self._source = source
        self._puzzles_sent = 0
        self._group_retries = 0
        self._identity = identity
        self._suite = cu.get_suite(suite, tdes_backend=tdes_backend)
        self._allowed_groups = allowed_groups
        self._keys: _KeySchedule | None = None
        self.group: str | None = None

    def _refuse(self, code: HandshakeErrorCode, why: str) -> None:
        self._emit_plain(HandshakeError(code=code))
        raise RemoteProtocolError(why)

    def _handshake(self, msg: Message, body: bytes):
        if isinstance(msg, ClientHello):
            if msg.version != PROTOCOL_VERSION:
                self._refuse(HandshakeErrorCode.UNSUPPORTED_VERSION, "Unsupported protocol version.")
            if self._suite.suite_id not in msg.suites:
                self._refuse(
                    HandshakeErrorCode.UNSUPPORTED_SUITE,
                    f"The client does not offer the {self._suite.name} suite.",
                )
            group = self._choose_group(msg)
            if group is None:
                return None  # a GroupRetry was sent; the client answers with a new ClientHello
            if len(msg.public) != share_length(group):  # sizes first, before any puzzle or DH work
                self._refuse(
                    HandshakeErrorCode.BAD_PUBLIC_VALUE,
                    f"A {group.name} public value is exactly {share_length(group)} bytes.",
                )
            if self._puzzle is not None and not self._puzzle_passed(msg):
                return None  # a Puzzle was sent; the client answers with a new ClientHello
            try:
                public, shared = DiffieHellman.respond(group, msg.public)
            except DHError as exc:
                self._refuse(HandshakeErrorCode.BAD_PUBLIC_VALUE, str(exc))
            self.group = group.name
            self.suite = self._suite
            self._transcript += body
            hello = ServerHello(
                version=PROTOCOL_VERSION,
                suite=self._suite.suite_id,
                public=public,
                nonce=cu.random_bytes(NONCE_BYTES),
                server_key=cu.public_bytes(self._identity),
            )
            self._transcript += self._emit_plain(hello)
            th1 = cu.sha256(bytes(self._transcript))
            self._keys = derive_handshake_keys(shared, th1)
            auth = ServerAuth(
                signature=self._identity.sign(SIGNATURE_CONTEXT + th1),
                confirm=DiffieHellman.hash_key(self._keys.server_confirm, th1),
            )
            self._transcript += self._emit_plain(auth)
            self.state = State.AWAITING_CLIENT_FINISHED
            return None
        assert isinstance(msg, ClientFinished) and self._keys
        th2 = cu.sha256(bytes(self._transcript))
        if not DiffieHellman.verify_hashed_key(self._keys.client_confirm, msg.confirm, th2):
            raise RemoteProtocolError("The client's key confirmation is invalid.")
        self._install_keys(self._suite, self._keys.s2c, self._keys.c2s)
        self.direct_ticket_key = self._keys.direct_ticket
        self._keys = None
        self.state = State.ESTABLISHED
        key = cu.public_bytes(self._identity)
        return HandshakeComplete(
            server_key=key, fingerprint=cu.fingerprint(key), suite=self._suite.name, group=self.group or ""
        )

    def _allows(self, name: str) -> bool:
        return (
            name in GROUPS
            and (self._allowed_groups is None or name in self._allowed_groups)
            and (name not in POST_QUANTUM_GROUPS or cu.mlkem_available())
        )

    def _choose_group(self, msg: ClientHello):
        """The group to use, or None after sending a GroupRetry; refuses a downgrade.

        The server takes the first group in the client's signed list that it allows.
        A client whose share is in a later (weaker) group than that was pushed there
        by someone forging a GroupRetry or HandshakeError: refused (TLS 1.3 section
        4.1.3 protects the same choice with the signed transcript).
        """
        offered = msg.groups or (msg.group,)
        if msg.group not in offered:
            self._refuse(
                HandshakeErrorCode.PROTOCOL, "The client's key share is for a group it did not offer."
            )
        best = next((name for name in offered if self._allows(name)), None)
        if best is None:
            try:
                group = get_group(msg.group)
                raise UnsupportedGroup(f"Diffie-Hellman group {group.name!r} is disabled on this server.")
            except DHError as exc:
                self._refuse(HandshakeErrorCode.UNSUPPORTED_GROUP, str(exc))
        if msg.group == best:
            return get_group(best)
        if self._allows(msg.group):
            self._refuse(
                HandshakeErrorCode.DOWNGRADE,
                f"Downgrade refused: the client offered {best!r} but used {msg.group!r}.",
            )
        if self._group_retries:
            self._refuse(HandshakeErrorCode.UNSUPPORTED_GROUP, "The client ignored the group retry.")
        self._group_retries += 1
        self._emit_plain(GroupRetry(group=best))
        return None

    def _puzzle_passed(self, msg: ClientHello) -> bool:
        """Before any DH work: a puzzle solved, or none needed; else send one (at most once)."""
        assert self._puzzle is not None
        need = self._puzzle.difficulty()
        if need == 0 and not msg.puzzle_challenge:
            return True
        if not msg.puzzle_challenge:
            if self._puzzles_sent:
                self._refuse(HandshakeErrorCode.PUZZLE_FAILED, "The client ignored the puzzle.")
            self._puzzles_sent += 1
            self._emit_plain(Puzzle(challenge=self._puzzle.issue(self._source, need), difficulty=need))
            return False
        why = self._puzzle.check(self._source, msg.puzzle_challenge, msg.public, msg.puzzle_solution, need)
        if why is not None:
            self._refuse(HandshakeErrorCode.PUZZLE_FAILED, why)
        return True

    def _after_send(self, msg: Message) -> None:
        super()._after_send(msg)
        if isinstance(msg, AuthOk):
            self.state = State.AUTHENTICATED
