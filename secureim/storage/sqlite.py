"""The embedded SQLite backend: ``SQLiteStorage``, put together from the SQLite side of each domain."""

from __future__ import annotations

from secureim.storage.accounts import AccountsSQLite
from secureim.storage.conversations import ConversationsSQLite
from secureim.storage.moderation import ModerationSQLite
from secureim.storage.queue import QueueSQLite
from secureim.storage.rooms import RoomsSQLite
from secureim.storage.sqlite_engine import BEFORE_0001_COLUMNS as BEFORE_0001_COLUMNS
from secureim.storage.sqlite_engine import SQLiteEngine as SQLiteEngine


class SQLiteStorage(AccountsSQLite, ConversationsSQLite, QueueSQLite, RoomsSQLite, ModerationSQLite):
    """Every query on one SQLite file (``SQLiteEngine``: the file, transactions, migrations)."""
