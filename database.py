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
    kind: str          # "user" or "address"
    target: str        # a username, or a network in CIDR form
    until: float       # 0 = until unbanned
    reason: str


@dataclass(frozen=True)
class AdminAction:
    id: int
    action: str        # "kick" (ban, reset and delete post one too), or "address" (re-read address bans)
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
    msg_ref: bytes          # the sender's 16-byte reference: a resend of the same message is not stored twice
    sender_identity: bytes  # the sender's identity key when it was stored
    payload: bytes          # the end-to-end payload, opaque to the server
    stored_at: float
    wrapped_key: bytes | None  # the KDC key of (conversation, generation), sealed under the server's key


@dataclass(frozen=True)
class PrekeyStatus:
    one_time_left: int
    signed_id: int | None
    signed_at: float | None


# enqueue() answers
STORED, DUPLICATE, FULL_MESSAGES, FULL_BYTES, NO_KEY = "stored", "duplicate", "full_messages", "full_bytes", "no_key"

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
        """Create the user; False if the name is taken."""
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

    def record_login_failure(self, username: str, source: str, now: float,
                             max_failures: int, lock_s: float) -> LoginFailures:
        raise NotImplementedError

    def clear_login_failures(self, username: str, source: str) -> None:
        raise NotImplementedError

    # -- operating the server -------------------------------------------------------
    def audit(self, event: str, username: str = "", source: str = "", detail: str = "",
              at: float | None = None) -> None:
        """Append one audit row.  Callers never pass passwords, keys or message text."""
        raise NotImplementedError

    def audit_events(self, username: str | None = None, since: float = 0.0, limit: int = 1000) -> list[AuditEvent]:
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
        """Remove the account and everything kept for it (conversations, lockouts, sessions)."""
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

    def put_offline_key(self, recipient: str, conversation_id: int, generation: int, sender: str,
                        wrapped: bytes, now: float) -> None:
        raise NotImplementedError

    def enqueue(self, msg: QueuedMessage, max_messages: int, max_bytes: int) -> tuple[str, int]:
        """Store ``msg`` for its recipient unless a bound says no: (STORED|DUPLICATE, id) or
        (FULL_MESSAGES|FULL_BYTES|NO_KEY, 0).  Nothing already stored is ever touched."""
        raise NotImplementedError

    def queued_for(self, recipient: str, after_id: int, limit: int) -> list[QueuedMessage]:
        """The recipient's stored messages after ``after_id``, oldest first, with their KDC keys."""
        raise NotImplementedError

    def ack_queued(self, recipient: str, message_id: int) -> bool:
        """The recipient's client has the message: delete it (and its key once no message needs it)."""
        raise NotImplementedError

    def expire_queue(self, before: float) -> int:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _pair(user_a: str, user_b: str) -> tuple[str, str]:
    if user_a == user_b:
        raise DatabaseError("A conversation needs two different users.")
    return (user_a, user_b) if user_a < user_b else (user_b, user_a)


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
    UNIQUE (recipient, sender, msg_ref)
);
CREATE INDEX IF NOT EXISTS ix_queue_recipient ON message_queue (recipient, id);
CREATE INDEX IF NOT EXISTS ix_queue_stored_at ON message_queue (stored_at);
"""
OFFLINE_KEY_GRACE_S = 24 * 3600.0  # an acknowledged key is kept this long: the sender may still be writing
ADMIN_ACTION_KEEP_S = 3600.0  # the servers poll every second; an hour of actions is plenty


class SQLiteStorage(Storage):
    backend = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            folder = Path(self.path).absolute().parent
            if not folder.is_dir():
                raise ConfigError(f"The folder of the SQLite database {self.path} ({folder}) does not exist; "
                                  f"create it first (sqlite:///relative/path.db is relative to the current "
                                  f"folder, sqlite:////absolute/path.db has four slashes).")
            if Path(self.path).is_dir():
                raise ConfigError(f"The SQLite database {self.path} is a folder, not a file.")
        self._pool = _Pool(self._connect)
        with self._pool.connection() as conn:  # executescript manages its own transaction
            conn.executescript(_SQLITE_SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(users)")}
            if "ticket_epoch" not in columns:  # a database from before password changes
                conn.execute("ALTER TABLE users ADD COLUMN ticket_epoch INTEGER NOT NULL DEFAULT 0")

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
        with self._tx() as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO users (username, password_hash, created_at, identity_key) VALUES (?, ?, ?, ?)",
                (username, password_hash, time.time(), identity_key))
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
            conn.execute("UPDATE users SET password_hash = ?, ticket_epoch = ticket_epoch + 1 WHERE username = ?",
                         (password_hash, username))
            row = conn.execute("SELECT ticket_epoch FROM users WHERE username = ?", (username,)).fetchone()
        return int(row[0]) if row else None

    def open_conversation(self, user_a: str, user_b: str) -> int:
        low, high = _pair(user_a, user_b)
        with self._tx() as conn:
            conn.execute("INSERT OR IGNORE INTO conversations (user_low, user_high, created_at) VALUES (?, ?, ?)",
                         (low, high, time.time()))
            (cid,) = conn.execute("SELECT id FROM conversations WHERE user_low = ? AND user_high = ?",
                                  (low, high)).fetchone()
            conn.executemany("INSERT OR IGNORE INTO conversation_members (conversation_id, username) VALUES (?, ?)",
                             [(cid, low), (cid, high)])
            return cid

    def record_key_generation(self, conversation_id: int) -> int:
        with self._tx() as conn:
            conn.execute("UPDATE conversations SET key_generation = key_generation + 1, key_generated_at = ? "
                         "WHERE id = ?", (time.time(), conversation_id))
            row = conn.execute("SELECT key_generation FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        if row is None:
            raise DatabaseError(f"No conversation {conversation_id}.")
        return row[0]

    def get_conversation(self, conversation_id: int) -> Conversation | None:
        with self._tx() as conn:
            row = conn.execute("SELECT id, user_low, user_high, key_generation, key_generated_at "
                               "FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        if row is None:
            return None
        return Conversation(row[0], (row[1], row[2]), row[3], row[4])

    def get_login_failures(self, username: str, source: str) -> LoginFailures:
        with self._tx() as conn:
            row = conn.execute("SELECT failures, locked_until FROM login_failures WHERE username = ? AND source = ?",
                               (username, source)).fetchone()
        return LoginFailures(*row) if row else LoginFailures(0, 0.0)

    def record_login_failure(self, username: str, source: str, now: float,
                             max_failures: int, lock_s: float) -> LoginFailures:
        with self._tx() as conn:
            row = conn.execute("SELECT failures, locked_until FROM login_failures WHERE username = ? AND source = ?",
                               (username, source)).fetchone()
            failures, locked_until = row if row else (0, 0.0)
            if 0 < locked_until <= now:  # a failure after an expired lock starts a fresh count
                failures, locked_until = 0, 0.0
            failures += 1
            if failures >= max_failures and locked_until <= now:
                locked_until = now + lock_s
            conn.execute("INSERT INTO login_failures (username, source, failures, locked_until, updated_at) "
                         "VALUES (?, ?, ?, ?, ?) ON CONFLICT (username, source) DO UPDATE SET "
                         "failures = excluded.failures, locked_until = excluded.locked_until, "
                         "updated_at = excluded.updated_at",
                         (username, source, failures, locked_until, now))
        return LoginFailures(failures, locked_until)

    def clear_login_failures(self, username: str, source: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM login_failures WHERE username = ? AND source = ?", (username, source))

    # -- operating the server -------------------------------------------------------
    def audit(self, event: str, username: str = "", source: str = "", detail: str = "",
              at: float | None = None) -> None:
        with self._tx() as conn:
            conn.execute("INSERT INTO audit_log (at, event, username, source, detail) VALUES (?, ?, ?, ?, ?)",
                         (time.time() if at is None else at, event[:32], username[:32], source[:64],
                          detail[:MAX_AUDIT_DETAIL]))

    def audit_events(self, username: str | None = None, since: float = 0.0, limit: int = 1000) -> list[AuditEvent]:
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT at, event, username, source, detail FROM audit_log WHERE at >= ? "
                "AND (? IS NULL OR username = ?) ORDER BY at, id LIMIT ?",
                (since, username, username, limit)).fetchall()
        return [AuditEvent(*row) for row in rows]

    def prune_audit(self, before: float) -> int:
        with self._tx() as conn:
            return conn.execute("DELETE FROM audit_log WHERE at < ?", (before,)).rowcount

    def set_ban(self, kind: str, target: str, until: float, reason: str) -> None:
        with self._tx() as conn:
            conn.execute("INSERT INTO bans (kind, target, until, reason, created_at) VALUES (?, ?, ?, ?, ?) "
                         "ON CONFLICT (kind, target) DO UPDATE SET until = excluded.until, "
                         "reason = excluded.reason, created_at = excluded.created_at",
                         (kind, target, until, reason[:MAX_REASON_CHARS], time.time()))

    def remove_ban(self, kind: str, target: str) -> bool:
        with self._tx() as conn:
            return conn.execute("DELETE FROM bans WHERE kind = ? AND target = ?", (kind, target)).rowcount > 0

    def active_bans(self, now: float, kind: str | None = None) -> list[Ban]:
        with self._tx() as conn:
            rows = conn.execute("SELECT kind, target, until, reason FROM bans WHERE (until = 0 OR until > ?) "
                                "AND (? IS NULL OR kind = ?) ORDER BY kind, target", (now, kind, kind)).fetchall()
        return [Ban(*row) for row in rows]

    def user_ban(self, username: str, now: float) -> Ban | None:
        with self._tx() as conn:
            row = conn.execute("SELECT kind, target, until, reason FROM bans WHERE kind = 'user' AND target = ? "
                               "AND (until = 0 OR until > ?)", (username, now)).fetchone()
        return Ban(*row) if row else None

    def post_admin_action(self, action: str, username: str, reason: str) -> int:
        now = time.time()
        with self._tx() as conn:
            conn.execute("DELETE FROM admin_actions WHERE at < ?", (now - ADMIN_ACTION_KEEP_S,))
            cur = conn.execute("INSERT INTO admin_actions (at, action, username, reason) VALUES (?, ?, ?, ?)",
                               (now, action, username, reason[:MAX_REASON_CHARS]))
            return cur.lastrowid

    def admin_actions_after(self, last_id: int) -> list[AdminAction]:
        with self._tx() as conn:
            rows = conn.execute("SELECT id, action, username, reason FROM admin_actions WHERE id > ? "
                                "ORDER BY id LIMIT 1000", (last_id,)).fetchall()
        return [AdminAction(*row) for row in rows]

    def last_admin_action_id(self) -> int:
        with self._tx() as conn:
            return conn.execute("SELECT COALESCE(MAX(id), 0) FROM admin_actions").fetchone()[0]

    def bump_ticket_epoch(self, username: str) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE users SET ticket_epoch = ticket_epoch + 1 WHERE username = ?", (username,))

    def set_password_hash(self, username: str, password_hash: str) -> bool:
        with self._tx() as conn:
            return conn.execute("UPDATE users SET password_hash = ? WHERE username = ?",
                                (password_hash, username)).rowcount == 1

    def record_login(self, username: str, now: float) -> None:
        with self._tx() as conn:
            conn.execute("INSERT INTO account_state (username, last_login_at) VALUES (?, ?) "
                         "ON CONFLICT (username) DO UPDATE SET last_login_at = excluded.last_login_at",
                         (username, now))

    def list_users(self, now: float) -> list[UserInfo]:
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT u.username, u.created_at, a.last_login_at, EXISTS (SELECT 1 FROM login_failures f "
                "WHERE f.username = u.username AND f.locked_until > ?) FROM users u LEFT JOIN account_state a "
                "ON a.username = u.username ORDER BY u.username", (now,)).fetchall()
        return [UserInfo(r[0], r[1], r[2], bool(r[3])) for r in rows]

    def delete_user(self, username: str) -> bool:
        with self._tx() as conn:
            gone = conn.execute("DELETE FROM users WHERE username = ?", (username,)).rowcount == 1
            conn.execute("DELETE FROM conversations WHERE user_low = ? OR user_high = ?", (username, username))
            conn.execute("DELETE FROM conversation_members WHERE username = ?", (username,))
            conn.execute("DELETE FROM account_state WHERE username = ?", (username,))
            conn.execute("DELETE FROM login_failures WHERE username = ?", (username,))
            conn.execute("DELETE FROM live_sessions WHERE username = ?", (username,))
            conn.execute("DELETE FROM signed_prekeys WHERE username = ?", (username,))
            conn.execute("DELETE FROM one_time_prekeys WHERE username = ?", (username,))
            conn.execute("DELETE FROM offline_keys WHERE recipient = ? OR sender = ?", (username, username))
            conn.execute("DELETE FROM message_queue WHERE recipient = ? OR sender = ?", (username, username))
        return gone

    def list_lockouts(self, now: float) -> list[Lockout]:
        with self._tx() as conn:
            rows = conn.execute("SELECT username, source, failures, locked_until FROM login_failures "
                                "WHERE locked_until > ? ORDER BY username, source", (now,)).fetchall()
        return [Lockout(*row) for row in rows]

    def clear_all_login_failures(self, username: str) -> int:
        with self._tx() as conn:
            return conn.execute("DELETE FROM login_failures WHERE username = ?", (username,)).rowcount

    def session_started(self, node: str, username: str, source: str, since: float) -> None:
        with self._tx() as conn:
            conn.execute("INSERT INTO live_sessions (node, username, source, since) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT (node, username) DO UPDATE SET source = excluded.source, "
                         "since = excluded.since", (node, username, source, since))

    def record_session_start(self, node: str, username: str, source: str, now: float, event: str) -> None:
        with self._tx() as conn:
            conn.execute("INSERT INTO account_state (username, last_login_at) VALUES (?, ?) "
                         "ON CONFLICT (username) DO UPDATE SET last_login_at = excluded.last_login_at",
                         (username, now))
            conn.execute("INSERT INTO live_sessions (node, username, source, since) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT (node, username) DO UPDATE SET source = excluded.source, "
                         "since = excluded.since", (node, username, source, now))
            conn.execute("INSERT INTO audit_log (at, event, username, source, detail) VALUES (?, ?, ?, ?, '')",
                         (now, event[:32], username[:32], source[:64]))

    def session_ended(self, node: str, username: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM live_sessions WHERE node = ? AND username = ?", (node, username))

    def clear_sessions(self, node: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM live_sessions WHERE node = ?", (node,))

    def list_sessions(self) -> list[LiveSession]:
        with self._tx() as conn:
            rows = conn.execute("SELECT node, username, source, since FROM live_sessions "
                                "ORDER BY username, node").fetchall()
        return [LiveSession(*row) for row in rows]

    # -- store and forward ------------------------------------------------------------
    def set_signed_prekey(self, username: str, key_id: int, entry: bytes, now: float) -> None:
        with self._tx() as conn:
            conn.execute("INSERT INTO signed_prekeys (username, key_id, entry, created_at) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT (username) DO UPDATE SET key_id = excluded.key_id, entry = excluded.entry, "
                         "created_at = excluded.created_at", (username, key_id, entry, now))

    def add_one_time_prekeys(self, username: str, entries: list[tuple[int, bytes]], max_kept: int) -> int:
        with self._tx() as conn:
            (count,) = conn.execute("SELECT COUNT(*) FROM one_time_prekeys WHERE username = ?",
                                    (username,)).fetchone()
            room = max(0, max_kept - count)
            conn.executemany("INSERT OR IGNORE INTO one_time_prekeys (username, key_id, entry) VALUES (?, ?, ?)",
                             [(username, key_id, entry) for key_id, entry in entries[:room]])
            return conn.execute("SELECT COUNT(*) FROM one_time_prekeys WHERE username = ?",
                                (username,)).fetchone()[0]

    def prekey_status(self, username: str) -> PrekeyStatus:
        with self._tx() as conn:
            (count,) = conn.execute("SELECT COUNT(*) FROM one_time_prekeys WHERE username = ?",
                                    (username,)).fetchone()
            row = conn.execute("SELECT key_id, created_at FROM signed_prekeys WHERE username = ?",
                               (username,)).fetchone()
        return PrekeyStatus(count, row[0] if row else None, row[1] if row else None)

    def take_prekey_bundle(self, username: str) -> tuple[bytes | None, bytes | None]:
        with self._tx() as conn:
            signed = conn.execute("SELECT entry FROM signed_prekeys WHERE username = ?", (username,)).fetchone()
            one = conn.execute("SELECT key_id, entry FROM one_time_prekeys WHERE username = ? "
                               "ORDER BY key_id LIMIT 1", (username,)).fetchone()
            if one is not None:
                conn.execute("DELETE FROM one_time_prekeys WHERE username = ? AND key_id = ?", (username, one[0]))
        return (bytes(signed[0]) if signed else None), (bytes(one[1]) if one else None)

    def clear_prekeys(self, username: str, *, signed: bool) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM one_time_prekeys WHERE username = ?", (username,))
            if signed:
                conn.execute("DELETE FROM signed_prekeys WHERE username = ?", (username,))

    def put_offline_key(self, recipient: str, conversation_id: int, generation: int, sender: str,
                        wrapped: bytes, now: float) -> None:
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO offline_keys (recipient, conversation_id, generation, sender, "
                         "wrapped, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                         (recipient, conversation_id, generation, sender, wrapped, now))

    def enqueue(self, msg: QueuedMessage, max_messages: int, max_bytes: int) -> tuple[str, int]:
        with self._tx() as conn:  # BEGIN IMMEDIATE: one writer at a time, so the bound holds
            row = conn.execute("SELECT id FROM message_queue WHERE recipient = ? AND sender = ? AND msg_ref = ?",
                               (msg.recipient, msg.sender, msg.msg_ref)).fetchone()
            if row is not None:
                return DUPLICATE, row[0]
            key = conn.execute("SELECT 1 FROM offline_keys WHERE recipient = ? AND conversation_id = ? AND "
                               "generation = ? AND sender = ?",
                               (msg.recipient, msg.conversation_id, msg.generation, msg.sender)).fetchone()
            if key is None:
                return NO_KEY, 0
            count, size = conn.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM message_queue "
                                       "WHERE recipient = ?", (msg.recipient,)).fetchone()
            if count >= max_messages:
                return FULL_MESSAGES, 0
            if size + len(msg.payload) > max_bytes:
                return FULL_BYTES, 0
            cur = conn.execute("INSERT INTO message_queue (recipient, sender, conversation_id, generation, msg_ref, "
                               "sender_identity, payload, stored_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               (msg.recipient, msg.sender, msg.conversation_id, msg.generation, msg.msg_ref,
                                msg.sender_identity, msg.payload, msg.stored_at))
            return STORED, int(cur.lastrowid)

    def queued_for(self, recipient: str, after_id: int, limit: int) -> list[QueuedMessage]:
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT q.id, q.recipient, q.sender, q.conversation_id, q.generation, q.msg_ref, q.sender_identity, "
                "q.payload, q.stored_at, k.wrapped FROM message_queue q LEFT JOIN offline_keys k "
                "ON k.recipient = q.recipient AND k.conversation_id = q.conversation_id AND k.generation = q.generation "
                "WHERE q.recipient = ? AND q.id > ? ORDER BY q.id LIMIT ?", (recipient, after_id, limit)).fetchall()
        return [QueuedMessage(r[0], r[1], r[2], r[3], r[4], bytes(r[5]), bytes(r[6]), bytes(r[7]), r[8],
                              bytes(r[9]) if r[9] is not None else None) for r in rows]

    def ack_queued(self, recipient: str, message_id: int) -> bool:
        with self._tx() as conn:
            row = conn.execute("SELECT conversation_id, generation FROM message_queue WHERE id = ? AND recipient = ?",
                               (message_id, recipient)).fetchone()
            if row is None:
                return False
            conn.execute("DELETE FROM message_queue WHERE id = ?", (message_id,))
            conn.execute("DELETE FROM offline_keys WHERE recipient = ? AND conversation_id = ? AND generation = ? "
                         "AND NOT EXISTS (SELECT 1 FROM message_queue WHERE recipient = ? AND conversation_id = ? "
                         "AND generation = ?) AND created_at < ?",
                         (recipient, row[0], row[1], recipient, row[0], row[1], time.time() - OFFLINE_KEY_GRACE_S))
            return True

    def expire_queue(self, before: float) -> int:
        with self._tx() as conn:
            gone = conn.execute("DELETE FROM message_queue WHERE stored_at < ?", (before,)).rowcount
            conn.execute("DELETE FROM offline_keys WHERE created_at < ? AND NOT EXISTS (SELECT 1 FROM message_queue q "
                         "WHERE q.recipient = offline_keys.recipient AND q.conversation_id = offline_keys.conversation_id "
                         "AND q.generation = offline_keys.generation)", (before,))
        return gone

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

    def __init__(self, *, host: str = "127.0.0.1", port: int = 3306, user: str = "root",
                 password: str = "", database: str, create_database: bool = False,
                 apply_schema: bool = True) -> None:
        import pymysql  # imported here: only the MySQL backend needs it

        self._pymysql = pymysql
        self._params = dict(host=host, port=port, user=user, password=password, database=database,
                            connect_timeout=CONNECT_TIMEOUT_S, read_timeout=30, write_timeout=30,
                            charset="utf8mb4", autocommit=True)
        if not re.fullmatch(r"[A-Za-z0-9_]{1,64}", database):
            raise ConfigError("MySQL database names may use letters, digits and _ only.")
        self._create_database_if_missing(explicit=create_database)
        self._pool = _Pool(self._connect)
        if apply_schema:  # admin.py passes False: re-creating procedures under a running server races its calls
            self.apply_schema()

    def _explain(self, exc: Exception) -> str:
        """One sentence on what went wrong, by MySQL error number (never the password)."""
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        where = f"{self._params['host']}:{self._params['port']}"
        user, db = self._params["user"], self._params["database"]
        if code in (1045, 1698):  # ER_ACCESS_DENIED_ERROR, ER_ACCESS_DENIED_NO_PASSWORD_ERROR
            return (f"MySQL at {where} refused user {user!r}: wrong user name or password "
                    f"(or that user may not connect from this host).")
        if code == 1044:  # ER_DBACCESS_DENIED_ERROR
            return (f"MySQL user {user!r} may not use or create the database {db!r}; an administrator can run: "
                    f"CREATE DATABASE {db}; GRANT ALL ON {db}.* TO '{user}'@'%';")
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
            raise DatabaseUnavailable(f"The MySQL database {name!r} does not exist and could not be created: "
                                      f"{self._explain(exc)}") from exc
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

    def record_login_failure(self, username: str, source: str, now: float,
                             max_failures: int, lock_s: float) -> LoginFailures:
        rows = self._call("sp_record_login_failure", username, source, now, max_failures, lock_s)
        return LoginFailures(int(rows[0][0]), float(rows[0][1]))

    def clear_login_failures(self, username: str, source: str) -> None:
        self._call("sp_clear_login_failures", username, source)

    # -- operating the server -------------------------------------------------------
    def audit(self, event: str, username: str = "", source: str = "", detail: str = "",
              at: float | None = None) -> None:
        self._call("sp_audit", time.time() if at is None else at, event[:32], username[:32], source[:64],
                   detail[:MAX_AUDIT_DETAIL])

    def audit_events(self, username: str | None = None, since: float = 0.0, limit: int = 1000) -> list[AuditEvent]:
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
        return int(self._call("sp_post_admin_action", now, now - ADMIN_ACTION_KEEP_S, action, username,
                              reason[:MAX_REASON_CHARS])[0][0])

    def admin_actions_after(self, last_id: int) -> list[AdminAction]:
        return [AdminAction(int(r[0]), r[1], r[2], r[3]) for r in self._call("sp_admin_actions_after", last_id)]

    def last_admin_action_id(self) -> int:
        return int(self._call("sp_last_admin_action_id")[0][0])

    def bump_ticket_epoch(self, username: str) -> None:
        self._call("sp_bump_ticket_epoch", username)

    def set_password_hash(self, username: str, password_hash: str) -> bool:
        return int(self._call("sp_set_password_hash", username, password_hash)[0][0]) == 1

    def record_login(self, username: str, now: float) -> None:
        self._call("sp_record_login", username, now)

    def list_users(self, now: float) -> list[UserInfo]:
        return [UserInfo(r[0], float(r[1]), float(r[2]) if r[2] is not None else None, bool(r[3]))
                for r in self._call("sp_list_users", now)]

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
        return PrekeyStatus(int(row[0]), int(row[1]) if row[1] is not None else None,
                            float(row[2]) if row[2] is not None else None)

    def take_prekey_bundle(self, username: str) -> tuple[bytes | None, bytes | None]:
        row = self._call("sp_take_prekey_bundle", username)[0]
        return (bytes(row[0]) if row[0] is not None else None), (bytes(row[1]) if row[1] is not None else None)

    def clear_prekeys(self, username: str, *, signed: bool) -> None:
        self._call("sp_clear_prekeys", username, 1 if signed else 0)

    def put_offline_key(self, recipient: str, conversation_id: int, generation: int, sender: str,
                        wrapped: bytes, now: float) -> None:
        self._call("sp_put_offline_key", recipient, conversation_id, generation, sender, wrapped, now)

    def enqueue(self, msg: QueuedMessage, max_messages: int, max_bytes: int) -> tuple[str, int]:
        row = self._call("sp_enqueue", msg.recipient, msg.sender, msg.conversation_id, msg.generation, msg.msg_ref,
                         msg.sender_identity, msg.payload, msg.stored_at, max_messages, max_bytes)[0]
        return str(row[0]), int(row[1])

    def queued_for(self, recipient: str, after_id: int, limit: int) -> list[QueuedMessage]:
        return [QueuedMessage(int(r[0]), r[1], r[2], int(r[3]), int(r[4]), bytes(r[5]), bytes(r[6]), bytes(r[7]),
                              float(r[8]), bytes(r[9]) if r[9] is not None else None)
                for r in self._call("sp_queued_for", recipient, after_id, limit)]

    def ack_queued(self, recipient: str, message_id: int) -> bool:
        return bool(self._call("sp_ack_queued", recipient, message_id, time.time() - OFFLINE_KEY_GRACE_S)[0][0])

    def expire_queue(self, before: float) -> int:
        return int(self._call("sp_expire_queue", before)[0][0])

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
        path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
        if not path:
            raise ConfigError("A SQLite URL looks like sqlite:///path/to/file.db")
        return SQLiteStorage(path)
    if parsed.scheme in ("mysql", "mariadb"):
        database = parsed.path.lstrip("/")
        if not parsed.hostname or not database:
            raise ConfigError("A MySQL URL looks like mysql://USER[:PASS]@HOST[:PORT]/DB")
        password = urllib.parse.unquote(parsed.password or "") or os.environ.get("SECUREIM_DB_PASSWORD", "")
        return MySQLStorage(host=parsed.hostname, port=parsed.port or 3306,
                            user=urllib.parse.unquote(parsed.username or "root"),
                            password=password, database=database, create_database=create_database,
                            apply_schema=apply_schema)
    raise ConfigError(f"Unknown database URL scheme {parsed.scheme!r}; use sqlite:/// or mysql://")
