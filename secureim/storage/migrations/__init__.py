"""Numbered schema migrations, one folder per backend (``sqlite/``, ``mysql/``).

A migration is a file ``NNNN_short_name.sql``; the numbers start at 1 and have no gaps.  The
engines (``secureim.storage.sqlite_engine``, ``secureim.storage.mysql_engine``) read the
database's version (``schema_version``: one row per migration applied), apply every newer
migration in order and write its row.  See the package docstring of ``secureim.storage`` for the
rules a new migration follows.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from secureim.errors import DatabaseError

HERE = Path(__file__).resolve().parent
BACKENDS = ("sqlite", "mysql")
_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")

# The version table: created (if missing) before anything is read, so that a database from before
# schema versions reads as version 0.  (Not part of a migration: it is what tells which to apply.)
SQLITE_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL PRIMARY KEY, "
    "name TEXT NOT NULL, applied_at REAL NOT NULL)"
)
MYSQL_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INT UNSIGNED NOT NULL PRIMARY KEY, "
    "name VARCHAR(100) NOT NULL, applied_at DOUBLE NOT NULL) "
    "ENGINE=InnoDB DEFAULT CHARSET=ascii COLLATE=ascii_bin"
)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")


def migrations(backend: str) -> list[Migration]:
    """Every migration of ``backend``, in order (refuses a gap, a duplicate or a stray name)."""
    if backend not in BACKENDS:
        raise ValueError(f"no migrations for the backend {backend!r}")
    found: list[Migration] = []
    for path in sorted((HERE / backend).iterdir()):
        if path.suffix != ".sql":
            continue
        match = _NAME.fullmatch(path.name)
        if match is None:
            raise DatabaseError(f"The migration {path} is not named NNNN_short_name.sql.")
        found.append(Migration(int(match.group(1)), match.group(2), path))
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise DatabaseError(
            f"The {backend} migrations are not numbered 1, 2, 3... without gaps: {[m.path.name for m in found]}"
        )
    return found


def latest(backend: str) -> int:
    """The version a database of ``backend`` has once every migration is applied."""
    return len(migrations(backend))


def pending(backend: str, current: int) -> list[Migration]:
    """The migrations a database at ``current`` still needs; a database newer than this code is
    refused (the code would call procedures or columns it does not know)."""
    known = migrations(backend)
    if current > len(known):
        raise DatabaseError(
            f"The database is at schema version {current}, newer than this server knows ({len(known)}); "
            f"run the newer server, or restore a backup taken before it."
        )
    return known[current:]


def sqlite_statements(text: str) -> list[str]:
    """Split a SQLite script into its statements (as the sqlite3 shell does)."""
    statements, current = [], ""
    for line in text.splitlines(keepends=True):
        if not current and (not line.strip() or line.lstrip().startswith("--")):
            continue
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        raise DatabaseError(f"An unfinished statement ends the migration: {current.strip()[:80]!r}")
    return statements


def full_mysql_schema() -> str:
    """The top-level schema.sql: every MySQL migration in order, and the version rows, for
    ``mysql DB < schema.sql`` on a new database.  ``python -m secureim.storage.migrations``
    prints it; a test checks that the file is this text."""
    parts = [
        "-- secureim MySQL/MariaDB schema: every migration of secureim/storage/migrations/mysql/ in\n"
        "-- order, and their schema_version rows.  GENERATED: do not edit; change or add a migration,\n"
        "-- then run: python -m secureim.storage.migrations > schema.sql\n"
        "-- For a new database (mysql DB < schema.sql); a server brings an existing one up to date\n"
        "-- itself, applying only the migrations it lacks.\n\n"
        f"{MYSQL_VERSION_TABLE};\n"
    ]
    for m in migrations("mysql"):
        parts.append(f"\n-- ===== migration {m.version:04d}_{m.name} =====\n")
        parts.append(m.sql().rstrip("\n") + "\n")
        parts.append(
            f"INSERT IGNORE INTO schema_version (version, name, applied_at) "
            f"VALUES ({m.version}, '{m.name}', UNIX_TIMESTAMP());\n"
        )
    return "".join(parts)
