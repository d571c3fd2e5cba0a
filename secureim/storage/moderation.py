"""Moderation: operating the server: the audit log, bans, admin actions, live sessions.

The SQLite side (``ModerationSQLite``, queries in a ``BEGIN IMMEDIATE`` transaction) and the MySQL
side (``ModerationMySQL``, stored procedures of the migrations in migrations/mysql/) side by side.
"""

from __future__ import annotations

import time

from secureim.storage.base import rowid
from secureim.storage.mysql_engine import MySQLEngine
from secureim.storage.records import (
    ADMIN_ACTION_KEEP_S,
    MAX_AUDIT_DETAIL,
    MAX_REASON_CHARS,
    AdminAction,
    AuditEvent,
    Ban,
    LiveSession,
)
from secureim.storage.sqlite_engine import SQLiteEngine


class ModerationSQLite(SQLiteEngine):
    """Operating the server: the audit log, bans, admin actions, live sessions (SQLite)."""

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
            return rowid(cur.lastrowid)

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


class ModerationMySQL(MySQLEngine):
    """Operating the server: the audit log, bans, admin actions, live sessions (MySQL: stored procedures)."""

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
