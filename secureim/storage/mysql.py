"""The MySQL/MariaDB backend: every query is a stored procedure from schema.sql."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

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
    CONNECT_TIMEOUT_S,
    MAX_AUDIT_DETAIL,
    MAX_DB_ID,
    MAX_EPOCH,
    MAX_REASON_CHARS,
    MAX_ROOM_NAME_CHARS,
    MAX_USERNAME_CHARS,
    ROOM_GONE,
    ROOM_OK,
    ROOM_STALE,
    SCHEMA_LOCK_WAIT_S,
    SCHEMA_PATH,
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
from secureim.storage.sqlite import ADMIN_ACTION_KEEP_S, OFFLINE_KEY_GRACE_S

log = logging.getLogger("secureim.database")


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
        self._pool = ConnectionPool(self._connect)
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
        check_create_room(name, uid, admin, head, change, wrapped_key, msg_ref, admin_identity)
        status, room_id = self._call(
            "sp_create_room", name, uid, admin, head, change, wrapped_key, msg_ref, admin_identity, now
        )[0]
        if status == "taken":
            return None
        if status != "ok":
            raise refuse(status, actor=admin)
        return int(room_id)

    def get_room(self, name: str) -> Room | None:
        if not is_name(name, MAX_ROOM_NAME_CHARS):
            return None
        rooms = rooms_from_rows(self._call("sp_get_room", name))
        return rooms[0] if rooms else None

    def get_room_by_id(self, room_id: int) -> Room | None:
        if not is_int(room_id, 1, MAX_DB_ID):
            return None
        rooms = rooms_from_rows(self._call("sp_get_room_by_id", room_id))
        return rooms[0] if rooms else None

    def rooms_of(self, username: str) -> list[Room]:
        if not is_name(username, MAX_USERNAME_CHARS):
            return []
        return rooms_from_rows(self._call("sp_rooms_of", username))

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
        raise refuse(status, add=add, remove=remove, actor=actor)

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
        if not (is_int(room_id, 1, MAX_DB_ID) and is_int(epoch, 0, MAX_EPOCH)):
            return None
        rows = self._call("sp_room_key", room_id, epoch)
        return bytes(rows[0][0]) if rows else None

    def close(self) -> None:
        self._pool.close()
