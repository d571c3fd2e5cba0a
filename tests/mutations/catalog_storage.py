"""Defences of the storage's schema versions and migrations: an upgrade keeps every row, stamps
the version, and applies each migration once."""

from __future__ import annotations

from model import Mutation

U = "tests/integration/storage/test_upgrade.py::"
M = "tests/integration/storage/test_migrations.py::"

_SQLITE_STAMP = (
    "                conn.execute(\n"
    '                    "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",\n'
    "                    (migration.version, migration.name, time.time()),\n"
    "                )\n"
)
_MYSQL_STAMP = (
    "                    cur.execute(\n"
    '                        "INSERT INTO schema_version (version, name, applied_at) VALUES (%s, %s, %s)",\n'
    "                        (migration.version, migration.name, time.time()),\n"
    "                    )\n"
)

MUTATIONS: list[Mutation] = [
    Mutation(
        name="upgrade-0001-drops-the-queue-sqlite",
        file="secureim/storage/migrations/sqlite/0001_initial.sql",
        find="CREATE TABLE IF NOT EXISTS message_queue (",
        replace="DROP TABLE IF EXISTS message_queue;\nCREATE TABLE IF NOT EXISTS message_queue (",
        tests=(U + "test_the_server_storage_holds_users_room_and_queue[sqlite-first]",),
        why="an upgrade of a SQLite database from before schema versions loses every message queued for offline users.",
    ),
    Mutation(
        name="upgrade-0001-drops-the-queue-mysql",
        file="secureim/storage/migrations/mysql/0001_initial.sql",
        find="CREATE TABLE IF NOT EXISTS message_queue (",
        replace="DROP TABLE IF EXISTS message_queue;\nCREATE TABLE IF NOT EXISTS message_queue (",
        tests=(U + "test_the_server_storage_holds_users_room_and_queue[mariadb-first]",),
        why="an upgrade of a MariaDB database from before schema versions loses every message queued for offline users.",
    ),
    Mutation(
        name="upgrade-0001-empties-the-rooms-mysql",
        file="secureim/storage/migrations/mysql/0001_initial.sql",
        find="CREATE TABLE IF NOT EXISTS room_members (",
        replace="DELETE FROM room_members;\nCREATE TABLE IF NOT EXISTS room_members (",
        tests=(U + "test_the_server_storage_holds_users_room_and_queue[mariadb-first]",),
        why="an upgrade empties every room's member list: nobody gets the room's messages or changes any more.",
    ),
    Mutation(
        name="migration-not-stamped-sqlite",
        file="secureim/storage/sqlite_engine.py",
        find=_SQLITE_STAMP,
        replace="                pass\n",
        tests=(
            U + "test_the_server_storage_holds_users_room_and_queue[sqlite-first]",
            M + "test_a_new_sqlite_file_is_at_the_latest_version_and_a_reopen_adds_nothing",
        ),
        why="a migrated SQLite database keeps no version: every start runs every migration again on it.",
    ),
    Mutation(
        name="migration-not-stamped-mysql",
        file="secureim/storage/mysql_engine.py",
        find=_MYSQL_STAMP,
        replace="                    pass\n",
        tests=(
            U + "test_the_server_storage_holds_users_room_and_queue[mariadb-first]",
            M + "test_a_new_mysql_database_is_at_the_latest_version_and_a_reopen_touches_nothing",
        ),
        why="a migrated MariaDB database keeps no version: every start re-creates the procedures under running servers.",
    ),
    Mutation(
        name="migration-version-ignored-sqlite",
        file="secureim/storage/sqlite_engine.py",
        find='todo = pending("sqlite", int(current))',
        replace='todo = pending("sqlite", 0)',
        tests=(
            M + "test_a_new_sqlite_file_is_at_the_latest_version_and_a_reopen_adds_nothing",
            M + "test_a_later_sqlite_migration_is_applied_once_in_order",
        ),
        why="every migration runs again at every start: one that moves or deletes rows would do it again.",
    ),
    Mutation(
        name="migration-version-ignored-mysql",
        file="secureim/storage/mysql_engine.py",
        find='todo = pending("mysql", current)',
        replace='todo = pending("mysql", 0)',
        tests=(
            M + "test_a_new_mysql_database_is_at_the_latest_version_and_a_reopen_touches_nothing",
            M + "test_a_later_mysql_migration_is_applied_once",
        ),
        why="every migration runs again at every start: one that moves or deletes rows would do it again.",
    ),
    Mutation(
        name="migration-outside-a-transaction-sqlite",
        file="secureim/storage/sqlite_engine.py",
        find="        with self._tx() as conn:\n            conn.execute(SQLITE_VERSION_TABLE)",
        replace="        with self._pool.connection() as conn:\n            conn.execute(SQLITE_VERSION_TABLE)",
        tests=(M + "test_a_failing_sqlite_migration_leaves_the_file_as_it_was",),
        why="a SQLite migration that fails halfway leaves half of it applied, and no version to say so.",
    ),
    Mutation(
        name="upgrade-older-columns-not-added-sqlite",
        file="secureim/storage/sqlite_engine.py",
        find="            if table in tables and column not in",
        replace="            if False and table in tables and column not in",
        tests=(
            M + "test_a_sqlite_file_from_before_versions_keeps_its_rows_and_is_stamped",
            "tests/integration/storage/test_room_storage.py::test_a_sqlite_database_from_before_rooms_gets_the_queue_columns_on_open",
        ),
        why="a SQLite database from before password changes or rooms cannot be opened any more.",
    ),
    Mutation(
        name="upgrade-procedures-not-recreated-mysql",
        file="secureim/storage/migrations/mysql/0001_initial.sql",
        find="DROP PROCEDURE IF EXISTS sp_get_password_hash //\nCREATE PROCEDURE sp_get_password_hash(",
        replace="DROP PROCEDURE IF EXISTS sp_get_password_hash //\nCREATE PROCEDURE sp_get_password_hash_old(",
        tests=(
            M + "test_a_mysql_database_from_before_versions_gets_its_procedures_again",
            "tests/integration/storage/test_database.py::test_mysql_uses_stored_procedures_and_schema_is_rerunnable",
        ),
        why="a MariaDB database migrated lacks a procedure the server calls: logins fail.",
    ),
]
