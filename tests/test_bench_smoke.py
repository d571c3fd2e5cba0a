"""The benchmark suite at a tiny size: every mode runs end to end and reports sane numbers.

These are smoke tests, not timed tests: they assert what was measured exists and
that nothing was lost, never how fast it was (docs/PERFORMANCE.md has the numbers).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(tmp_path, *args) -> dict:
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "loadgen.py"), *args, "--json", str(out),
                           "--timeout", "120"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


def test_relay_smoke(tmp_path):
    r = _run(tmp_path, "relay", "--clients", "4", "--messages", "20")
    assert r["lost"] == 0 and r["out_of_order"] == 0 and r["msgs_per_s"] > 0
    assert r["duplicates"] == 0 and r["corrupted"] == 0  # content and sender checked per message
    assert r["server_cpu_s"] >= 0 and r["generator_cpu_s"] > 0 and r["latency_ms"]["99"] > 0


@pytest.mark.mysql
def test_relay_smoke_on_mariadb(tmp_path):
    from db_fixtures import mysql_admin
    mysql_admin().close()  # skip (or fail under REQUIRE_MYSQL=1) without MariaDB
    r = _run(tmp_path, "relay", "--clients", "2", "--messages", "10", "--mysql")
    assert r["db"] == "mysql" and r["lost"] == 0


def test_capacity_smoke(tmp_path):
    r = _run(tmp_path, "capacity", "--clients", "40")
    # A fixed set of threads (the loop, the workers, bcrypt, moderation), not one per connection.
    assert r["all_held"] and r["new_user_message_delivered"] and r["server_threads"] < 40


def test_handshake_smoke(tmp_path):
    r = _run(tmp_path, "handshake", "--logins", "4", "--bcrypt-cost", "5")
    costs = {row["bcrypt_cost"] for row in r["rows"]}
    assert costs == {4, 5}
    assert all(row["login_per_s"] > 0 and row["dh_x25519_ms"] > 0 for row in r["rows"])


def test_storm_smoke(tmp_path):
    r = _run(tmp_path, "storm", "--clients", "7")
    assert r["errors"] == [] and r["back"] == 7 and r["chatted_after_storm"] == 7
    assert r["server_bcrypt_runs_after_restart"] == 0  # tickets, counted on the server: no password check
