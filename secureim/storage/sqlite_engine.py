"""The embedded SQLite engine: the file, its connections, transactions and migrations.

The domain modules (accounts, conversations, queue, rooms, moderation) hold the queries; each
SQLite side there is a subclass of :class:`SQLiteEngine`, and ``secureim.storage.sqlite`` puts
them together as ``SQLiteStorage``.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from secureim.errors import ConfigError, DatabaseError, DatabaseUnavailable
from secureim.storage.base import ConnectionPool, Storage
from secureim.storage.migrations import SQLITE_VERSION_TABLE, pending, sqlite_statements

log = logging.getLogger("secureim.database")

# Columns that releases before schema versions added on open where missing: (table, column,
# definition).  A database from before schema versions gets them before migration 0001 runs
# (0001's CREATE TABLE IF NOT EXISTS leaves an existing table as it is, and its index on
# message_queue (room_id, generation) needs them).  Names from this constant, never from input.
BEFORE_0001_COLUMNS = (
    ("users", "ticket_epoch", "INTEGER NOT NULL DEFAULT 0"),  # password changes
    ("message_queue", "room_id", "INTEGER NOT NULL DEFAULT 0"),  # group rooms
    ("message_queue", "kind", "INTEGER NOT NULL DEFAULT 0"),
)
WAL_SWITCH_WAIT_S = 10.0  # as the busy timeout


class SQLiteEngine(Storage):
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
        try:
            self.migrate()
        except BaseException:
            self._pool.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        if self.path != ":memory:" and not Path(self.path).exists():
            # It holds password hashes: owner-only from the first byte.
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass  # another server opening it at the same time made it a moment ago
        try:
            conn = sqlite3.connect(self.path, timeout=10, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=10000")
            self._use_wal(conn)
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise DatabaseUnavailable(f"Cannot open the SQLite database {self.path}: {exc}") from exc
        return conn

    @staticmethod
    def _use_wal(conn: sqlite3.Connection) -> None:
        """``journal_mode=WAL`` (kept in the file).  Switching a new file to it needs it alone, and
        SQLite answers "locked" at once (no busy wait) while another server opening the same new
        file holds it: try again for as long as the busy timeout."""
        deadline = time.monotonic() + WAL_SWITCH_WAIT_S
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

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

    def migrate(self) -> int:
        """Apply the migrations the file lacks, in order; answer the schema version.

        All of it is one transaction (SQLite rolls DDL back too): the migrations and their
        schema_version rows are written together or not at all.  BEGIN IMMEDIATE holds the one
        write lock, so two servers opening the same file apply each migration once: the second
        waits, then reads the version the first wrote."""
        with self._tx() as conn:
            conn.execute(SQLITE_VERSION_TABLE)
            (current,) = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
            todo = pending("sqlite", int(current))
            for migration in todo:
                if migration.version == 1:
                    self._adopt_before_versions(conn)
                try:
                    for statement in sqlite_statements(migration.sql()):
                        conn.execute(statement)
                except sqlite3.Error as exc:  # _tx rolls all of it back
                    raise DatabaseError(f"The SQLite migration {migration.path.name} failed: {exc}") from exc
                conn.execute(
                    "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, time.time()),
                )
                log.info("SQLite %s: applied migration %04d_%s", self.path, migration.version, migration.name)
            return todo[-1].version if todo else int(current)

    @staticmethod
    def _adopt_before_versions(conn: sqlite3.Connection) -> None:
        """A file from before schema versions: the columns its release may lack (none if new)."""
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "users" in tables:
            log.warning("SQLite database from before schema versions: stamping it as version 1")
        for table, column, definition in BEFORE_0001_COLUMNS:
            if table in tables and column not in {
                row[1] for row in conn.execute(f"PRAGMA table_info({table})")
            }:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")

    def schema_version(self) -> int:
        with self._tx() as conn:
            return int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])

    def close(self) -> None:
        self._pool.close()
