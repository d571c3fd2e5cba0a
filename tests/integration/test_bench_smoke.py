"""The benchmark suite at a tiny size: every mode runs end to end and reports sane numbers.

These are smoke tests, not timed tests: they assert what was measured exists and
that nothing was lost, never how fast it was (docs/PERFORMANCE.md has the numbers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())


def _run(tmp_path, *args, env: dict | None = None) -> dict:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "loadgen.py"), *args, "--json", str(out), "--timeout", "120"],
        capture_output=True,
        text=True,
        timeout=300,
        env=None if env is None else {**os.environ, **env},
    )
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


def _cluster_services() -> dict:
    """MariaDB and NATS for a clustered server, or skip (fail under REQUIRE_MYSQL=1 / REQUIRE_NATS=1)."""
    from cluster_helpers import shared_nats_url
    from db_fixtures import mysql_admin

    mysql_admin().close()
    return {"SECUREIM_BENCH_NATS": shared_nats_url()}


@pytest.mark.mysql
def test_relay_smoke_server_workers(tmp_path):
    env = _cluster_services()
    r = _run(tmp_path, "relay", "--clients", "4", "--messages", "10", "--server-workers", "2", env=env)
    assert r["server_workers"] == 2 and r["server_processes"] == 3  # the supervisor and its 2 workers
    assert r["lost"] == 0 and r["duplicates"] == 0 and r["corrupted"] == 0 and r["out_of_order"] == 0
    assert r["server_cpu_s"] >= 0 and r["msgs_per_s"] > 0


@pytest.mark.mysql
def test_relay_smoke_two_nodes(tmp_path):
    env = _cluster_services()
    r = _run(tmp_path, "relay", "--clients", "4", "--messages", "10", "--nodes", "2", env=env)
    assert r["nodes"] == 2 and r["server_processes"] == 2 and len(r["server_cpu_s_per_node"]) == 2
    assert r["lost"] == 0 and r["duplicates"] == 0 and r["corrupted"] == 0 and r["out_of_order"] == 0
    assert r["cross_node_msgs"] == 2 * 10  # every pair spans the two nodes


@pytest.mark.mysql
def test_storm_smoke_node_killed(tmp_path):
    env = _cluster_services()
    r = _run(tmp_path, "storm", "--clients", "6", "--nodes", "2", env=env)
    assert r["errors"] == [] and r["moved"] == 3 and r["back"] == 3 and r["chatted_after_storm"] == 6
    assert r["server_bcrypt_runs_after_restart"] == 0  # the moved clients came back with tickets
    assert r["audit_since_kill"].get("resume") == 3 and not r["audit_since_kill"].get("login")


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


def test_relay_path_harness_runs():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "relay_path.py"), "--messages", "50", "--batch", "4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "us per relayed message" in out.stdout


def test_store_smoke(tmp_path):
    r = _run(tmp_path, "store", "--clients", "2", "--recipients", "2", "--messages", "10")
    assert r["stored"] == r["messages"] == 20 and r["delivered"] == 20 and r["errors"] == []
    assert r["stores_per_s"] > 0 and r["server_cpu_us_per_store"] is not None


def test_room_smoke(tmp_path):
    r = _run(tmp_path, "room", "--members", "5", "--messages", "10")
    assert r["members"] == 5 and r["senders"] == 4 and r["messages_sent"] == 40
    # Every copy arrived once, in order, intact: 4 senders x 10 messages x the 4 other members.
    assert r["copies_expected"] == r["copies_received"] == 160 and r["lost"] == 0
    assert r["duplicates"] == r["out_of_order"] == r["corrupted"] == 0 and r["send_failures"] == []
    assert r["answers_ok"] == 40 and r["answered_online"] == 160 and r["stored_copies"] == 0
    assert r["msgs_per_s"] > 0 and r["copies_per_s"] > 0 and r["server_cpu_s"] >= 0
    assert r["server_cpu_us_per_copy"] is not None and r["latency_ms"]["99"] > 0


def test_room_smoke_with_members_away(tmp_path):
    r = _run(tmp_path, "room", "--members", "5", "--messages", "5", "--senders", "2", "--offline", "2")
    # 2 senders x 5 messages: live to the 2 other online members, queued for the 2 away.
    assert r["copies_received"] == r["copies_expected"] == 2 * 5 * 2 and r["lost"] == 0
    assert r["stored_copies"] == 2 * 5 * 2 and r["answers_ok"] == 10 and r["answer_reasons"] == []
