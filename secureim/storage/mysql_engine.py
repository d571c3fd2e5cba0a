"""The MySQL/MariaDB engine: connections, the stored-procedure call, and migrations.

The domain modules (accounts, conversations, queue, rooms, moderation) hold the calls; each MySQL
side there is a subclass of :class:`MySQLEngine` and calls only stored procedures (``_call``);
``secureim.storage.mysql`` puts them together as ``MySQLStorage``.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from secureim.errors import ConfigError, DatabaseError, DatabaseUnavailable
from secureim.storage.base import ConnectionPool, Storage
from secureim.storage.migrations import MYSQL_VERSION_TABLE, pending
from secureim.storage.records import CONNECT_TIMEOUT_S, SCHEMA_LOCK_WAIT_S

log = logging.getLogger("secureim.database")


def split_sql_script(text: str) -> list[str]:
    """Split a script into statements, honouring ``DELIMITER`` lines like the mysql client."""
    statements: list[str] = []
    current: list[str] = []
    delimiter = ";"
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


class MySQLEngine(Storage):
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
        if apply_schema:  # admin.py passes False: the server migrates; a tool never does under its feet
            try:
                self.apply_schema()
            except BaseException:
                self._pool.close()
                raise

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

    def apply_schema(self) -> int:
        """Apply the migrations the database lacks, in order; answer the schema version.

        Several servers starting at once (worker processes, cluster nodes) would race on
        DROP/CREATE PROCEDURE: one at a time, under a named lock of this database's own, and the
        version is read under it.  MySQL commits DDL as it goes (no transaction can hold a
        migration), so each migration's schema_version row is written right after its last
        statement and every MySQL migration must be safe to run again: a server stopped halfway
        runs the whole migration once more on its next start."""
        with self._pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT GET_LOCK(CONCAT('secureim_schema.', DATABASE()), %s)", (SCHEMA_LOCK_WAIT_S,))
            if cur.fetchone()[0] != 1:
                raise DatabaseUnavailable("Another server is still creating the database schema; try again.")
            try:
                cur.execute(MYSQL_VERSION_TABLE)
                cur.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
                current = int(cur.fetchone()[0])
                todo = pending("mysql", current)
                if todo and todo[0].version == 1:
                    cur.execute("SHOW TABLES LIKE 'users'")
                    if cur.fetchall():
                        log.warning("MySQL database from before schema versions: stamping it as version 1")
                for migration in todo:
                    try:
                        for stmt in split_sql_script(migration.sql()):
                            cur.execute(stmt)
                    except self._pymysql.MySQLError as exc:
                        raise DatabaseError(
                            f"The MySQL migration {migration.path.name} failed: {exc}"
                        ) from exc
                    cur.execute(
                        "INSERT INTO schema_version (version, name, applied_at) VALUES (%s, %s, %s)",
                        (migration.version, migration.name, time.time()),
                    )
                    log.info("MySQL: applied migration %04d_%s", migration.version, migration.name)
                return todo[-1].version if todo else current
            finally:
                cur.execute("SELECT RELEASE_LOCK(CONCAT('secureim_schema.', DATABASE()))")
                cur.fetchall()

    migrate = apply_schema

    def schema_version(self) -> int:
        with self._pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            return int(cur.fetchone()[0])

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

    def close(self) -> None:
        self._pool.close()
