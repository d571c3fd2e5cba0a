"""The embedded SQLite backend."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from secureim.errors import ConfigError, DatabaseError, DatabaseUnavailable
from secureim.storage.base import (
    ConnectionPool,
    Storage,
    check_change_room,
    check_create_room,
    check_pair_row,
    is_int,
    is_name,
    ordered_pair,
    refuse,
    room_targets,
    rooms_from_rows,
)
from secureim.storage.records import (
    DUPLICATE,
    FULL_BYTES,
    FULL_MESSAGES,
    KIND_PAIR,
    MAX_AUDIT_DETAIL,
    MAX_DB_ID,
    MAX_EPOCH,
    MAX_REASON_CHARS,
    MAX_ROOM_NAME_CHARS,
    MAX_USERNAME_CHARS,
    NO_KEY,
    NO_USER,
    ROOM_GONE,
    ROOM_OK,
    ROOM_STALE,
    STORED,
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
        self._pool = ConnectionPool(self._connect)
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
        low, high = ordered_pair(user_a, user_b)
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
        check_pair_row(msg)
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
        check_create_room(name, uid, admin, head, change, wrapped_key, msg_ref, admin_identity)
        with self._tx() as conn:  # BEGIN IMMEDIATE: nobody takes the name between the look and the insert
            if conn.execute("SELECT 1 FROM rooms WHERE name = ?", (name,)).fetchone():
                return None
            if self._ref_used(conn, admin, msg_ref, [admin]):
                raise refuse("ref_used", actor=admin)
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
        if not is_name(name, MAX_ROOM_NAME_CHARS):
            return None
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT r.id, r.name, r.uid, r.admin, r.epoch, r.head, m.username FROM rooms r "
                "LEFT JOIN room_members m ON m.room_id = r.id WHERE r.name = ?",
                (name,),
            ).fetchall()
        rooms = rooms_from_rows(rows)
        return rooms[0] if rooms else None

    def get_room_by_id(self, room_id: int) -> Room | None:
        if not is_int(room_id, 1, MAX_DB_ID):
            return None
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT r.id, r.name, r.uid, r.admin, r.epoch, r.head, m.username FROM rooms r "
                "LEFT JOIN room_members m ON m.room_id = r.id WHERE r.id = ?",
                (room_id,),
            ).fetchall()
        rooms = rooms_from_rows(rows)
        return rooms[0] if rooms else None

    def rooms_of(self, username: str) -> list[Room]:
        if not is_name(username, MAX_USERNAME_CHARS):
            return []
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT r.id, r.name, r.uid, r.admin, r.epoch, r.head, all_m.username "
                "FROM room_members me JOIN rooms r ON r.id = me.room_id "
                "JOIN room_members all_m ON all_m.room_id = r.id WHERE me.username = ?",
                (username,),
            ).fetchall()
        return rooms_from_rows(rows)

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
        check_change_room(
            expected_epoch, head, add, remove, close, change, wrapped_key, actor, actor_identity, msg_ref
        )
        if not is_int(room_id, 1, MAX_DB_ID):
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
                raise refuse("member", add=add)
            if remove is not None and remove not in members:
                raise refuse("not_member", remove=remove)
            if remove is not None and remove == admin:
                raise refuse("admin")
            if epoch >= MAX_EPOCH:
                raise refuse("epoch_full")
            # Every member after the change and the one removed: the members before plus the one added.
            recipients = sorted(members | ({add} if add is not None else set()))
            if self._ref_used(conn, actor, msg_ref, recipients):
                raise refuse("ref_used", actor=actor)
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
        targets = room_targets(room_id, epoch, sender, sender_identity, msg_ref, payload, recipients)
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
        if not (is_int(room_id, 1, MAX_DB_ID) and is_int(epoch, 0, MAX_EPOCH)):
            return None
        with self._tx() as conn:
            row = conn.execute(
                "SELECT wrapped FROM room_keys WHERE room_id = ? AND epoch = ?", (room_id, epoch)
            ).fetchone()
        return bytes(row[0]) if row else None

    def close(self) -> None:
        self._pool.close()
