"""Conversations: one-to-one conversations, their members and key generations.

The SQLite side (``ConversationsSQLite``, queries in a ``BEGIN IMMEDIATE`` transaction) and the MySQL
side (``ConversationsMySQL``, stored procedures of the migrations in migrations/mysql/) side by side.
"""

from __future__ import annotations

import time

from secureim.errors import DatabaseError
from secureim.storage.base import (
    ordered_pair,
)
from secureim.storage.mysql_engine import MySQLEngine
from secureim.storage.records import (
    Conversation,
)
from secureim.storage.sqlite_engine import SQLiteEngine


class ConversationsSQLite(SQLiteEngine):
    """One-to-one conversations, their members and key generations (SQLite)."""

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


class ConversationsMySQL(MySQLEngine):
    """One-to-one conversations, their members and key generations (MySQL: stored procedures)."""

    def open_conversation(self, user_a: str, user_b: str) -> int:
        low, high = ordered_pair(user_a, user_b)
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
