"""Accounts: users, identity keys, passwords and ticket epochs, failed logins and lockouts,
deleting an account.

The SQLite side (``AccountsSQLite``, queries in a ``BEGIN IMMEDIATE`` transaction) and the MySQL
side (``AccountsMySQL``, stored procedures of the migrations in migrations/mysql/) side by side.
"""

from __future__ import annotations

import time

from secureim.storage.mysql_engine import MySQLEngine
from secureim.storage.records import (
    Lockout,
    LoginFailures,
    UserInfo,
)
from secureim.storage.sqlite_engine import SQLiteEngine


class AccountsSQLite(SQLiteEngine):
    """Users, identity keys, passwords and ticket epochs, failed logins and lockouts (SQLite)."""

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


class AccountsMySQL(MySQLEngine):
    """Users, identity keys, passwords and ticket epochs, failed logins and lockouts (MySQL: stored procedures)."""

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
