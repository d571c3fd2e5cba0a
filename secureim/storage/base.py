"""The storage interface every backend implements, and the input checks they share."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from secureim.errors import DatabaseError, DatabaseUnavailable
from secureim.storage.records import (
    KIND_PAIR,
    MAX_BLOB_BYTES,
    MAX_DB_ID,
    MAX_EPOCH,
    MAX_IDENTITY_BYTES,
    MAX_ROOM_NAME_CHARS,
    MAX_USERNAME_CHARS,
    MAX_WRAPPED_KEY_BYTES,
    MSG_REF_BYTES,
    POOL_SIZE,
    POOL_WAIT_S,
    ROOM_HEAD_BYTES,
    ROOM_UID_BYTES,
    AdminAction,
    AuditEvent,
    Ban,
    Conversation,
    LiveSession,
    Lockout,
    LoginFailures,
    PrekeyStatus,
    QueuedMessage,
    Room,
    UserInfo,
)

log = logging.getLogger("secureim.database")


class ConnectionPool:
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

    def schema_version(self) -> int:
        """The database's schema version: the number of the last migration applied."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def rowid(value: int | None) -> int:
    """The id SQLite gave the row just inserted (``cursor.lastrowid``; None only if nothing was)."""
    if value is None:
        raise DatabaseError("The insert gave no row id.")
    return int(value)


def ordered_pair(user_a: str, user_b: str) -> tuple[str, str]:
    if user_a == user_b:
        raise DatabaseError("A conversation needs two different users.")
    return (user_a, user_b) if user_a < user_b else (user_b, user_a)


# --- rooms: bounds and answers shared by both backends ---------------------------------
def is_name(value: object, max_chars: int) -> bool:
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


def is_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check_name(value: object, max_chars: int, what: str) -> None:
    if not is_name(value, max_chars):
        raise ValueError(
            f"{what} must be 1 to {max_chars} printable ASCII characters without spaces or commas."
        )


def _check_bytes(value: object, what: str, low: int, high: int) -> None:
    if not isinstance(value, bytes) or not low <= len(value) <= high:
        size = f"{low} bytes" if low == high else f"{low} to {high} bytes"
        raise ValueError(f"{what} must be {size}.")


def _check_room_id(room_id: object) -> None:
    if not is_int(room_id, 1, MAX_DB_ID):
        raise ValueError("A room id is a positive 63-bit integer.")


def _check_epoch(epoch: object) -> None:
    if not is_int(epoch, 0, MAX_EPOCH):
        raise ValueError("A room epoch is a 32-bit unsigned integer.")


def _check_sender(sender: object, identity: object, msg_ref: object) -> None:
    _check_name(sender, MAX_USERNAME_CHARS, "A sender's name")
    _check_bytes(identity, "A sender's identity key", 1, MAX_IDENTITY_BYTES)
    _check_bytes(msg_ref, "A message reference", MSG_REF_BYTES, MSG_REF_BYTES)


def check_create_room(name, uid, admin, head, change, wrapped_key, msg_ref, admin_identity) -> None:
    _check_name(name, MAX_ROOM_NAME_CHARS, "A room name")
    _check_bytes(uid, "A room uid", ROOM_UID_BYTES, ROOM_UID_BYTES)
    _check_bytes(head, "A room head", ROOM_HEAD_BYTES, ROOM_HEAD_BYTES)
    _check_bytes(change, "A room change", 1, MAX_BLOB_BYTES)
    _check_bytes(wrapped_key, "A wrapped room key", 1, MAX_WRAPPED_KEY_BYTES)
    _check_sender(admin, admin_identity, msg_ref)


def check_change_room(
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


def refuse(code: str, **names: object) -> ValueError:
    return ValueError(_ROOM_REFUSALS[code].format(**names))


def rooms_from_rows(rows) -> list[Room]:
    """Rooms from rows of (id, name, uid, admin, epoch, head, member or None), one row per member."""
    found: dict[int, tuple[tuple[int, str, bytes, str, int, bytes], list[str]]] = {}
    for r in rows:
        _, members = found.setdefault(
            int(r[0]), ((int(r[0]), r[1], bytes(r[2]), r[3], int(r[4]), bytes(r[5])), [])
        )
        if r[6] is not None:
            members.append(r[6])
    rooms = [Room(*fields, tuple(sorted(members))) for fields, members in found.values()]
    return sorted(rooms, key=lambda room: room.name)


def room_targets(room_id, epoch, sender, sender_identity, msg_ref, payload, recipients) -> list[str]:
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


def check_pair_row(msg: QueuedMessage) -> None:
    if msg.kind != KIND_PAIR or msg.room_id != 0:
        raise ValueError(
            "enqueue() stores one-to-one messages; room rows go through room_enqueue() and change_room()."
        )
