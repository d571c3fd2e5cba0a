"""The MySQL/MariaDB backend: ``MySQLStorage``, put together from the MySQL side of each domain
(every query a stored procedure from the migrations in secureim/storage/migrations/mysql/)."""

from __future__ import annotations

from secureim.storage.accounts import AccountsMySQL
from secureim.storage.conversations import ConversationsMySQL
from secureim.storage.moderation import ModerationMySQL
from secureim.storage.mysql_engine import MySQLEngine as MySQLEngine
from secureim.storage.mysql_engine import split_sql_script as split_sql_script
from secureim.storage.queue import QueueMySQL
from secureim.storage.rooms import RoomsMySQL


class MySQLStorage(AccountsMySQL, ConversationsMySQL, QueueMySQL, RoomsMySQL, ModerationMySQL):
    """Every call on one MySQL/MariaDB database (``MySQLEngine``: connections, ``_call``, migrations)."""
