"""What the storage hands back: small frozen records, and the limits of every column."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("secureim.database")


# The top-level schema.sql: every MySQL migration concatenated, for the mysql client (generated).
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schema.sql"
SCHEMA_LOCK_WAIT_S = 60  # how long a starting server waits for another one applying migrations
POOL_SIZE = 4
POOL_WAIT_S = 10.0
CONNECT_TIMEOUT_S = 5
OFFLINE_KEY_GRACE_S = 24 * 3600.0  # an acknowledged key is kept this long: the sender may still be writing
ADMIN_ACTION_KEEP_S = 3600.0  # the servers poll every second; an hour of actions is plenty


@dataclass(frozen=True)
class Conversation:
    id: int
    members: tuple[str, str]
    key_generation: int
    key_generated_at: float | None


@dataclass(frozen=True)
class LoginFailures:
    failures: int
    locked_until: float


# --- operating the server (admin.py, moderation.py): audit, bans, sessions --------
@dataclass(frozen=True)
class AuditEvent:
    at: float
    event: str
    username: str
    source: str
    detail: str


@dataclass(frozen=True)
class Ban:
    kind: str  # "user" or "address"
    target: str  # a username, or a network in CIDR form
    until: float  # 0 = until unbanned
    reason: str


@dataclass(frozen=True)
class AdminAction:
    id: int
    action: str  # "kick" (ban, reset and delete post one too), or "address" (re-read address bans)
    username: str
    reason: str


@dataclass(frozen=True)
class UserInfo:
    username: str
    created_at: float
    last_login_at: float | None
    locked: bool


@dataclass(frozen=True)
class LiveSession:
    node: str
    username: str
    source: str
    since: float


@dataclass(frozen=True)
class Lockout:
    username: str
    source: str
    failures: int
    locked_until: float


@dataclass(frozen=True)
class QueuedMessage:
    """One stored message (docs/PROTOCOL.md section 15): ciphertext and routing only."""

    id: int
    recipient: str
    sender: str
    conversation_id: int
    generation: int
    msg_ref: bytes  # the sender's 16-byte reference: a resend of the same message is not stored twice
    sender_identity: bytes  # the sender's identity key when it was stored
    payload: bytes  # the end-to-end payload, opaque to the server
    stored_at: float
    wrapped_key: (
        bytes | None
    )  # the KDC key of (conversation, generation), or of (room, epoch), sealed by the server
    room_id: int = 0  # a room row's room (conversation_id is then 0 and generation the room's epoch)
    kind: int = 0  # KIND_PAIR, KIND_ROOM_MESSAGE or KIND_ROOM_CHANGE


@dataclass(frozen=True)
class Room:
    """A group room as the server keeps it (rooms.py): routing and the head of its signed change log."""

    id: int
    name: str
    uid: bytes  # the room's random 16-byte id, named in every change
    admin: str
    epoch: int  # 1 at the creation, +1 per change
    head: bytes  # the 32-byte hash of the latest change
    members: tuple[str, ...]  # sorted by name


@dataclass(frozen=True)
class PrekeyStatus:
    one_time_left: int
    signed_id: int | None
    signed_at: float | None


# enqueue() answers (room_enqueue() answers the first four per recipient, and NO_USER)
STORED, DUPLICATE, FULL_MESSAGES, FULL_BYTES, NO_KEY = (
    "stored",
    "duplicate",
    "full_messages",
    "full_bytes",
    "no_key",
)
NO_USER = "no_user"  # room_enqueue(): the recipient has no account (deleted, still listed in a room)
# change_room() answers
ROOM_OK, ROOM_STALE, ROOM_GONE = "ok", "stale", "gone"
# message_queue.kind
KIND_PAIR, KIND_ROOM_MESSAGE, KIND_ROOM_CHANGE = 0, 1, 2

# Bounds of the room columns (schema.sql): checked before any statement, so bad input is a
# ValueError on both backends instead of a truncation on one and a stored oddity on the other.
MAX_ROOM_NAME_CHARS = 33
MAX_USERNAME_CHARS = 32
ROOM_UID_BYTES = 16
ROOM_HEAD_BYTES = 32
MSG_REF_BYTES = 16
MAX_IDENTITY_BYTES = 32  # message_queue.sender_identity
MAX_WRAPPED_KEY_BYTES = 128  # room_keys.wrapped
MAX_BLOB_BYTES = (1 << 24) - 1  # MEDIUMBLOB: a change or a payload
MAX_EPOCH = (1 << 32) - 1  # INT UNSIGNED
MAX_DB_ID = (1 << 63) - 1  # SQLite integers are signed 64-bit

BAN_KINDS = ("user", "address")
MAX_AUDIT_DETAIL = 200
MAX_REASON_CHARS = 200
