"""Storage: one interface, two backends (embedded SQLite, MySQL/MariaDB via pymysql).

Layer: beside ``proto``; it imports only ``secureim.errors`` and the standard library (and
pymysql).  The server (``secureim.server``) is its only user; the top-level ``database.py``
re-exports this package for tools and tests.

The server stores users (name, bcrypt hash), conversations (id, members, when the key was last
generated and how many times) and failed-login bookkeeping.  It never stores a live
conversation key (design 000).  For offline delivery (docs/PROTOCOL.md section 15) it keeps
public prekeys, end-to-end ciphertext per recipient, and the KDC key of each offline
conversation sealed under the server's own key: none of it opens a stored message.

Every statement takes parameters; no SQL is built from strings.  On MySQL every query is a
stored procedure (created by the MySQL migrations).  Connections come from a small pool (pymysql
connections are not thread-safe); a dropped connection is replaced and the call retried once; a
database that stays down raises :class:`secureim.errors.DatabaseUnavailable`, which the server
turns into "try again later".

Layout
------
- ``records``: the frozen records handed back, and every column's limits;
- ``base``: the ``Storage`` interface (one class: what the server sees) and the input checks
  both backends share;
- ``sqlite_engine`` / ``mysql_engine``: the plumbing of each backend (connections,
  transactions or the stored-procedure call, migrations);
- one module per domain, its SQLite side and its MySQL side next to each other (``XxxSQLite``
  subclasses ``SQLiteEngine``, ``XxxMySQL`` subclasses ``MySQLEngine``):

  - ``accounts``: users, identity keys, passwords and ticket epochs, failed logins, lockouts,
    deleting an account;
  - ``conversations``: one-to-one conversations, their members and key generations;
  - ``queue``: store and forward: prekeys, sealed offline keys, queued messages;
  - ``rooms``: group rooms, members, signed changes, room keys, the room rows of the queue;
  - ``moderation``: the audit log, bans, admin actions, live sessions;

- ``sqlite`` / ``mysql``: ``SQLiteStorage`` and ``MySQLStorage``, each the five domain sides
  put together (callers see one class); ``factory``: ``open_storage(url)``;
- ``migrations/``: the numbered schema migrations, ``sqlite/NNNN_name.sql`` and
  ``mysql/NNNN_name.sql``.

Schema versions and migrations
------------------------------
Each database has a ``schema_version`` table, one row per migration applied (version, name,
when); its version is the highest.  At every start (``SQLiteStorage(path)``,
``MySQLStorage(...)``, ``open_storage``) the engine applies, in order, every migration newer
than the database, each followed by its row; a database newer than the code is refused.
Migration 0001 is the whole schema of the first versioned release.  A database from before
schema versions (it has no ``schema_version`` table) reads as version 0, so 0001 runs on it:
every statement of 0001 is idempotent (``CREATE TABLE IF NOT EXISTS``; on MySQL the procedures
are dropped and created again, and the columns older releases lacked are added by
``sp_add_ticket_epoch``/``sp_add_queue_rooms``; on SQLite the engine first adds them, see
``sqlite_engine.BEFORE_0001_COLUMNS``), so nothing there is lost, and it is stamped version 1.

- SQLite: all pending migrations and their rows are one ``BEGIN IMMEDIATE`` transaction (SQLite
  rolls DDL back): a migration that fails leaves the file as it was.  The write lock makes two
  servers opening one file apply each migration once.
- MySQL: the migrations run under ``GET_LOCK('secureim_schema.<db>', SCHEMA_LOCK_WAIT_S)``, so
  concurrent starts (workers, cluster nodes) apply each once and never race on DROP/CREATE
  PROCEDURE; the version is read under the lock.  MySQL commits DDL as it goes, so there is no
  transaction: the row is written right after the migration's last statement, and a MySQL
  migration must be safe to run again (a server stopped halfway runs it again).  A database
  that is up to date is not touched at start (no procedure is re-created under running
  servers).  ``admin.py`` opens with ``apply_schema=False``: it never migrates.
- The top-level ``schema.sql`` is generated: every MySQL migration in order with its version
  row, for ``mysql DB < schema.sql`` on a new database.  Never edit it by hand.

Adding a migration
------------------
1. Write ``migrations/sqlite/NNNN_what.sql`` and ``migrations/mysql/NNNN_what.sql`` with the
   next number (the same number on both backends; numbers have no gaps).  Never change a
   migration that was released: add one.  SQLite: plain statements (``ALTER TABLE``, ``CREATE
   ...``); MySQL: rerunnable statements (``IF NOT EXISTS``, a guarded ``ALTER`` inside a
   procedure as ``sp_add_queue_rooms`` does, ``DROP PROCEDURE IF EXISTS`` before each
   ``CREATE PROCEDURE``; ``DELIMITER //`` as for the mysql client).  A changed stored procedure
   is a migration too: drop and create it again there.
2. Change the domain module(s) that use the new shape, both sides.
3. Run ``python -m secureim.storage.migrations > schema.sql``.
4. Test it: tests/integration/storage/test_migrations.py applies the migrations to a database of the version
   before; tests/integration/storage/test_upgrade.py opens a database written by an older release
   (tests/fixtures/upgrade_v1) and checks that nothing is lost.
"""

from __future__ import annotations

from secureim.storage.base import (
    Storage as Storage,
)
from secureim.storage.factory import (
    open_storage as open_storage,
)
from secureim.storage.mysql import (
    MySQLStorage as MySQLStorage,
)
from secureim.storage.mysql import (
    split_sql_script as split_sql_script,
)
from secureim.storage.records import (
    ADMIN_ACTION_KEEP_S as ADMIN_ACTION_KEEP_S,
)
from secureim.storage.records import (
    BAN_KINDS as BAN_KINDS,
)
from secureim.storage.records import (
    CONNECT_TIMEOUT_S as CONNECT_TIMEOUT_S,
)
from secureim.storage.records import (
    DUPLICATE as DUPLICATE,
)
from secureim.storage.records import (
    FULL_BYTES as FULL_BYTES,
)
from secureim.storage.records import (
    FULL_MESSAGES as FULL_MESSAGES,
)
from secureim.storage.records import (
    KIND_PAIR as KIND_PAIR,
)
from secureim.storage.records import (
    KIND_ROOM_CHANGE as KIND_ROOM_CHANGE,
)
from secureim.storage.records import (
    KIND_ROOM_MESSAGE as KIND_ROOM_MESSAGE,
)
from secureim.storage.records import (
    MAX_AUDIT_DETAIL as MAX_AUDIT_DETAIL,
)
from secureim.storage.records import (
    MAX_BLOB_BYTES as MAX_BLOB_BYTES,
)
from secureim.storage.records import (
    MAX_DB_ID as MAX_DB_ID,
)
from secureim.storage.records import (
    MAX_EPOCH as MAX_EPOCH,
)
from secureim.storage.records import (
    MAX_IDENTITY_BYTES as MAX_IDENTITY_BYTES,
)
from secureim.storage.records import (
    MAX_REASON_CHARS as MAX_REASON_CHARS,
)
from secureim.storage.records import (
    MAX_ROOM_NAME_CHARS as MAX_ROOM_NAME_CHARS,
)
from secureim.storage.records import (
    MAX_USERNAME_CHARS as MAX_USERNAME_CHARS,
)
from secureim.storage.records import (
    MAX_WRAPPED_KEY_BYTES as MAX_WRAPPED_KEY_BYTES,
)
from secureim.storage.records import (
    MSG_REF_BYTES as MSG_REF_BYTES,
)
from secureim.storage.records import (
    NO_KEY as NO_KEY,
)
from secureim.storage.records import (
    NO_USER as NO_USER,
)
from secureim.storage.records import (
    OFFLINE_KEY_GRACE_S as OFFLINE_KEY_GRACE_S,
)
from secureim.storage.records import (
    POOL_SIZE as POOL_SIZE,
)
from secureim.storage.records import (
    POOL_WAIT_S as POOL_WAIT_S,
)
from secureim.storage.records import (
    ROOM_GONE as ROOM_GONE,
)
from secureim.storage.records import (
    ROOM_HEAD_BYTES as ROOM_HEAD_BYTES,
)
from secureim.storage.records import (
    ROOM_OK as ROOM_OK,
)
from secureim.storage.records import (
    ROOM_STALE as ROOM_STALE,
)
from secureim.storage.records import (
    ROOM_UID_BYTES as ROOM_UID_BYTES,
)
from secureim.storage.records import (
    SCHEMA_LOCK_WAIT_S as SCHEMA_LOCK_WAIT_S,
)
from secureim.storage.records import (
    SCHEMA_PATH as SCHEMA_PATH,
)
from secureim.storage.records import (
    STORED as STORED,
)
from secureim.storage.records import (
    AdminAction as AdminAction,
)
from secureim.storage.records import (
    AuditEvent as AuditEvent,
)
from secureim.storage.records import (
    Ban as Ban,
)
from secureim.storage.records import (
    Conversation as Conversation,
)
from secureim.storage.records import (
    LiveSession as LiveSession,
)
from secureim.storage.records import (
    Lockout as Lockout,
)
from secureim.storage.records import (
    LoginFailures as LoginFailures,
)
from secureim.storage.records import (
    PrekeyStatus as PrekeyStatus,
)
from secureim.storage.records import (
    QueuedMessage as QueuedMessage,
)
from secureim.storage.records import (
    Room as Room,
)
from secureim.storage.records import (
    UserInfo as UserInfo,
)
from secureim.storage.sqlite import (
    SQLiteStorage as SQLiteStorage,
)

__all__ = [
    "SCHEMA_PATH",
    "SCHEMA_LOCK_WAIT_S",
    "POOL_SIZE",
    "POOL_WAIT_S",
    "CONNECT_TIMEOUT_S",
    "Conversation",
    "LoginFailures",
    "AuditEvent",
    "Ban",
    "AdminAction",
    "UserInfo",
    "LiveSession",
    "Lockout",
    "QueuedMessage",
    "Room",
    "PrekeyStatus",
    "STORED",
    "DUPLICATE",
    "FULL_MESSAGES",
    "FULL_BYTES",
    "NO_KEY",
    "NO_USER",
    "ROOM_OK",
    "ROOM_STALE",
    "ROOM_GONE",
    "KIND_PAIR",
    "KIND_ROOM_MESSAGE",
    "KIND_ROOM_CHANGE",
    "MAX_ROOM_NAME_CHARS",
    "MAX_USERNAME_CHARS",
    "ROOM_UID_BYTES",
    "ROOM_HEAD_BYTES",
    "MSG_REF_BYTES",
    "MAX_IDENTITY_BYTES",
    "MAX_WRAPPED_KEY_BYTES",
    "MAX_BLOB_BYTES",
    "MAX_EPOCH",
    "MAX_DB_ID",
    "BAN_KINDS",
    "MAX_AUDIT_DETAIL",
    "MAX_REASON_CHARS",
    "Storage",
    "OFFLINE_KEY_GRACE_S",
    "ADMIN_ACTION_KEEP_S",
    "SQLiteStorage",
    "split_sql_script",
    "MySQLStorage",
    "open_storage",
]
