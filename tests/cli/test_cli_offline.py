"""Offline delivery in the terminal (issue 12): real server process, clients in pseudo-terminals."""

from __future__ import annotations

import io
import sqlite3

import pexpect
import pytest
from cli_helpers import ServerProcess, login_flow, quit_client, spawn_client

PW_A, PW_B = "alice-password", "bob-password"
SECRETS = ["the first stored line", "the second stored line", "the third stored line"]


@pytest.fixture
def server(tmp_path):
    srv = ServerProcess(tmp_path / "srvdata")
    yield srv
    srv.stop()


def test_three_messages_to_an_offline_user_arrive_in_order_once_and_say_delivered(server, tmp_path):
    bob = spawn_client(server, tmp_path / "bob")
    login_flow(bob, "bob", PW_B, new=True)
    assert quit_client(bob) == 0
    alice = spawn_client(server, tmp_path / "alice")
    login_flow(alice, "alice", PW_A, new=True)
    alice.expect_exact("[CLIENT]: Destination:")
    alice.sendline("bob")
    alice.expect_exact("[CLIENT]: Destination user is offline")
    for text in SECRETS:
        alice.sendline(text)
        alice.expect_exact("[CLIENT]: Stored for bob (offline)")
    alice.sendline("/pending")
    alice.expect_exact("Not delivered yet (3)")
    rows = sqlite3.connect(tmp_path / "srvdata" / "secureim.db").execute("SELECT payload FROM message_queue")
    payloads = [bytes(r[0]) for r in rows]
    assert len(payloads) == 3 and not any(t.encode() in p for t in SECRETS for p in payloads)
    bob = spawn_client(server, tmp_path / "bob")
    login_flow(bob, "bob", PW_B, new=False)
    for text in SECRETS:
        bob.expect_exact(f"[alice]: {text}")
    for text in SECRETS:
        alice.expect_exact(f"[CLIENT]: Delivered to bob: {text[:39]}")
    alice.sendline("/pending")
    alice.expect_exact("Every message you sent this session has been delivered.")
    bob.expect_exact("[CLIENT]: Destination:")
    bob.sendline("/quit")
    bob.expect_exact("Goodbye.")
    before = bob.before
    assert all(before.count(t) == 0 for t in SECRETS)  # nothing shown again after the three
    bob.close()
    bob = spawn_client(server, tmp_path / "bob")
    login_flow(bob, "bob", PW_B, new=False)
    bob.expect_exact("[CLIENT]: Destination:")
    bob.sendline("/quit")
    bob.expect_exact("Goodbye.")
    assert not any(t in bob.before for t in SECRETS)  # once: acknowledged and deleted
    quit_client(alice)


def test_stored_messages_survive_a_server_restart_and_the_senders_screen_says_delivered(tmp_path):
    """issue 12, first Done-when: bob registers and leaves; alice sends three; the server is
    restarted (alice's terminal stays and reconnects); bob logs in and sees exactly those three,
    in order, once; alice's screen then says delivered."""
    srv = ServerProcess(tmp_path / "srvdata")
    try:
        bob = spawn_client(srv, tmp_path / "bob")
        login_flow(bob, "bob", PW_B, new=True)
        assert quit_client(bob) == 0
        alice = spawn_client(srv, tmp_path / "alice")
        login_flow(alice, "alice", PW_A, new=True)
        alice.expect_exact("[CLIENT]: Destination:")
        alice.sendline("bob")
        alice.expect_exact("[CLIENT]: Destination user is offline.")
        for text in SECRETS:
            alice.sendline(text)
            alice.expect_exact("[CLIENT]: Stored for bob (offline)")
        srv.stop()
        alice.expect("reconnecting")
        srv = ServerProcess(srv.data_dir, "--port", str(srv.port))
        alice.expect_exact(f"[CLIENT]: Reconnected to 127.0.0.1:{srv.port}.", timeout=30)
        bob = spawn_client(srv, tmp_path / "bob")
        bob.logfile_read = io.StringIO()
        login_flow(bob, "bob", PW_B, new=False)
        for text in SECRETS:
            alice.expect_exact(f"[CLIENT]: Delivered to bob: {text[:39]}")  # so bob has shown all three
        bob.sendline("/quit")
        bob.expect(pexpect.EOF)
        whole = bob.logfile_read.getvalue()
        assert [whole.count(f"[alice]: {t}") for t in SECRETS] == [1, 1, 1]
        assert whole.index(SECRETS[0]) < whole.index(SECRETS[1]) < whole.index(SECRETS[2])
        quit_client(alice)
    finally:
        srv.stop()
