"""Every message on the wire, one frozen dataclass each (docs/PROTOCOL.md)."""

from __future__ import annotations

import enum

import crypto_utils as cu
from diffiehellman import (
    MAX_GROUP_NAME_BYTES,
)
from secureim.proto.codec import Kind, Message, message, wire
from secureim.proto.limits import (
    MAX_OFFERED_GROUPS,
    MAX_PASSWORD_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_PUBLIC_VALUE_BYTES,
    MAX_REASON_BYTES,
    MAX_RESPONSE_VALUE_BYTES,
    MAX_TICKET_BYTES,
    MAX_USERNAME_BYTES,
    MAX_WHO_USERS,
    NONCE_BYTES,
)


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
