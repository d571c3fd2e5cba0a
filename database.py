"""Storage: one interface, two backends (embedded SQLite, MySQL/MariaDB via pymysql).

The server stores users (name, bcrypt hash), conversations (id, members, when
the key was last generated and how many times) and failed-login bookkeeping.
It never stores a live conversation key (design 000).  For offline delivery
(docs/PROTOCOL.md section 15) it keeps public prekeys, end-to-end ciphertext per
recipient, and the KDC key of each offline conversation sealed under the
server's own key: none of it opens a stored message.

Every statement takes parameters; no SQL is built from strings.  On MySQL every
query is a stored procedure from schema.sql.  Connections come from a small pool
(pymysql connections are not thread-safe); a dropped connection is replaced and
the call retried once; a database that stays down raises
:class:`errors.DatabaseUnavailable`, which the server turns into "try again later".
"""

from __future__ import annotations

import logging
import os
import queue
import re
import sqlite3
import threading
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from errors import ConfigError, DatabaseError, DatabaseUnavailable

log = logging.getLogger("secureim.database")

SCHEMA_PATH = Path(__file__).resolve().parent / "schema.sql"
SCHEMA_LOCK_WAIT_S = 60  # how long a starting server waits for another one applying the schema
POOL_SIZE = 4
POOL_WAIT_S = 10.0
CONNECT_TIMEOUT_S = 5


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


class _Pool:
    """A fixed-size pool of connections made by ``factory``; broken ones are replaced."""

    def __init__(self, factory, size: int = POOL_SIZE) -> None:
        self._factory = factory
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._closed = False

    @contextmanager
    def connection(self) -> Iterator[Any]:
        if self._closed:
            raise DatabaseUnavailable("The database is closed.")
        if not self._slots.acquire(timeout=POOL_WAIT_S):
            raise DatabaseUnavailable("The database is busy; try again later.")
        conn = None
        try:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self._factory()
            yield conn
        except BaseException:
            if conn is not None:
                _close_quietly(conn)
                conn = None
            raise
        finally:
            if conn is not None:
                self._idle.put(conn)
            self._slots.release()

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                _close_quietly(self._idle.get_nowait())
            except queue.Empty:
                return


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - closing a broken connection may fail; nothing to do
        pass


class Storage:
    """The storage contract.  Both backends implement exactly these methods."""

    backend = "abstract"

    def create_user(self, username: str, password_hash: str, identity_key: bytes | None = None) -> bool:
        """Create the user; False if the name is taken, by an account or by a deleted account still listed
        as a member of a room (a "ghost", until the room's admin removes it with a signed change): a
        newcomer under that name would otherwise receive the copies and room keys meant for the member."""
        raise NotImplementedError

    def get_identity_key(self, username: str) -> bytes | None:
        """The user's registered Ed25519 identity public key (public; the private key never leaves the client)."""
        raise NotImplementedError

    def set_identity_key(self, username: str, identity_key: bytes) -> None:
        raise NotImplementedError

    def get_password_hash(self, username: str) -> str | None:
        raise NotImplementedError

    def count_users(self) -> int:
        raise NotImplementedError

    def get_ticket_epoch(self, username: str) -> int | None:
        """The account's ticket epoch (tickets carrying another one are void); None if no such user."""
        raise NotImplementedError

    def change_password_hash(self, username: str, password_hash: str) -> int | None:
        """Store the new hash and increment the ticket epoch, at once; the new epoch, or None if no such user."""
        raise NotImplementedError

    def open_conversation(self, user_a: str, user_b: str) -> int:
        """The id of the conversation between the two users, created if new."""
        raise NotImplementedError

    def record_key_generation(self, conversation_id: int) -> int:
        """Note that a new key was generated now; returns the new generation number."""
        raise NotImplementedError

    def get_conversation(self, conversation_id: int) -> Conversation | None:
        raise NotImplementedError

    def get_login_failures(self, username: str, source: str) -> LoginFailures:
        raise NotImplementedError

    def record_login_failure(
        self, username: str, source: str, now: float, max_failures: int, lock_s: float
    ) -> LoginFailures:
        raise NotImplementedError

    def clear_login_failures(self, username: str, source: str) -> None:
        raise NotImplementedError

    # -- operating the server -------------------------------------------------------
    def audit(
        self, event: str, username: str = "", source: str = "", detail: str = "", at: float | None = None
    ) -> None:
        """Append one audit row.  Callers never pass passwords, keys or message text."""
        raise NotImplementedError

    def audit_events(
        self, username: str | None = None, since: float = 0.0, limit: int = 1000
    ) -> list[AuditEvent]:
        """Audit rows, oldest first, at or after ``since`` (for one user if given)."""
        raise NotImplementedError

    def prune_audit(self, before: float) -> int:
        """Delete audit rows older than ``before``; returns how many."""
        raise NotImplementedError

    def set_ban(self, kind: str, target: str, until: float, reason: str) -> None:
        raise NotImplementedError

    def remove_ban(self, kind: str, target: str) -> bool:
        raise NotImplementedError

    def active_bans(self, now: float, kind: str | None = None) -> list[Ban]:
        raise NotImplementedError

    def user_ban(self, username: str, now: float) -> Ban | None:
        raise NotImplementedError

    def post_admin_action(self, action: str, username: str, reason: str) -> int:
        """Queue an action for the running server(s); returns its id."""
        raise NotImplementedError

    def admin_actions_after(self, last_id: int) -> list[AdminAction]:
        raise NotImplementedError

    def last_admin_action_id(self) -> int:
        raise NotImplementedError

    def bump_ticket_epoch(self, username: str) -> None:
        raise NotImplementedError

    def set_password_hash(self, username: str, password_hash: str) -> bool:
        raise NotImplementedError

    def record_login(self, username: str, now: float) -> None:
        raise NotImplementedError

    def list_users(self, now: float) -> list[UserInfo]:
        raise NotImplementedError

    def delete_user(self, username: str) -> bool:
        """Remove the account and everything kept for it: conversations, lockouts, sessions, prekeys,
        offline keys, its one-to-one messages to and from it, its room messages, and everything queued for
        it.  Rooms are not edited (a membership change is signed by a client; the server cannot make one):
        the user stays listed in room_members (a "ghost", whose name create_user() refuses, until the admin
        removes it with a signed change), the rooms it administers stay with their members, changes and
        keys, and the change rows it made that are queued for others stay (each is a link in every
        member's chain).  False if there was no such account."""
        raise NotImplementedError

    def list_lockouts(self, now: float) -> list[Lockout]:
        raise NotImplementedError

    def clear_all_login_failures(self, username: str) -> int:
        raise NotImplementedError

    def session_started(self, node: str, username: str, source: str, since: float) -> None:
        raise NotImplementedError

    def record_session_start(self, node: str, username: str, source: str, now: float, event: str) -> None:
        """A login's bookkeeping in one transaction: last login, the session row, the audit row."""
        raise NotImplementedError

    def session_ended(self, node: str, username: str) -> None:
        raise NotImplementedError

    def clear_sessions(self, node: str) -> None:
        raise NotImplementedError

    def list_sessions(self) -> list[LiveSession]:
        raise NotImplementedError

    # -- store and forward (docs/PROTOCOL.md section 15) -----------------------------
    def set_signed_prekey(self, username: str, key_id: int, entry: bytes, now: float) -> None:
        raise NotImplementedError

    def add_one_time_prekeys(self, username: str, entries: list[tuple[int, bytes]], max_kept: int) -> int:
        """Add (id, entry) pairs, keeping at most ``max_kept``; returns how many are stored now."""
        raise NotImplementedError

    def prekey_status(self, username: str) -> PrekeyStatus:
        raise NotImplementedError

    def take_prekey_bundle(self, username: str) -> tuple[bytes | None, bytes | None]:
        """(signed prekey entry, one one-time prekey entry): the one-time prekey is deleted in the
        same transaction, so two senders never get the same one."""
        raise NotImplementedError

    def clear_prekeys(self, username: str, *, signed: bool) -> None:
        """Drop the user's one-time prekeys (and the signed one: after an identity change)."""
        raise NotImplementedError

    def put_offline_key(
        self, recipient: str, conversation_id: int, generation: int, sender: str, wrapped: bytes, now: float
    ) -> None:
        raise NotImplementedError

    def enqueue(self, msg: QueuedMessage, max_messages: int, max_bytes: int) -> tuple[str, int]:
        """Store ``msg`` for its recipient unless a bound says no: (STORED|DUPLICATE, id) or
        (FULL_MESSAGES|FULL_BYTES|NO_KEY, 0).  Nothing already stored is ever touched."""
        raise NotImplementedError

    def queued_for(self, recipient: str, after_id: int, limit: int) -> list[QueuedMessage]:
        """The recipient's stored messages after ``after_id``, oldest first (pair and room rows in one id
        order), with their KDC keys: a pair row's from offline_keys; a room row's is the room key of
        (room_id, generation), None once that key is gone.  A change row (KIND_ROOM_CHANGE) carries the key
        only if the recipient is a member now and joined at or before that epoch: the change that removed
        someone reaches them without the key of the epoch they are no longer in."""
        raise NotImplementedError

    def ack_queued(self, recipient: str, message_id: int) -> bool:
        """The recipient's client has the message: delete it (and, for a pair row, its key once no message
        needs it; a room key is left to expire_queue)."""
        raise NotImplementedError

    def expire_queue(self, before: float) -> int:
        """Delete pair and room-message rows stored before ``before`` (change rows never expire: a member
        must not miss a change), offline keys no row needs, and room keys older than ``before`` of an epoch
        past (or of a room gone, closed) that no queued row needs: no room message of that epoch, and no
        change row of it that queued_for() would hand the key with (its recipient a member who joined by
        then; never so for a closed room).  Returns how many queued rows went."""
        raise NotImplementedError

    # -- group rooms (rooms.py, docs/PROTOCOL.md section 16) ------------------------------
    def create_room(
        self,
        name: str,
        uid: bytes,
        admin: str,
        head: bytes,
        change: bytes,
        wrapped_key: bytes,
        msg_ref: bytes,
        admin_identity: bytes,
        now: float,
    ) -> int | None:
        """A new room at epoch 1, its admin its only member (joined_epoch 1), the change in the log, the key
        of epoch 1, and the change queued (kind 2, sender=admin, sender_identity=admin_identity, msg_ref) for
        the admin; in one transaction.  Returns the room id, or None if the name is taken.  ValueError on
        input out of bounds, or if ``msg_ref`` is already queued from the admin to the admin."""
        raise NotImplementedError

    def get_room(self, name: str) -> Room | None:
        """The room of that name (None for a name that cannot be one)."""
        raise NotImplementedError

    def get_room_by_id(self, room_id: int) -> Room | None:
        raise NotImplementedError

    def rooms_of(self, username: str) -> list[Room]:
        """The rooms ``username`` is a member of, by name."""
        raise NotImplementedError

    def change_room(
        self,
        room_id: int,
        expected_epoch: int,
        head: bytes,
        *,
        add: str | None = None,
        remove: str | None = None,
        close: bool = False,
        change: bytes,
        wrapped_key: bytes | None,
        actor: str,
        actor_identity: bytes,
        msg_ref: bytes,
        now: float,
    ) -> tuple[str, int]:
        """One membership change, atomically: if the room is gone -> (ROOM_GONE, 0); if its epoch is not
        expected_epoch -> (ROOM_STALE, current epoch); else epoch+1, head=head, add (joined_epoch = new
        epoch) or remove the member, the change in room_changes, wrapped_key (if not None) in room_keys for
        the new epoch, and the change queued (kind 2, generation = new epoch, payload = change, sender =
        actor, sender_identity = actor_identity, msg_ref) for every member after the change and for the
        removed user, each only if they have an account (nothing is queued for a ghost); with close=True
        the change is queued for all who were members and the room row, its members and changes are
        deleted (the name is free again) but not its room keys: the room messages still queued for members
        who were away still come with their key, and expire_queue() drops the keys once no row needs them.
        Change rows ignore the queue bounds (a member must never miss a change).  Returns (ROOM_OK, new
        epoch).

        Exactly one of add, remove and close.  ValueError (nothing changed) on input out of bounds, on
        adding a member, removing a non-member or the admin (close the room instead), or on a msg_ref
        already queued from ``actor`` to one of the recipients."""
        raise NotImplementedError

    def room_enqueue(
        self,
        room_id: int,
        epoch: int,
        sender: str,
        sender_identity: bytes,
        msg_ref: bytes,
        payload: bytes,
        recipients: list[str],
        now: float,
        max_messages: int,
        max_bytes: int,
    ) -> dict[str, str]:
        """A room message (kind 1, generation = epoch) for each of ``recipients`` (the server passes those
        offline); each recipient's bound counts all their rows, change rows included, as in enqueue().  Per
        recipient: NO_USER (no account: deleted, and still listed until the admin removes it; nothing is
        queued), STORED, DUPLICATE (the same sender and msg_ref already queued for them), FULL_MESSAGES or
        FULL_BYTES.  One transaction; membership is the caller's to check."""
        raise NotImplementedError

    def room_key(self, room_id: int, epoch: int) -> bytes | None:
        """The room key of that epoch, sealed by the server; None if there is none (any more).  A closed
        room's keys are still there until expire_queue() drops them."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _pair(user_a: str, user_b: str) -> tuple[str, str]:
    if user_a == user_b:
        raise DatabaseError("A conversation needs two different users.")
    return (user_a, user_b) if user_a < user_b else (user_b, user_a)


# --- rooms: bounds and answers shared by both backends ---------------------------------
def _is_name(value: object, max_chars: int) -> bool:
    """A room or user name the room tables can hold: 1..max_chars printable ASCII, no space and no comma
    (sp_room_enqueue takes its recipients comma-separated)."""
    return (
        isinstance(value, str)
        and 1 <= len(value) <= max_chars
        and value.isascii()
        and value.isprintable()
        and " " not in value
        and "," not in value
    )


def _is_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check_name(value: object, max_chars: int, what: str) -> None:
    if not _is_name(value, max_chars):
        raise ValueError(
            f"{what} must be 1 to {max_chars} printable ASCII characters without spaces or commas."
        )


def _check_bytes(value: object, what: str, low: int, high: int) -> None:
    if not isinstance(value, bytes) or not low <= len(value) <= high:
        size = f"{low} bytes" if low == high else f"{low} to {high} bytes"
        raise ValueError(f"{what} must be {size}.")


def _check_room_id(room_id: object) -> None:
    if not _is_int(room_id, 1, MAX_DB_ID):
        raise ValueError("A room id is a positive 63-bit integer.")


def _check_epoch(epoch: object) -> None:
    if not _is_int(epoch, 0, MAX_EPOCH):
        raise ValueError("A room epoch is a 32-bit unsigned integer.")


def _check_sender(sender: object, identity: object, msg_ref: object) -> None:
    _check_name(sender, MAX_USERNAME_CHARS, "A sender's name")
    _check_bytes(identity, "A sender's identity key", 1, MAX_IDENTITY_BYTES)
    _check_bytes(msg_ref, "A message reference", MSG_REF_BYTES, MSG_REF_BYTES)


def _check_create_room(name, uid, admin, head, change, wrapped_key, msg_ref, admin_identity) -> None:
    _check_name(name, MAX_ROOM_NAME_CHARS, "A room name")
    _check_bytes(uid, "A room uid", ROOM_UID_BYTES, ROOM_UID_BYTES)
    _check_bytes(head, "A room head", ROOM_HEAD_BYTES, ROOM_HEAD_BYTES)
    _check_bytes(change, "A room change", 1, MAX_BLOB_BYTES)
    _check_bytes(wrapped_key, "A wrapped room key", 1, MAX_WRAPPED_KEY_BYTES)
    _check_sender(admin, admin_identity, msg_ref)


def _check_change_room(
    expected_epoch, head, add, remove, close, change, wrapped_key, actor, actor_identity, msg_ref
) -> None:
    _check_epoch(expected_epoch)
    _check_bytes(head, "A room head", ROOM_HEAD_BYTES, ROOM_HEAD_BYTES)
    if (add is not None) + (remove is not None) + bool(close) != 1:
        raise ValueError("A room change adds a member, removes one or closes the room: exactly one of them.")
    if add is not None:
        _check_name(add, MAX_USERNAME_CHARS, "The name of the member to add")
    if remove is not None:
        _check_name(remove, MAX_USERNAME_CHARS, "The name of the member to remove")
    _check_bytes(change, "A room change", 1, MAX_BLOB_BYTES)
    if wrapped_key is not None:
        _check_bytes(wrapped_key, "A wrapped room key", 1, MAX_WRAPPED_KEY_BYTES)
    _check_sender(actor, actor_identity, msg_ref)


# Why a room write was refused with nothing changed: the code both backends answer, and its words.
_ROOM_REFUSALS = {
    "member": "{add} is already a member of the room.",
    "not_member": "{remove} is not a member of the room.",
    "admin": "The admin cannot be removed from the room; close it instead.",
    "ref_used": "That message reference is already queued from {actor}; a change needs a fresh one.",
    "epoch_full": "The room's epoch cannot grow any further.",
}


def _refuse(code: str, **names: object) -> ValueError:
    return ValueError(_ROOM_REFUSALS[code].format(**names))


def _rooms_from_rows(rows) -> list[Room]:
    """Rooms from rows of (id, name, uid, admin, epoch, head, member or None), one row per member."""
    found: dict[int, tuple[tuple, list[str]]] = {}
    for r in rows:
        _, members = found.setdefault(
            int(r[0]), ((int(r[0]), r[1], bytes(r[2]), r[3], int(r[4]), bytes(r[5])), [])
        )
        if r[6] is not None:
            members.append(r[6])
    rooms = [Room(*fields, tuple(sorted(members))) for fields, members in found.values()]
    return sorted(rooms, key=lambda room: room.name)


def _room_targets(room_id, epoch, sender, sender_identity, msg_ref, payload, recipients) -> list[str]:
    """room_enqueue()'s input checked; its recipients once each, sorted: the order the rows are locked in,
    so two room messages in flight never wait on each other in a circle."""
    _check_room_id(room_id)
    _check_epoch(epoch)
    _check_sender(sender, sender_identity, msg_ref)
    _check_bytes(payload, "A room message", 1, MAX_BLOB_BYTES)
    if isinstance(recipients, (str, bytes)):
        raise ValueError("The recipients of a room message are a list of names.")
    for recipient in recipients:
        _check_name(recipient, MAX_USERNAME_CHARS, "A recipient's name")
    return sorted(set(recipients))


def _check_pair_row(msg: QueuedMessage) -> None:
    if msg.kind != KIND_PAIR or msg.room_id != 0:
        raise ValueError(
            "enqueue() stores one-to-one messages; room rows go through room_enqueue() and change_room()."
        )


# =============================================================================
# SQLite (embedded default)
# =============================================================================
_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    username      TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at    REAL NOT NULL,
    identity_key  BLOB,
    ticket_epoch  INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS conversations (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    user_low         TEXT NOT NULL,
    user_high        TEXT NOT NULL,
    created_at       REAL NOT NULL,
    key_generated_at REAL,
    key_generation   INTEGER NOT NULL DEFAULT 0,
    UNIQUE (user_low, user_high)
);
CREATE TABLE IF NOT EXISTS conversation_members (
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    username        TEXT NOT NULL,
    PRIMARY KEY (conversation_id, username)
);
CREATE TABLE IF NOT EXISTS login_failures (
    username     TEXT NOT NULL,
    source       TEXT NOT NULL,
    failures     INTEGER NOT NULL DEFAULT 0,
    locked_until REAL NOT NULL DEFAULT 0,
    updated_at   REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (username, source)
);
CREATE TABLE IF NOT EXISTS account_state (
    username      TEXT NOT NULL PRIMARY KEY,
    last_login_at REAL
);
CREATE TABLE IF NOT EXISTS audit_log (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    at       REAL NOT NULL,
    event    TEXT NOT NULL,
    username TEXT NOT NULL DEFAULT '',
    source   TEXT NOT NULL DEFAULT '',
    detail   TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS ix_audit_at ON audit_log (at);
CREATE INDEX IF NOT EXISTS ix_audit_user ON audit_log (username, at);
CREATE TABLE IF NOT EXISTS bans (
    kind       TEXT NOT NULL,
    target     TEXT NOT NULL,
    until      REAL NOT NULL DEFAULT 0,
    reason     TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    PRIMARY KEY (kind, target)
);
CREATE TABLE IF NOT EXISTS admin_actions (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    at       REAL NOT NULL,
    action   TEXT NOT NULL,
    username TEXT NOT NULL DEFAULT '',
    reason   TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS live_sessions (
    node     TEXT NOT NULL,
    username TEXT NOT NULL,
    source   TEXT NOT NULL,
    since    REAL NOT NULL,
    PRIMARY KEY (node, username)
);
CREATE TABLE IF NOT EXISTS signed_prekeys (
    username   TEXT NOT NULL PRIMARY KEY,
    key_id     INTEGER NOT NULL,
    entry      BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS one_time_prekeys (
    username TEXT NOT NULL,
    key_id   INTEGER NOT NULL,
    entry    BLOB NOT NULL,
    PRIMARY KEY (username, key_id)
);
CREATE TABLE IF NOT EXISTS offline_keys (
    recipient       TEXT NOT NULL,
    conversation_id INTEGER NOT NULL,
    generation      INTEGER NOT NULL,
    sender          TEXT NOT NULL,
    wrapped         BLOB NOT NULL,
    created_at      REAL NOT NULL,
    PRIMARY KEY (recipient, conversation_id, generation)
);
CREATE TABLE IF NOT EXISTS message_queue (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    recipient       TEXT NOT NULL,
    sender          TEXT NOT NULL,
    conversation_id INTEGER NOT NULL,
    generation      INTEGER NOT NULL,
    msg_ref         BLOB NOT NULL,
    sender_identity BLOB NOT NULL,
    payload         BLOB NOT NULL,
    stored_at       REAL NOT NULL,
    room_id         INTEGER NOT NULL DEFAULT 0,
    kind            INTEGER NOT NULL DEFAULT 0,
    UNIQUE (recipient, sender, msg_ref)
);
CREATE INDEX IF NOT EXISTS ix_queue_recipient ON message_queue (recipient, id);
CREATE INDEX IF NOT EXISTS ix_queue_stored_at ON message_queue (stored_at);
-- AUTOINCREMENT: a closed room's id is never reused, so rows still queued for it never meet another room's keys.
CREATE TABLE IF NOT EXISTS rooms (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT NOT NULL UNIQUE,
    uid        BLOB NOT NULL,
    admin      TEXT NOT NULL,
    epoch      INTEGER NOT NULL,
    head       BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_rooms_admin ON rooms (admin);
CREATE TABLE IF NOT EXISTS room_members (
    room_id      INTEGER NOT NULL,
    username     TEXT NOT NULL,
    joined_epoch INTEGER NOT NULL,
    PRIMARY KEY (room_id, username)
);
CREATE INDEX IF NOT EXISTS ix_room_members_username ON room_members (username);
CREATE TABLE IF NOT EXISTS room_changes (
    room_id     INTEGER NOT NULL,
    epoch       INTEGER NOT NULL,
    actor       TEXT NOT NULL,
    change_blob BLOB NOT NULL,
    created_at  REAL NOT NULL,
    PRIMARY KEY (room_id, epoch)
);
CREATE TABLE IF NOT EXISTS room_keys (
    room_id    INTEGER NOT NULL,
    epoch      INTEGER NOT NULL,
    wrapped    BLOB NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (room_id, epoch)
);
"""
# Columns added after the first release: (table, column, definition), added on open where missing.
_SQLITE_ADDED_COLUMNS = (
    ("users", "ticket_epoch", "INTEGER NOT NULL DEFAULT 0"),  # password changes
    ("message_queue", "room_id", "INTEGER NOT NULL DEFAULT 0"),  # group rooms
    ("message_queue", "kind", "INTEGER NOT NULL DEFAULT 0"),
)
OFFLINE_KEY_GRACE_S = 24 * 3600.0  # an acknowledged key is kept this long: the sender may still be writing
ADMIN_ACTION_KEEP_S = 3600.0  # the servers poll every second; an hour of actions is plenty


class SQLiteStorage(Storage):
    backend = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            folder = Path(self.path).absolute().parent
            if not folder.is_dir():
                raise ConfigError(
                    f"The folder of the SQLite database {self.path} ({folder}) does not exist; "
                    f"create it first (sqlite:///relative/path.db is relative to the current "
                    f"folder, sqlite:////absolute/path.db has four slashes)."
                )
            if Path(self.path).is_dir():
                raise ConfigError(f"The SQLite database {self.path} is a folder, not a file.")
        self._pool = _Pool(self._connect)
        with self._pool.connection() as conn:  # executescript manages its own transaction
            conn.executescript(_SQLITE_SCHEMA)
        with self._tx() as conn:  # one writer: two servers opening an old file at once add each column once
            for table, column, definition in _SQLITE_ADDED_COLUMNS:
                # Names from the constant above, never from input: a column name cannot be a parameter.
                if column not in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
            conn.execute("CREATE INDEX IF NOT EXISTS ix_queue_room ON message_queue (room_id, generation)")

    def _connect(self) -> sqlite3.Connection:
        if self.path != ":memory:" and not Path(self.path).exists():
            # It holds password hashes: owner-only from the first byte.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            conn = sqlite3.connect(self.path, timeout=10, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=10000")
        except sqlite3.Error as exc:
            raise DatabaseUnavailable(f"Cannot open the SQLite database {self.path}: {exc}") from exc
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._pool.connection() as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise DatabaseUnavailable(f"SQLite error: {exc}") from exc
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def create_user(self, username: str, password_hash: str, identity_key: bytes | None = None) -> bool:
        with self._tx() as conn:  # BEGIN IMMEDIATE: no room changes between the look and the insert
            cur = conn.execute(
                "INSERT OR IGNORE INTO users (username, password_hash, created_at, identity_key) "
                "SELECT ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM room_members WHERE username = ?)",
                (username, password_hash, time.time(), identity_key, username),
            )
            return cur.rowcount == 1

    def get_identity_key(self, username: str) -> bytes | None:
        with self._tx() as conn:
            row = conn.execute("SELECT identity_key FROM users WHERE username = ?", (username,)).fetchone()
        return bytes(row[0]) if row and row[0] is not None else None

    def set_identity_key(self, username: str, identity_key: bytes) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE users SET identity_key = ? WHERE username = ?", (identity_key, username))

    def get_password_hash(self, username: str) -> str | None:
        with self._tx() as conn:
            row = conn.execute("SELECT password_hash FROM users WHERE username = ?", (username,)).fetchone()
        return row[0] if row else None

    def count_users(self) -> int:
        with self._tx() as conn:
            return conn.execute("SELECT COUNT(*) FROM users").fetchone()[0]

    def get_ticket_epoch(self, username: str) -> int | None:
        with self._tx() as conn:
            row = conn.execute("SELECT ticket_epoch FROM users WHERE username = ?", (username,)).fetchone()
        return int(row[0]) if row else None

    def change_password_hash(self, username: str, password_hash: str) -> int | None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE users SET password_hash = ?, ticket_epoch = ticket_epoch + 1 WHERE username = ?",
                (password_hash, username),
            )
            row = conn.execute("SELECT ticket_epoch FROM users WHERE username = ?", (username,)).fetchone()
        return int(row[0]) if row else None

    def open_conversation(self, user_a: str, user_b: str) -> int:
        low, high = _pair(user_a, user_b)
        with self._tx() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO conversations (user_low, user_high, created_at) VALUES (?, ?, ?)",
                (low, high, time.time()),
            )
            (cid,) = conn.execute(
                "SELECT id FROM conversations WHERE user_low = ? AND user_high = ?", (low, high)
            ).fetchone()
            conn.executemany(
                "INSERT OR IGNORE INTO conversation_members (conversation_id, username) VALUES (?, ?)",
                [(cid, low), (cid, high)],
            )
            return cid

    def record_key_generation(self, conversation_id: int) -> int:
        with self._tx() as conn:
            conn.execute(
                "UPDATE conversations SET key_generation = key_generation + 1, key_generated_at = ? "
                "WHERE id = ?",
                (time.time(), conversation_id),
            )
            row = conn.execute(
                "SELECT key_generation FROM conversations WHERE id = ?", (conversation_id,)
            ).fetchone()
        if row is None:
            raise DatabaseError(f"No conversation {conversation_id}.")
        return row[0]

    def get_conversation(self, conversation_id: int) -> Conversation | None:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT id, user_low, user_high, key_generation, key_generated_at "
                "FROM conversations WHERE id = ?",
                (conversation_id,),
            ).fetchone()
        if row is None:
            return None
        return Conversation(row[0], (row[1], row[2]), row[3], row[4])

    def get_login_failures(self, username: str, source: str) -> LoginFailures:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT failures, locked_until FROM login_failures WHERE username = ? AND source = ?",
                (username, source),
            ).fetchone()
        return LoginFailures(*row) if row else LoginFailures(0, 0.0)

    def record_login_failure(
        self, username: str, source: str, now: float, max_failures: int, lock_s: float
    ) -> LoginFailures:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT failures, locked_until FROM login_failures WHERE username = ? AND source = ?",
                (username, source),
            ).fetchone()
            failures, locked_until = row if row else (0, 0.0)
            if 0 < locked_until <= now:  # a failure after an expired lock starts a fresh count
                failures, locked_until = 0, 0.0
            failures += 1
            if failures >= max_failures and locked_until <= now:
                locked_until = now + lock_s
            conn.execute(
                "INSERT INTO login_failures (username, source, failures, locked_until, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (username, source) DO UPDATE SET "
                "failures = excluded.failures, locked_until = excluded.locked_until, "
                "updated_at = excluded.updated_at",
                (username, source, failures, locked_until, now),
            )
        return LoginFailures(failures, locked_until)

    def clear_login_failures(self, username: str, source: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM login_failures WHERE username = ? AND source = ?", (username, source))

    # -- operating the server -------------------------------------------------------
    def audit(
        self, event: str, username: str = "", source: str = "", detail: str = "", at: float | None = None
    ) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO audit_log (at, event, username, source, detail) VALUES (?, ?, ?, ?, ?)",
                (
                    time.time() if at is None else at,
                    event[:32],
                    username[:32],
                    source[:64],
                    detail[:MAX_AUDIT_DETAIL],
                ),
            )

    def audit_events(
        self, username: str | None = None, since: float = 0.0, limit: int = 1000
    ) -> list[AuditEvent]:
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT at, event, username, source, detail FROM audit_log WHERE at >= ? "
                "AND (? IS NULL OR username = ?) ORDER BY at, id LIMIT ?",
                (since, username, username, limit),
            ).fetchall()
        return [AuditEvent(*row) for row in rows]

    def prune_audit(self, before: float) -> int:
        with self._tx() as conn:
            return conn.execute("DELETE FROM audit_log WHERE at < ?", (before,)).rowcount

    def set_ban(self, kind: str, target: str, until: float, reason: str) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO bans (kind, target, until, reason, created_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (kind, target) DO UPDATE SET until = excluded.until, "
                "reason = excluded.reason, created_at = excluded.created_at",
                (kind, target, until, reason[:MAX_REASON_CHARS], time.time()),
            )

    def remove_ban(self, kind: str, target: str) -> bool:
        with self._tx() as conn:
            return conn.execute("DELETE FROM bans WHERE kind = ? AND target = ?", (kind, target)).rowcount > 0

    def active_bans(self, now: float, kind: str | None = None) -> list[Ban]:
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT kind, target, until, reason FROM bans WHERE (until = 0 OR until > ?) "
                "AND (? IS NULL OR kind = ?) ORDER BY kind, target",
                (now, kind, kind),
            ).fetchall()
        return [Ban(*row) for row in rows]

    def user_ban(self, username: str, now: float) -> Ban | None:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT kind, target, until, reason FROM bans WHERE kind = 'user' AND target = ? "
                "AND (until = 0 OR until > ?)",
                (username, now),
            ).fetchone()
        return Ban(*row) if row else None

    def post_admin_action(self, action: str, username: str, reason: str) -> int:
        now = time.time()
        with self._tx() as conn:
            conn.execute("DELETE FROM admin_actions WHERE at < ?", (now - ADMIN_ACTION_KEEP_S,))
            cur = conn.execute(
                "INSERT INTO admin_actions (at, action, username, reason) VALUES (?, ?, ?, ?)",
                (now, action, username, reason[:MAX_REASON_CHARS]),
            )
            return cur.lastrowid

    def admin_actions_after(self, last_id: int) -> list[AdminAction]:
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT id, action, username, reason FROM admin_actions WHERE id > ? ORDER BY id LIMIT 1000",
                (last_id,),
            ).fetchall()
        return [AdminAction(*row) for row in rows]

    def last_admin_action_id(self) -> int:
        with self._tx() as conn:
            return conn.execute("SELECT COALESCE(MAX(id), 0) FROM admin_actions").fetchone()[0]

    def bump_ticket_epoch(self, username: str) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE users SET ticket_epoch = ticket_epoch + 1 WHERE username = ?", (username,))

    def set_password_hash(self, username: str, password_hash: str) -> bool:
        with self._tx() as conn:
            return (
                conn.execute(
                    "UPDATE users SET password_hash = ? WHERE username = ?", (password_hash, username)
                ).rowcount
                == 1
            )

    def record_login(self, username: str, now: float) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO account_state (username, last_login_at) VALUES (?, ?) "
                "ON CONFLICT (username) DO UPDATE SET last_login_at = excluded.last_login_at",
                (username, now),
            )

    def list_users(self, now: float) -> list[UserInfo]:
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT u.username, u.created_at, a.last_login_at, EXISTS (SELECT 1 FROM login_failures f "
                "WHERE f.username = u.username AND f.locked_until > ?) FROM users u LEFT JOIN account_state a "
                "ON a.username = u.username ORDER BY u.username",
                (now,),
            ).fetchall()
        return [UserInfo(r[0], r[1], r[2], bool(r[3])) for r in rows]

    def delete_user(self, username: str) -> bool:
        with self._tx() as conn:
            gone = conn.execute("DELETE FROM users WHERE username = ?", (username,)).rowcount == 1
            conn.execute(
                "DELETE FROM conversations WHERE user_low = ? OR user_high = ?", (username, username)
            )
            conn.execute("DELETE FROM conversation_members WHERE username = ?", (username,))
            conn.execute("DELETE FROM account_state WHERE username = ?", (username,))
            conn.execute("DELETE FROM login_failures WHERE username = ?", (username,))
            conn.execute("DELETE FROM live_sessions WHERE username = ?", (username,))
            conn.execute("DELETE FROM signed_prekeys WHERE username = ?", (username,))
            conn.execute("DELETE FROM one_time_prekeys WHERE username = ?", (username,))
            conn.execute("DELETE FROM offline_keys WHERE recipient = ? OR sender = ?", (username, username))
            # Everything queued for it, and all it sent but its room changes queued for others; rooms and
            # memberships stay as signed (a ghost, until the admin removes it).
            conn.execute(
                "DELETE FROM message_queue WHERE recipient = ? OR (sender = ? AND kind <> 2)",
                (username, username),
            )
        return gone

    def list_lockouts(self, now: float) -> list[Lockout]:
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT username, source, failures, locked_until FROM login_failures "
                "WHERE locked_until > ? ORDER BY username, source",
                (now,),
            ).fetchall()
        return [Lockout(*row) for row in rows]

    def clear_all_login_failures(self, username: str) -> int:
        with self._tx() as conn:
            return conn.execute("DELETE FROM login_failures WHERE username = ?", (username,)).rowcount

    def session_started(self, node: str, username: str, source: str, since: float) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO live_sessions (node, username, source, since) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (node, username) DO UPDATE SET source = excluded.source, "
                "since = excluded.since",
                (node, username, source, since),
            )

    def record_session_start(self, node: str, username: str, source: str, now: float, event: str) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO account_state (username, last_login_at) VALUES (?, ?) "
                "ON CONFLICT (username) DO UPDATE SET last_login_at = excluded.last_login_at",
                (username, now),
            )
            conn.execute(
                "INSERT INTO live_sessions (node, username, source, since) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (node, username) DO UPDATE SET source = excluded.source, "
                "since = excluded.since",
                (node, username, source, now),
            )
            conn.execute(
                "INSERT INTO audit_log (at, event, username, source, detail) VALUES (?, ?, ?, ?, '')",
                (now, event[:32], username[:32], source[:64]),
            )

    def session_ended(self, node: str, username: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM live_sessions WHERE node = ? AND username = ?", (node, username))

    def clear_sessions(self, node: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM live_sessions WHERE node = ?", (node,))

    def list_sessions(self) -> list[LiveSession]:
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT node, username, source, since FROM live_sessions ORDER BY username, node"
            ).fetchall()
        return [LiveSession(*row) for row in rows]

    # -- store and forward ------------------------------------------------------------
    def set_signed_prekey(self, username: str, key_id: int, entry: bytes, now: float) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO signed_prekeys (username, key_id, entry, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (username) DO UPDATE SET key_id = excluded.key_id, entry = excluded.entry, "
                "created_at = excluded.created_at",
                (username, key_id, entry, now),
            )

    def add_one_time_prekeys(self, username: str, entries: list[tuple[int, bytes]], max_kept: int) -> int:
        with self._tx() as conn:
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM one_time_prekeys WHERE username = ?", (username,)
            ).fetchone()
            room = max(0, max_kept - count)
            conn.executemany(
                "INSERT OR IGNORE INTO one_time_prekeys (username, key_id, entry) VALUES (?, ?, ?)",
                [(username, key_id, entry) for key_id, entry in entries[:room]],
            )
            return conn.execute(
                "SELECT COUNT(*) FROM one_time_prekeys WHERE username = ?", (username,)
            ).fetchone()[0]

    def prekey_status(self, username: str) -> PrekeyStatus:
        with self._tx() as conn:
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM one_time_prekeys WHERE username = ?", (username,)
            ).fetchone()
            row = conn.execute(
                "SELECT key_id, created_at FROM signed_prekeys WHERE username = ?", (username,)
            ).fetchone()
        return PrekeyStatus(count, row[0] if row else None, row[1] if row else None)

    def take_prekey_bundle(self, username: str) -> tuple[bytes | None, bytes | None]:
        with self._tx() as conn:
            signed = conn.execute(
                "SELECT entry FROM signed_prekeys WHERE username = ?", (username,)
            ).fetchone()
            one = conn.execute(
                "SELECT key_id, entry FROM one_time_prekeys WHERE username = ? ORDER BY key_id LIMIT 1",
                (username,),
            ).fetchone()
            if one is not None:
                conn.execute(
                    "DELETE FROM one_time_prekeys WHERE username = ? AND key_id = ?", (username, one[0])
                )
        return (bytes(signed[0]) if signed else None), (bytes(one[1]) if one else None)

    def clear_prekeys(self, username: str, *, signed: bool) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM one_time_prekeys WHERE username = ?", (username,))
            if signed:
                conn.execute("DELETE FROM signed_prekeys WHERE username = ?", (username,))

    def put_offline_key(
        self, recipient: str, conversation_id: int, generation: int, sender: str, wrapped: bytes, now: float
    ) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO offline_keys (recipient, conversation_id, generation, sender, "
                "wrapped, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (recipient, conversation_id, generation, sender, wrapped, now),
            )

    def enqueue(self, msg: QueuedMessage, max_messages: int, max_bytes: int) -> tuple[str, int]:
        _check_pair_row(msg)
        with self._tx() as conn:  # BEGIN IMMEDIATE: one writer at a time, so the bound holds
            row = conn.execute(
                "SELECT id FROM message_queue WHERE recipient = ? AND sender = ? AND msg_ref = ?",
                (msg.recipient, msg.sender, msg.msg_ref),
            ).fetchone()
            if row is not None:
                return DUPLICATE, row[0]
            key = conn.execute(
                "SELECT 1 FROM offline_keys WHERE recipient = ? AND conversation_id = ? AND "
                "generation = ? AND sender = ?",
                (msg.recipient, msg.conversation_id, msg.generation, msg.sender),
            ).fetchone()
            if key is None:
                return NO_KEY, 0
            count, size = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM message_queue WHERE recipient = ?",
                (msg.recipient,),
            ).fetchone()
            if count >= max_messages:
                return FULL_MESSAGES, 0
            if size + len(msg.payload) > max_bytes:
                return FULL_BYTES, 0
            cur = conn.execute(
                "INSERT INTO message_queue (recipient, sender, conversation_id, generation, msg_ref, "
                "sender_identity, payload, stored_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    msg.recipient,
                    msg.sender,
                    msg.conversation_id,
                    msg.generation,
                    msg.msg_ref,
                    msg.sender_identity,
                    msg.payload,
                    msg.stored_at,
                ),
            )
            return STORED, int(cur.lastrowid)

    def queued_for(self, recipient: str, after_id: int, limit: int) -> list[QueuedMessage]:
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT q.id, q.recipient, q.sender, q.conversation_id, q.generation, q.msg_ref, q.sender_identity, "
                "q.payload, q.stored_at, CASE WHEN q.kind = 0 THEN k.wrapped ELSE r.wrapped END, q.room_id, q.kind "
                "FROM message_queue q LEFT JOIN offline_keys k "
                "ON q.kind = 0 AND k.recipient = q.recipient AND k.conversation_id = q.conversation_id "
                "AND k.generation = q.generation "
                "LEFT JOIN room_keys r ON q.kind <> 0 AND r.room_id = q.room_id AND r.epoch = q.generation "
                "AND (q.kind = 1 OR EXISTS (SELECT 1 FROM room_members m WHERE m.room_id = q.room_id "
                "AND m.username = q.recipient AND m.joined_epoch <= q.generation)) "
                "WHERE q.recipient = ? AND q.id > ? ORDER BY q.id LIMIT ?",
                (recipient, after_id, limit),
            ).fetchall()
        return [
            QueuedMessage(
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                bytes(r[5]),
                bytes(r[6]),
                bytes(r[7]),
                r[8],
                bytes(r[9]) if r[9] is not None else None,
                r[10],
                r[11],
            )
            for r in rows
        ]

    def ack_queued(self, recipient: str, message_id: int) -> bool:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT conversation_id, generation, kind FROM message_queue WHERE id = ? AND recipient = ?",
                (message_id, recipient),
            ).fetchone()
            if row is None:
                return False
            conn.execute("DELETE FROM message_queue WHERE id = ?", (message_id,))
            if row[2] == KIND_PAIR:  # a room key is shared by the room: expire_queue decides when it goes
                conn.execute(
                    "DELETE FROM offline_keys WHERE recipient = ? AND conversation_id = ? AND generation = ? "
                    "AND NOT EXISTS (SELECT 1 FROM message_queue WHERE recipient = ? AND conversation_id = ? "
                    "AND generation = ? AND kind = 0) AND created_at < ?",
                    (recipient, row[0], row[1], recipient, row[0], row[1], time.time() - OFFLINE_KEY_GRACE_S),
                )
            return True

    def expire_queue(self, before: float) -> int:
        with self._tx() as conn:
            gone = conn.execute(
                "DELETE FROM message_queue WHERE stored_at < ? AND kind <> 2", (before,)
            ).rowcount
            conn.execute(
                "DELETE FROM offline_keys WHERE created_at < ? AND NOT EXISTS (SELECT 1 FROM message_queue q "
                "WHERE q.recipient = offline_keys.recipient AND q.conversation_id = offline_keys.conversation_id "
                "AND q.generation = offline_keys.generation AND q.kind = 0)",
                (before,),
            )
            # A key is needed while queued_for() would hand it with a row (the same condition as there).
            conn.execute(
                "DELETE FROM room_keys WHERE created_at < ? AND NOT EXISTS (SELECT 1 FROM rooms r "
                "WHERE r.id = room_keys.room_id AND r.epoch <= room_keys.epoch) AND NOT EXISTS (SELECT 1 "
                "FROM message_queue q WHERE q.room_id = room_keys.room_id AND q.generation = room_keys.epoch "
                "AND (q.kind = 1 OR (q.kind = 2 AND EXISTS (SELECT 1 FROM room_members m "
                "WHERE m.room_id = q.room_id AND m.username = q.recipient "
                "AND m.joined_epoch <= q.generation))))",
                (before,),
            )
        return gone

    # -- group rooms ------------------------------------------------------------------
    def _ref_used(self, conn: sqlite3.Connection, sender: str, msg_ref: bytes, recipients) -> bool:
        return any(
            conn.execute(
                "SELECT 1 FROM message_queue WHERE recipient = ? AND sender = ? AND msg_ref = ?",
                (recipient, sender, msg_ref),
            ).fetchone()
            for recipient in recipients
        )

    def _queue_change(
        self,
        conn: sqlite3.Connection,
        room_id: int,
        epoch: int,
        recipients,
        actor: str,
        identity: bytes,
        msg_ref: bytes,
        change: bytes,
        now: float,
    ) -> None:
        """The change for each recipient who has an account: nothing is queued for a ghost (its name could
        be registered again once the admin removes it, and the rows would reach the newcomer)."""
        conn.executemany(
            "INSERT INTO message_queue (recipient, sender, conversation_id, generation, msg_ref, "
            "sender_identity, payload, stored_at, room_id, kind) SELECT ?, ?, 0, ?, ?, ?, ?, ?, ?, 2 "
            "WHERE EXISTS (SELECT 1 FROM users WHERE username = ?)",
            [
                (recipient, actor, epoch, msg_ref, identity, change, now, room_id, recipient)
                for recipient in recipients
            ],
        )

    def create_room(
        self,
        name: str,
        uid: bytes,
        admin: str,
        head: bytes,
        change: bytes,
        wrapped_key: bytes,
        msg_ref: bytes,
        admin_identity: bytes,
        now: float,
    ) -> int | None:
        _check_create_room(name, uid, admin, head, change, wrapped_key, msg_ref, admin_identity)
        with self._tx() as conn:  # BEGIN IMMEDIATE: nobody takes the name between the look and the insert
            if conn.execute("SELECT 1 FROM rooms WHERE name = ?", (name,)).fetchone():
                return None
            if self._ref_used(conn, admin, msg_ref, [admin]):
                raise _refuse("ref_used", actor=admin)
            room_id = conn.execute(
                "INSERT INTO rooms (name, uid, admin, epoch, head, created_at) VALUES (?, ?, ?, 1, ?, ?)",
                (name, uid, admin, head, now),
            ).lastrowid
            conn.execute(
                "INSERT INTO room_members (room_id, username, joined_epoch) VALUES (?, ?, 1)",
                (room_id, admin),
            )
            conn.execute(
                "INSERT INTO room_changes (room_id, epoch, actor, change_blob, created_at) "
                "VALUES (?, 1, ?, ?, ?)",
                (room_id, admin, change, now),
            )
            conn.execute(
                "INSERT INTO room_keys (room_id, epoch, wrapped, created_at) VALUES (?, 1, ?, ?)",
                (room_id, wrapped_key, now),
            )
            conn.execute(
                "INSERT INTO message_queue (recipient, sender, conversation_id, generation, msg_ref, "
                "sender_identity, payload, stored_at, room_id, kind) VALUES (?, ?, 0, 1, ?, ?, ?, ?, ?, 2)",
                (admin, admin, msg_ref, admin_identity, change, now, room_id),
            )
        return int(room_id)

    def get_room(self, name: str) -> Room | None:
        if not _is_name(name, MAX_ROOM_NAME_CHARS):
            return None
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT r.id, r.name, r.uid, r.admin, r.epoch, r.head, m.username FROM rooms r "
                "LEFT JOIN room_members m ON m.room_id = r.id WHERE r.name = ?",
                (name,),
            ).fetchall()
        rooms = _rooms_from_rows(rows)
        return rooms[0] if rooms else None

    def get_room_by_id(self, room_id: int) -> Room | None:
        if not _is_int(room_id, 1, MAX_DB_ID):
            return None
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT r.id, r.name, r.uid, r.admin, r.epoch, r.head, m.username FROM rooms r "
                "LEFT JOIN room_members m ON m.room_id = r.id WHERE r.id = ?",
                (room_id,),
            ).fetchall()
        rooms = _rooms_from_rows(rows)
        return rooms[0] if rooms else None

    def rooms_of(self, username: str) -> list[Room]:
        if not _is_name(username, MAX_USERNAME_CHARS):
            return []
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT r.id, r.name, r.uid, r.admin, r.epoch, r.head, all_m.username "
                "FROM room_members me JOIN rooms r ON r.id = me.room_id "
                "JOIN room_members all_m ON all_m.room_id = r.id WHERE me.username = ?",
                (username,),
            ).fetchall()
        return _rooms_from_rows(rows)

    def change_room(
        self,
        room_id: int,
        expected_epoch: int,
        head: bytes,
        *,
        add: str | None = None,
        remove: str | None = None,
        close: bool = False,
        change: bytes,
        wrapped_key: bytes | None,
        actor: str,
        actor_identity: bytes,
        msg_ref: bytes,
        now: float,
    ) -> tuple[str, int]:
        _check_change_room(
            expected_epoch, head, add, remove, close, change, wrapped_key, actor, actor_identity, msg_ref
        )
        if not _is_int(room_id, 1, MAX_DB_ID):
            return ROOM_GONE, 0
        with self._tx() as conn:  # BEGIN IMMEDIATE: the epoch read here is the one written below
            row = conn.execute("SELECT epoch, admin FROM rooms WHERE id = ?", (room_id,)).fetchone()
            if row is None:
                return ROOM_GONE, 0
            epoch, admin = int(row[0]), row[1]
            if epoch != expected_epoch:
                return ROOM_STALE, epoch
            members = {
                r[0] for r in conn.execute("SELECT username FROM room_members WHERE room_id = ?", (room_id,))
            }
            if add is not None and add in members:
                raise _refuse("member", add=add)
            if remove is not None and remove not in members:
                raise _refuse("not_member", remove=remove)
            if remove is not None and remove == admin:
                raise _refuse("admin")
            if epoch >= MAX_EPOCH:
                raise _refuse("epoch_full")
            # Every member after the change and the one removed: the members before plus the one added.
            recipients = sorted(members | ({add} if add is not None else set()))
            if self._ref_used(conn, actor, msg_ref, recipients):
                raise _refuse("ref_used", actor=actor)
            new_epoch = epoch + 1
            self._queue_change(
                conn, room_id, new_epoch, recipients, actor, actor_identity, msg_ref, change, now
            )
            if close:  # the room keys stay: rows still queued need them (expire_queue drops them)
                conn.execute("DELETE FROM room_changes WHERE room_id = ?", (room_id,))
                conn.execute("DELETE FROM room_members WHERE room_id = ?", (room_id,))
                conn.execute("DELETE FROM rooms WHERE id = ?", (room_id,))
                return ROOM_OK, new_epoch
            conn.execute("UPDATE rooms SET epoch = ?, head = ? WHERE id = ?", (new_epoch, head, room_id))
            if add is not None:
                conn.execute(
                    "INSERT INTO room_members (room_id, username, joined_epoch) VALUES (?, ?, ?)",
                    (room_id, add, new_epoch),
                )
            if remove is not None:
                conn.execute("DELETE FROM room_members WHERE room_id = ? AND username = ?", (room_id, remove))
            conn.execute(
                "INSERT INTO room_changes (room_id, epoch, actor, change_blob, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (room_id, new_epoch, actor, change, now),
            )
            if wrapped_key is not None:
                conn.execute(
                    "INSERT INTO room_keys (room_id, epoch, wrapped, created_at) VALUES (?, ?, ?, ?)",
                    (room_id, new_epoch, wrapped_key, now),
                )
        return ROOM_OK, new_epoch

    def room_enqueue(
        self,
        room_id: int,
        epoch: int,
        sender: str,
        sender_identity: bytes,
        msg_ref: bytes,
        payload: bytes,
        recipients: list[str],
        now: float,
        max_messages: int,
        max_bytes: int,
    ) -> dict[str, str]:
        targets = _room_targets(room_id, epoch, sender, sender_identity, msg_ref, payload, recipients)
        answers: dict[str, str] = {}
        if not targets:
            return answers
        with self._tx() as conn:  # BEGIN IMMEDIATE: one writer at a time, so every bound holds
            for recipient in targets:
                if not conn.execute("SELECT 1 FROM users WHERE username = ?", (recipient,)).fetchone():
                    answers[recipient] = NO_USER
                    continue
                if conn.execute(
                    "SELECT 1 FROM message_queue WHERE recipient = ? AND sender = ? AND msg_ref = ?",
                    (recipient, sender, msg_ref),
                ).fetchone():
                    answers[recipient] = DUPLICATE
                    continue
                count, size = conn.execute(
                    "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM message_queue "
                    "WHERE recipient = ?",
                    (recipient,),
                ).fetchone()
                if count >= max_messages:
                    answers[recipient] = FULL_MESSAGES
                elif size + len(payload) > max_bytes:
                    answers[recipient] = FULL_BYTES
                else:
                    conn.execute(
                        "INSERT INTO message_queue (recipient, sender, conversation_id, generation, msg_ref, "
                        "sender_identity, payload, stored_at, room_id, kind) "
                        "VALUES (?, ?, 0, ?, ?, ?, ?, ?, ?, 1)",
                        (recipient, sender, epoch, msg_ref, sender_identity, payload, now, room_id),
                    )
                    answers[recipient] = STORED
        return answers

    def room_key(self, room_id: int, epoch: int) -> bytes | None:
        if not (_is_int(room_id, 1, MAX_DB_ID) and _is_int(epoch, 0, MAX_EPOCH)):
            return None
        with self._tx() as conn:
            row = conn.execute(
                "SELECT wrapped FROM room_keys WHERE room_id = ? AND epoch = ?", (room_id, epoch)
            ).fetchone()
        return bytes(row[0]) if row else None

    def close(self) -> None:
        self._pool.close()


# =============================================================================
# MySQL / MariaDB (stored procedures)
# =============================================================================
def split_sql_script(text: str) -> list[str]:
    """Split a script into statements, honouring ``DELIMITER`` lines like the mysql client."""
    statements, current, delimiter = [], [], ";"
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.upper().startswith("DELIMITER "):
            delimiter = stripped.split(None, 1)[1]
            continue
        if not current and (not stripped or stripped.startswith("--")):
            continue
        current.append(line)
        if stripped.endswith(delimiter):
            stmt = "\n".join(current).rstrip()
            statements.append(stmt[: -len(delimiter)].strip())
            current = []
    if "".join(current).strip():
        statements.append("\n".join(current).strip())
    return [s for s in statements if s]


class MySQLStorage(Storage):
    backend = "mysql"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 3306,
        user: str = "root",
        password: str = "",
        database: str,
        create_database: bool = False,
        apply_schema: bool = True,
    ) -> None:
        import pymysql  # imported here: only the MySQL backend needs it

        self._pymysql = pymysql
        self._params = dict(
            host=host,
            port=port,
            user=user,
            password=password,
            database=database,
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=30,
            write_timeout=30,
            charset="utf8mb4",
            autocommit=True,
        )
        if not re.fullmatch(r"[A-Za-z0-9_]{1,64}", database):
            raise ConfigError("MySQL database names may use letters, digits and _ only.")
        self._create_database_if_missing(explicit=create_database)
        self._pool = _Pool(self._connect)
        if (
            apply_schema
        ):  # admin.py passes False: re-creating procedures under a running server races its calls
            self.apply_schema()

    def _explain(self, exc: Exception) -> str:
        """One sentence on what went wrong, by MySQL error number (never the password)."""
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        where = f"{self._params['host']}:{self._params['port']}"
        user, db = self._params["user"], self._params["database"]
        if code in (1045, 1698):  # ER_ACCESS_DENIED_ERROR, ER_ACCESS_DENIED_NO_PASSWORD_ERROR
            return (
                f"MySQL at {where} refused user {user!r}: wrong user name or password "
                f"(or that user may not connect from this host)."
            )
        if code == 1044:  # ER_DBACCESS_DENIED_ERROR
            return (
                f"MySQL user {user!r} may not use or create the database {db!r}; an administrator can run: "
                f"CREATE DATABASE {db}; GRANT ALL ON {db}.* TO '{user}'@'%';"
            )
        if code == 1049:  # ER_BAD_DB_ERROR
            return f"The MySQL database {db!r} does not exist at {where}."
        if code in (2002, 2003, 2005, 2006, 2013):  # cannot connect, unknown host, gone away, lost
            return f"Cannot reach MySQL at {where} (is it running, and is the address right?): {exc.args[-1]}"
        return f"MySQL at {where} failed: {exc}"

    def _create_database_if_missing(self, *, explicit: bool) -> None:
        """``CREATE DATABASE IF NOT EXISTS`` when the database is missing (or when asked), if the
        account may; otherwise an error that says which of the two it is."""
        if not explicit:
            try:
                self._pymysql.connect(**self._params).close()
                return
            except self._pymysql.MySQLError as exc:
                if not (exc.args and exc.args[0] == 1049):
                    raise DatabaseUnavailable(self._explain(exc)) from exc
        params = dict(self._params)
        name = params.pop("database")
        try:
            conn = self._pymysql.connect(**params)
        except self._pymysql.MySQLError as exc:
            raise DatabaseUnavailable(self._explain(exc)) from exc
        try:
            with conn.cursor() as cur:
                # A name cannot be a parameter; it was checked against [A-Za-z0-9_] above.
                cur.execute(f"CREATE DATABASE IF NOT EXISTS `{name}`")
            log.warning("created the MySQL database %s", name)
        except self._pymysql.MySQLError as exc:
            raise DatabaseUnavailable(
                f"The MySQL database {name!r} does not exist and could not be created: {self._explain(exc)}"
            ) from exc
        finally:
            conn.close()

    def _connect(self):
        try:
            return self._pymysql.connect(**self._params)
        except self._pymysql.MySQLError as exc:
            raise DatabaseUnavailable(self._explain(exc)) from exc

    def apply_schema(self) -> None:
        """Create the tables and procedures from schema.sql (harmless to repeat)."""
        statements = split_sql_script(SCHEMA_PATH.read_text())
        with self._pool.connection() as conn, conn.cursor() as cur:
            # Several servers starting at once (worker processes, cluster nodes) would race on
            # DROP/CREATE PROCEDURE: one at a time, under a named lock of this database's own.
            cur.execute("SELECT GET_LOCK(CONCAT('secureim_schema.', DATABASE()), %s)", (SCHEMA_LOCK_WAIT_S,))
            if cur.fetchone()[0] != 1:
                raise DatabaseUnavailable("Another server is still creating the database schema; try again.")
            try:
                for stmt in statements:
                    cur.execute(stmt)
            finally:
                cur.execute("SELECT RELEASE_LOCK(CONCAT('secureim_schema.', DATABASE()))")
                cur.fetchall()

    def _call(self, proc: str, *args: Any) -> list[tuple]:
        """Call one stored procedure with parameters; retry once on a dropped connection."""
        for attempt in (1, 2):
            try:
                with self._pool.connection() as conn, conn.cursor() as cur:
                    cur.callproc(proc, args)
                    rows = list(cur.fetchall())
                    while cur.nextset():
                        pass
                    return rows
            except (self._pymysql.err.OperationalError, self._pymysql.err.InterfaceError) as exc:
                if attempt == 2:
                    raise DatabaseUnavailable(f"MySQL is unavailable: {exc}") from exc
                log.warning("MySQL connection lost (%s); reconnecting", exc.__class__.__name__)
            except self._pymysql.MySQLError as exc:
                raise DatabaseError(f"MySQL error in {proc}: {exc}") from exc
        raise AssertionError("unreachable")

    def create_user(self, username: str, password_hash: str, identity_key: bytes | None = None) -> bool:
        return self._call("sp_create_user", username, password_hash, identity_key)[0][0] == 1

    def get_identity_key(self, username: str) -> bytes | None:
        rows = self._call("sp_get_identity_key", username)
        return bytes(rows[0][0]) if rows and rows[0][0] is not None else None

    def set_identity_key(self, username: str, identity_key: bytes) -> None:
        self._call("sp_set_identity_key", username, identity_key)

    def get_password_hash(self, username: str) -> str | None:
        rows = self._call("sp_get_password_hash", username)
        return rows[0][0] if rows else None

    def count_users(self) -> int:
        return int(self._call("sp_count_users")[0][0])

    def get_ticket_epoch(self, username: str) -> int | None:
        rows = self._call("sp_get_ticket_epoch", username)
        return int(rows[0][0]) if rows else None

    def change_password_hash(self, username: str, password_hash: str) -> int | None:
        rows = self._call("sp_change_password", username, password_hash)
        return int(rows[0][0]) if rows else None

    def open_conversation(self, user_a: str, user_b: str) -> int:
        low, high = _pair(user_a, user_b)
        return int(self._call("sp_open_conversation", low, high)[0][0])

    def record_key_generation(self, conversation_id: int) -> int:
        rows = self._call("sp_record_key_generation", conversation_id)
        if not rows:
            raise DatabaseError(f"No conversation {conversation_id}.")
        return int(rows[0][0])

    def get_conversation(self, conversation_id: int) -> Conversation | None:
        rows = self._call("sp_get_conversation", conversation_id)
        if not rows:
            return None
        cid, low, high, gen, at = rows[0]
        return Conversation(int(cid), (low, high), int(gen), float(at) if at is not None else None)

    def get_login_failures(self, username: str, source: str) -> LoginFailures:
        rows = self._call("sp_get_login_failures", username, source)
        return LoginFailures(int(rows[0][0]), float(rows[0][1])) if rows else LoginFailures(0, 0.0)

    def record_login_failure(
        self, username: str, source: str, now: float, max_failures: int, lock_s: float
    ) -> LoginFailures:
        rows = self._call("sp_record_login_failure", username, source, now, max_failures, lock_s)
        return LoginFailures(int(rows[0][0]), float(rows[0][1]))

    def clear_login_failures(self, username: str, source: str) -> None:
        self._call("sp_clear_login_failures", username, source)

    # -- operating the server -------------------------------------------------------
    def audit(
        self, event: str, username: str = "", source: str = "", detail: str = "", at: float | None = None
    ) -> None:
        self._call(
            "sp_audit",
            time.time() if at is None else at,
            event[:32],
            username[:32],
            source[:64],
            detail[:MAX_AUDIT_DETAIL],
        )

    def audit_events(
        self, username: str | None = None, since: float = 0.0, limit: int = 1000
    ) -> list[AuditEvent]:
        rows = self._call("sp_audit_events", username, since, limit)
        return [AuditEvent(float(r[0]), r[1], r[2], r[3], r[4]) for r in rows]

    def prune_audit(self, before: float) -> int:
        return int(self._call("sp_prune_audit", before)[0][0])

    def set_ban(self, kind: str, target: str, until: float, reason: str) -> None:
        self._call("sp_set_ban", kind, target, until, reason[:MAX_REASON_CHARS], time.time())

    def remove_ban(self, kind: str, target: str) -> bool:
        return int(self._call("sp_remove_ban", kind, target)[0][0]) > 0

    def active_bans(self, now: float, kind: str | None = None) -> list[Ban]:
        return [Ban(r[0], r[1], float(r[2]), r[3]) for r in self._call("sp_active_bans", now, kind)]

    def user_ban(self, username: str, now: float) -> Ban | None:
        rows = self._call("sp_user_ban", username, now)
        return Ban(rows[0][0], rows[0][1], float(rows[0][2]), rows[0][3]) if rows else None

    def post_admin_action(self, action: str, username: str, reason: str) -> int:
        now = time.time()
        return int(
            self._call(
                "sp_post_admin_action",
                now,
                now - ADMIN_ACTION_KEEP_S,
                action,
                username,
                reason[:MAX_REASON_CHARS],
            )[0][0]
        )

    def admin_actions_after(self, last_id: int) -> list[AdminAction]:
        return [
            AdminAction(int(r[0]), r[1], r[2], r[3]) for r in self._call("sp_admin_actions_after", last_id)
        ]

    def last_admin_action_id(self) -> int:
        return int(self._call("sp_last_admin_action_id")[0][0])

    def bump_ticket_epoch(self, username: str) -> None:
        self._call("sp_bump_ticket_epoch", username)

    def set_password_hash(self, username: str, password_hash: str) -> bool:
        return int(self._call("sp_set_password_hash", username, password_hash)[0][0]) == 1

    def record_login(self, username: str, now: float) -> None:
        self._call("sp_record_login", username, now)

    def list_users(self, now: float) -> list[UserInfo]:
        return [
            UserInfo(r[0], float(r[1]), float(r[2]) if r[2] is not None else None, bool(r[3]))
            for r in self._call("sp_list_users", now)
        ]

    def delete_user(self, username: str) -> bool:
        return int(self._call("sp_delete_user", username)[0][0]) == 1

    def list_lockouts(self, now: float) -> list[Lockout]:
        return [Lockout(r[0], r[1], int(r[2]), float(r[3])) for r in self._call("sp_list_lockouts", now)]

    def clear_all_login_failures(self, username: str) -> int:
        return int(self._call("sp_clear_all_login_failures", username)[0][0])

    def session_started(self, node: str, username: str, source: str, since: float) -> None:
        self._call("sp_session_started", node, username, source, since)

    def record_session_start(self, node: str, username: str, source: str, now: float, event: str) -> None:
        self._call("sp_record_session_start", node, username, source[:64], now, event[:32])

    def session_ended(self, node: str, username: str) -> None:
        self._call("sp_session_ended", node, username)

    def clear_sessions(self, node: str) -> None:
        self._call("sp_clear_sessions", node)

    def list_sessions(self) -> list[LiveSession]:
        return [LiveSession(r[0], r[1], r[2], float(r[3])) for r in self._call("sp_list_sessions")]

    # -- store and forward ------------------------------------------------------------
    def set_signed_prekey(self, username: str, key_id: int, entry: bytes, now: float) -> None:
        self._call("sp_set_signed_prekey", username, key_id, entry, now)

    def add_one_time_prekeys(self, username: str, entries: list[tuple[int, bytes]], max_kept: int) -> int:
        count = self.prekey_status(username).one_time_left
        for key_id, entry in entries:
            if count >= max_kept:
                break
            count = int(self._call("sp_add_one_time_prekey", username, key_id, entry, max_kept)[0][0])
        return count

    def prekey_status(self, username: str) -> PrekeyStatus:
        row = self._call("sp_prekey_status", username)[0]
        return PrekeyStatus(
            int(row[0]),
            int(row[1]) if row[1] is not None else None,
            float(row[2]) if row[2] is not None else None,
        )

    def take_prekey_bundle(self, username: str) -> tuple[bytes | None, bytes | None]:
        row = self._call("sp_take_prekey_bundle", username)[0]
        return (bytes(row[0]) if row[0] is not None else None), (
            bytes(row[1]) if row[1] is not None else None
        )

    def clear_prekeys(self, username: str, *, signed: bool) -> None:
        self._call("sp_clear_prekeys", username, 1 if signed else 0)

    def put_offline_key(
        self, recipient: str, conversation_id: int, generation: int, sender: str, wrapped: bytes, now: float
    ) -> None:
        self._call("sp_put_offline_key", recipient, conversation_id, generation, sender, wrapped, now)

    def enqueue(self, msg: QueuedMessage, max_messages: int, max_bytes: int) -> tuple[str, int]:
        _check_pair_row(msg)
        row = self._call(
            "sp_enqueue",
            msg.recipient,
            msg.sender,
            msg.conversation_id,
            msg.generation,
            msg.msg_ref,
            msg.sender_identity,
            msg.payload,
            msg.stored_at,
            max_messages,
            max_bytes,
        )[0]
        return str(row[0]), int(row[1])

    def queued_for(self, recipient: str, after_id: int, limit: int) -> list[QueuedMessage]:
        return [
            QueuedMessage(
                int(r[0]),
                r[1],
                r[2],
                int(r[3]),
                int(r[4]),
                bytes(r[5]),
                bytes(r[6]),
                bytes(r[7]),
                float(r[8]),
                bytes(r[9]) if r[9] is not None else None,
                int(r[10]),
                int(r[11]),
            )
            for r in self._call("sp_queued_for", recipient, after_id, limit)
        ]

    def ack_queued(self, recipient: str, message_id: int) -> bool:
        return bool(
            self._call("sp_ack_queued", recipient, message_id, time.time() - OFFLINE_KEY_GRACE_S)[0][0]
        )

    def expire_queue(self, before: float) -> int:
        return int(self._call("sp_expire_queue", before)[0][0])

    # -- group rooms ------------------------------------------------------------------
    def create_room(
        self,
        name: str,
        uid: bytes,
        admin: str,
        head: bytes,
        change: bytes,
        wrapped_key: bytes,
        msg_ref: bytes,
        admin_identity: bytes,
        now: float,
    ) -> int | None:
        _check_create_room(name, uid, admin, head, change, wrapped_key, msg_ref, admin_identity)
        status, room_id = self._call(
            "sp_create_room", name, uid, admin, head, change, wrapped_key, msg_ref, admin_identity, now
        )[0]
        if status == "taken":
            return None
        if status != "ok":
            raise _refuse(status, actor=admin)
        return int(room_id)

    def get_room(self, name: str) -> Room | None:
        if not _is_name(name, MAX_ROOM_NAME_CHARS):
            return None
        rooms = _rooms_from_rows(self._call("sp_get_room", name))
        return rooms[0] if rooms else None

    def get_room_by_id(self, room_id: int) -> Room | None:
        if not _is_int(room_id, 1, MAX_DB_ID):
            return None
        rooms = _rooms_from_rows(self._call("sp_get_room_by_id", room_id))
        return rooms[0] if rooms else None

    def rooms_of(self, username: str) -> list[Room]:
        if not _is_name(username, MAX_USERNAME_CHARS):
            return []
        return _rooms_from_rows(self._call("sp_rooms_of", username))

    def change_room(
        self,
        room_id: int,
        expected_epoch: int,
        head: bytes,
        *,
        add: str | None = None,
        remove: str | None = None,
        close: bool = False,
        change: bytes,
        wrapped_key: bytes | None,
        actor: str,
        actor_identity: bytes,
        msg_ref: bytes,
        now: float,
    ) -> tuple[str, int]:
        _check_change_room(
            expected_epoch, head, add, remove, close, change, wrapped_key, actor, actor_identity, msg_ref
        )
        if not _is_int(room_id, 1, MAX_DB_ID):
            return ROOM_GONE, 0
        status, epoch = self._call(
            "sp_change_room",
            room_id,
            expected_epoch,
            head,
            add,
            remove,
            1 if close else 0,
            change,
            wrapped_key,
            actor,
            actor_identity,
            msg_ref,
            now,
        )[0]
        if status in (ROOM_OK, ROOM_STALE, ROOM_GONE):
            return str(status), int(epoch)
        raise _refuse(status, add=add, remove=remove, actor=actor)

    def room_enqueue(
        self,
        room_id: int,
        epoch: int,
        sender: str,
        sender_identity: bytes,
        msg_ref: bytes,
        payload: bytes,
        recipients: list[str],
        now: float,
        max_messages: int,
        max_bytes: int,
    ) -> dict[str, str]:
        targets = _room_targets(room_id, epoch, sender, sender_identity, msg_ref, payload, recipients)
        if not targets:
            return {}
        # Names never hold a comma (checked above): the procedure splits the list on them.
        (statuses,) = self._call(
            "sp_room_enqueue",
            room_id,
            epoch,
            sender,
            sender_identity,
            msg_ref,
            payload,
            ",".join(targets),
            now,
            max_messages,
            max_bytes,
        )[0]
        answers = str(statuses).split(",")
        if len(answers) != len(targets):
            raise DatabaseError(
                "sp_room_enqueue answered for another number of recipients than it was given."
            )
        return dict(zip(targets, answers))

    def room_key(self, room_id: int, epoch: int) -> bytes | None:
        if not (_is_int(room_id, 1, MAX_DB_ID) and _is_int(epoch, 0, MAX_EPOCH)):
            return None
        rows = self._call("sp_room_key", room_id, epoch)
        return bytes(rows[0][0]) if rows else None

    def close(self) -> None:
        self._pool.close()


# =============================================================================
# URLs
# =============================================================================
def open_storage(url: str, *, create_database: bool = False, apply_schema: bool = True) -> Storage:
    """``sqlite:///relative/path.db``, ``sqlite:////abs/path.db`` or
    ``mysql://USER[:PASS]@HOST[:PORT]/DB`` (the password may come from the
    SECUREIM_DB_PASSWORD environment variable instead, to keep it out of ``ps``)."""
    import os

    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "sqlite":
        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
        if not path:
            raise ConfigError("A SQLite URL looks like sqlite:///path/to/file.db")
        return SQLiteStorage(path)
    if parsed.scheme in ("mysql", "mariadb"):
        database = parsed.path.lstrip("/")
        if not parsed.hostname or not database:
            raise ConfigError("A MySQL URL looks like mysql://USER[:PASS]@HOST[:PORT]/DB")
        password = urllib.parse.unquote(parsed.password or "") or os.environ.get("SECUREIM_DB_PASSWORD", "")
        return MySQLStorage(
            host=parsed.hostname,
            port=parsed.port or 3306,
            user=urllib.parse.unquote(parsed.username or "root"),
            password=password,
            database=database,
            create_database=create_database,
            apply_schema=apply_schema,
        )
    raise ConfigError(f"Unknown database URL scheme {parsed.scheme!r}; use sqlite:/// or mysql://")
