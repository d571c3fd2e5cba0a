"""Storage: one interface, two backends (embedded SQLite, MySQL/MariaDB via pymysql).

The storage lives in the ``secureim.storage`` package (one module per backend); this module is
its public entry point for tools and tests: the ``Storage`` interface, the records it hands
back, both backends, and ``open_storage(url)``.
"""

from __future__ import annotations

from secureim.storage import *  # noqa: F403 - this module is the package's public name
from secureim.storage import __all__ as __all__
