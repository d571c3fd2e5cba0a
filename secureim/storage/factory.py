"""``open_storage``: a database URL to an open backend."""

from __future__ import annotations

import logging
import urllib.parse

from secureim.errors import ConfigError
from secureim.storage.base import Storage
from secureim.storage.mysql import MySQLStorage
from secureim.storage.sqlite import SQLiteStorage

log = logging.getLogger("secureim.database")


# =============================================================================
# URLs
# =============================================================================
def open_storage(url: str, *, create_database: bool = False, apply_schema: bool = True) -> Storage:
    """``sqlite:///relative/path.db``, ``sqlite:////abs/path.db`` or
    ``mysql://USER[:PASS]@HOST[:PORT]/DB`` (the password may come from the
    SECUREIM_DB_PASSWORD environment variable instead, to keep it out of ``ps``)."""
    import os

    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "sqlite":
        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
        if not path:
            raise ConfigError("A SQLite URL looks like sqlite:///path/to/file.db")
        return SQLiteStorage(path)
    if parsed.scheme in ("mysql", "mariadb"):
        database = parsed.path.lstrip("/")
        if not parsed.hostname or not database:
            raise ConfigError("A MySQL URL looks like mysql://USER[:PASS]@HOST[:PORT]/DB")
        password = urllib.parse.unquote(parsed.password or "") or os.environ.get("SECUREIM_DB_PASSWORD", "")
        return MySQLStorage(
            host=parsed.hostname,
            port=parsed.port or 3306,
            user=urllib.parse.unquote(parsed.username or "root"),
            password=password,
            database=database,
            create_database=create_database,
            apply_schema=apply_schema,
        )
    raise ConfigError(f"Unknown database URL scheme {parsed.scheme!r}; use sqlite:/// or mysql://")
