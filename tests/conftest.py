"""Shared test setup: vector loading, fast bcrypt, no server process outliving its test."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VECTORS = Path(__file__).resolve().parent / "vectors"


pytest_plugins = ["db_fixtures"]  # the mysql_database fixture, for every test module


def load_wycheproof(name: str) -> list[tuple[dict, dict]]:
    """(group, test) pairs of one Wycheproof file."""
    data = json.loads((VECTORS / "wycheproof" / name).read_text())
    return [(g, t) for g in data["testGroups"] for t in g["tests"]]


def load_nist_records(path: Path) -> list[dict]:
    """Records of a NIST CAVP / RFC-style ``KEY = value`` file, with their [SECTION].

    A record ends where one of its keys appears again or a new section starts;
    blank lines and comments are ignored (the RFC files put them mid-record).
    """
    records, current, section = [], {}, None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            if current:
                records.append(current)
            current, section = {}, line[1:-1]
            continue
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        if key in current:
            records.append(current)
            current = {}
        current[key] = value
        current["_section"] = section
    if current:
        records.append(current)
    return records


def wycheproof_id(case) -> str:
    return f"tc{case[1]['tcId']}"


os.environ.setdefault("SECUREIM_TEST", "1")


@pytest.fixture(autouse=True)
def _no_server_process_outlives_its_test():
    """A test that fails half way (a timeout in pexpect, a mutation) still stops the servers it
    started, so none is left running to load the machine for the tests after it."""
    yield
    import cli_helpers

    while cli_helpers.LIVE_SERVERS:
        server = cli_helpers.LIVE_SERVERS.pop()
        if server.proc.poll() is None:
            server.stop()
