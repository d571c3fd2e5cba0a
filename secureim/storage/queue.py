"""Queue: store and forward: signed and one-time prekeys, the KDC keys of offline
conversations sealed under the server's key, and the queued messages.

The SQLite side (``QueueSQLite``, queries in a ``BEGIN IMMEDIATE`` transaction) and the MySQL
side (``QueueMySQL``, stored procedures of the migrations in migrations/mysql/) side by side.
"""

from __future__ import annotations

import time

from secureim.storage.base import (
    check_pair_row,
    rowid,
)
from secureim.storage.mysql_engine import MySQLEngine
from secureim.storage.records import (
    DUPLICATE,
    FULL_BYTES,
    FULL_MESSAGES,
    KIND_PAIR,
    NO_KEY,
    OFFLINE_KEY_GRACE_S,
    STORED,
    PrekeyStatus,
    QueuedMessage,
)
from secureim.storage.sqlite_engine import SQLiteEngine


class QueueSQLite(SQLiteEngine):
    """Store and forward: prekeys, the sealed KDC keys of offline conversations, queued messages (SQLite)."""

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
            return STORED, rowid(cur.lastrowid)

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


class QueueMySQL(MySQLEngine):
    """Store and forward: prekeys, the sealed KDC keys of offline conversations, queued messages (MySQL: stored procedures)."""

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
        check_pair_row(msg)
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
