"""Print the top-level schema.sql (every MySQL migration in order): ``python -m secureim.storage.migrations > schema.sql``."""

from __future__ import annotations

import sys

from secureim.storage.migrations import full_mysql_schema

sys.stdout.write(full_mysql_schema())
