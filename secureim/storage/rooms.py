"""Rooms: group rooms: rooms, members, the signed change log, wrapped room keys,
and the room rows of the queue.

The SQLite side (``RoomsSQLite``, queries in a ``BEGIN IMMEDIATE`` transaction) and the MySQL
side (``RoomsMySQL``, stored procedures of the migrations in migrations/mysql/) side by side.
"""

from __future__ import annotations

import sqlite3

from secureim.errors import DatabaseError
from secureim.storage.base import (
    check_change_room,
    check_create_room,
    is_int,
    is_name,
    refuse,
    room_targets,
    rooms_from_rows,
    rowid,
)
from secureim.storage.mysql_engine import MySQLEngine
from secureim.storage.records import (
    DUPLICATE,
    FULL_BYTES,
    FULL_MESSAGES,
    MAX_DB_ID,
    MAX_EPOCH,
    MAX_ROOM_NAME_CHARS,
    MAX_USERNAME_CHARS,
    NO_USER,
    ROOM_GONE,
    ROOM_OK,
    ROOM_STALE,
    STORED,
    Room,
)
from secureim.storage.sqlite_engine import SQLiteEngine


class RoomsSQLite(SQLiteEngine):
    """Group rooms: rooms, members, signed changes, wrapped room keys, room rows of the queue (SQLite)."""

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
        return rowid(room_id)

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


class RoomsMySQL(MySQLEngine):
    """Group rooms: rooms, members, signed changes, wrapped room keys, room rows of the queue (MySQL: stored procedures)."""

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
        return dict(zip(targets, answers, strict=True))

    def room_key(self, room_id: int, epoch: int) -> bytes | None:
        if not (is_int(room_id, 1, MAX_DB_ID) and is_int(epoch, 0, MAX_EPOCH)):
            return None
        rows = self._call("sp_room_key", room_id, epoch)
        return bytes(rows[0][0]) if rows else None
