"""The real programs: server.py as a process, client.py in a pseudo-terminal (pexpect)."""

from __future__ import annotations

import re
import stat

import cli_helpers
import pexpect
import pytest
from cli_helpers import ServerProcess, login_flow, quit_client, spawn_client, unstamped

from secureim import client as C

PW_A, PW_B = "alice-password", "bob-password"


@pytest.fixture
def server(tmp_path):
    srv = ServerProcess(tmp_path / "srvdata")
    yield srv
    srv.stop()


def _open(child, dest):
    child.expect_exact("[CLIENT]: Destination:")
    child.sendline(dest)


def test_server_prints_design_000_lines_and_stops_cleanly(tmp_path):
    srv = ServerProcess(tmp_path / "data")
    assert all(cli_helpers.SERVER_STAMP.match(line) for line in srv.lines)
    lines = unstamped(srv.lines)
    assert lines[0] == "[SERVER]: Initializing..."
    assert "[SERVER]: Initialization complete." in lines
    assert lines[-1] == "[SERVER]: Ready to accept connections."
    assert re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", srv.fingerprint)
    key = tmp_path / "data" / "server_identity.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert srv.stop() == 0, srv.errors
    assert "[SERVER]: Stopped." in unstamped(srv.lines)
    again = ServerProcess(tmp_path / "data")  # the identity key is reused
    assert again.fingerprint == srv.fingerprint
    assert again.stop() == 0, again.errors


def test_two_users_chat_both_ways(server, tmp_path):
    alice = spawn_client(server, tmp_path / "alice")
    login_flow(alice, "alice", PW_A, new=True)
    bob = spawn_client(server, tmp_path / "bob")
    login_flow(bob, "bob", PW_B, new=True)
    _open(alice, "bob")
    alice.expect_exact("[CLIENT]: Destination user is online.")
    alice.expect_exact("Conversation with bob is ready")
    bob.expect_exact("alice opened a conversation with you")
    _open(bob, "alice")
    bob.expect_exact("Now talking to alice")
    alice.sendline("hello bob")
    bob.expect_exact("[alice]: hello bob")
    bob.sendline("hi alice")
    alice.expect_exact("[bob]: hi alice")
    alice.sendline("/who")
    alice.expect_exact("[CLIENT]: Online now (2): alice, bob")
    alice.sendline("/fingerprint")
    alice.expect_exact(server.fingerprint)
    alice.expect_exact("Your identity (alice): SHA256:")
    alice.sendline("/verify bob")
    alice.expect(
        r"Safety number with bob \(not verified\):\s+(?:\d\d:\d\d )?\[CLIENT\]:\s+((\d{5} ){5}\d{5})"
    )
    number = alice.match.group(1)
    bob.sendline("/verify alice")
    bob.expect(
        r"Safety number with alice \(not verified\):\s+(?:\d\d:\d\d )?\[CLIENT\]:\s+((\d{5} ){5}\d{5})"
    )
    assert bob.match.group(1) == number
    alice.sendline("/verified bob")
    alice.expect_exact("bob is now marked as verified.")
    alice.sendline("/help")
    alice.expect_exact("/quit")
    assert quit_client(alice) == 0
    bob.expect_exact("[CLIENT]: Destination user is offline.")  # alice was bob's destination
    assert quit_client(bob) == 0
    server.stop()
    assert any(
        line.startswith("[SERVER]: alice connected from 127.0.0.1") for line in unstamped(server.lines)
    )
    assert any(line.startswith("[SERVER]: alice disconnected") for line in unstamped(server.lines))


def test_offline_then_online_without_retyping(server, tmp_path):
    alice = spawn_client(server, tmp_path / "alice")
    login_flow(alice, "alice", PW_A, new=True)
    bob = spawn_client(server, tmp_path / "bob")
    login_flow(bob, "bob", PW_B, new=True)
    assert quit_client(bob) == 0
    _open(alice, "bob")
    alice.expect_exact("[CLIENT]: Destination user is offline.")
    bob = spawn_client(server, tmp_path / "bob")
    login_flow(bob, "bob", PW_B, new=False)
    alice.expect_exact("[CLIENT]: Destination user is online.")
    alice.expect_exact("Conversation with bob is ready")
    alice.sendline("welcome back")
    bob.expect_exact("[alice]: welcome back")
    quit_client(alice)
    quit_client(bob)


def test_to_switches_between_conversations(server, tmp_path):
    users = {}
    for name in ("alice", "bob", "carol"):
        users[name] = spawn_client(server, tmp_path / name)
        login_flow(users[name], name, f"{name}-password", new=True)
    alice = users["alice"]
    _open(alice, "bob")
    alice.expect_exact("Conversation with bob is ready")
    alice.sendline("to bob")
    users["bob"].expect_exact("[alice]: to bob")
    alice.sendline("/to carol")
    alice.expect_exact("Conversation with carol is ready")
    alice.sendline("to carol")
    users["carol"].expect_exact("[alice]: to carol")
    for child in users.values():
        quit_client(child)


def test_wrong_password_and_lockout_message(server, tmp_path):
    alice = spawn_client(server, tmp_path / "alice")
    login_flow(alice, "alice", PW_A, new=True)
    quit_client(alice)
    intruder = spawn_client(server, tmp_path / "intruder")
    intruder.expect_exact("[CLIENT]: Connection successful.")
    for attempt in range(5):
        intruder.expect_exact("[CLIENT]: Username:")
        intruder.sendline("alice")
        intruder.expect_exact("[CLIENT]: Password:")
        intruder.sendline(f"guess-{attempt}")
        if attempt < 4:
            intruder.expect_exact("[CLIENT]: Unknown user or wrong password.")
            intruder.expect_exact("(y/n)")
            intruder.sendline("n")
    intruder.expect(r"locked after too many failed logins; try again in (\d+) seconds")
    assert 55 <= int(intruder.match.group(1)) <= 60
    intruder.expect_exact("[CLIENT]: Username:")
    intruder.sendeof()
    intruder.expect(pexpect.EOF)


def test_unreachable_server_is_one_clear_line(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    child = spawn_client(None, tmp_path / "x", port=port)
    child.expect(pexpect.EOF)
    child.close()
    out = child.before
    assert f"Cannot connect to 127.0.0.1:{port}: Connection refused." in out
    assert "Traceback" not in out
    assert child.exitstatus == 1


def test_fingerprint_mismatch_after_the_server_key_changes(tmp_path):
    srv = ServerProcess(tmp_path / "srvdata")
    home = tmp_path / "alice"
    child = spawn_client(srv, home)
    child.expect_exact("First contact")
    child.expect_exact(srv.fingerprint)
    child.expect_exact("[CLIENT]: Username:")
    child.sendeof()
    child.expect(pexpect.EOF)
    old_fp, port = srv.fingerprint, srv.port
    srv.stop()
    (tmp_path / "srvdata" / "server_identity.key").unlink()  # the server gets a new key
    srv2 = ServerProcess(tmp_path / "srvdata")
    # the known_servers entry is per host:port; move it to the new port
    known = home / "known_servers"
    known.write_text(known.read_text().replace(f":{port} ", f":{srv2.port} "))
    child = spawn_client(srv2, home)
    child.expect_exact("WARNING: THE SERVER'S IDENTITY KEY DOES NOT MATCH!")
    child.expect_exact(srv2.fingerprint)
    child.expect_exact(old_fp)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 3
    assert "Username" not in child.before
    srv2.stop()


def test_pinned_fingerprint_option(server, tmp_path):
    wrong = "SHA256:" + "A" * 43
    child = spawn_client(server, tmp_path / "p", "--server-fingerprint", wrong)
    child.expect_exact("DOES NOT MATCH")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 3
    ok = spawn_client(server, tmp_path / "q", "--server-fingerprint", server.fingerprint)
    ok.expect_exact("[CLIENT]: Username:")
    ok.sendeof()
    ok.expect(pexpect.EOF)


def test_escape_sequences_from_peers_are_neutralised(server, tmp_path):
    alice = spawn_client(server, tmp_path / "alice")
    login_flow(alice, "alice", PW_A, new=True)
    evil = C.ChatClient(server.host, server.port, home=tmp_path / "evil")
    evil.connect()
    evil.register("mallory", "mallory-password")
    evil.start()
    evil.open_conversation("alice")
    while not evil.has_conversation("alice"):
        assert evil.next_event(timeout=10) is not None
    evil.send_message("alice", "hi\x1b[2J\x1b]0;pwned\x07\rfake [bob]: lies")
    alice.expect_exact("[mallory]: hi\\x1b[2J\\x1b]0;pwned\\x07\\x0dfake [bob]: lies")
    assert "\x1b[2J" not in alice.before
    evil.close()
    quit_client(alice)


def test_server_gone_mid_chat_is_said_plainly_and_the_client_stays(tmp_path):
    """Issue 12: the terminal no longer exits to the shell; it says so and keeps trying (the
    reconnect itself: tests/cli/test_cli_reconnect.py).  /quit still leaves at once."""
    srv = ServerProcess(tmp_path / "srvdata")
    alice = spawn_client(srv, tmp_path / "alice")
    login_flow(alice, "alice", PW_A, new=True)
    alice.expect_exact("[CLIENT]: Destination:")
    srv.stop()
    alice.expect(r"\[CLIENT\]: Connection lost \([^\r\n]+\); reconnecting")
    alice.sendline("/quit")
    alice.expect(pexpect.EOF)
    alice.close()
    assert alice.exitstatus == 0
    assert "Traceback" not in alice.before


def test_ctrl_c_and_ctrl_d_leave_cleanly(server, tmp_path):
    alice = spawn_client(server, tmp_path / "alice")
    login_flow(alice, "alice", PW_A, new=True)
    alice.expect_exact("[CLIENT]: Destination:")
    alice.sendintr()
    alice.expect(pexpect.EOF)
    alice.close()
    assert alice.exitstatus == 0
    again = spawn_client(server, tmp_path / "alice")
    login_flow(again, "alice", PW_A, new=False)
    again.expect_exact("[CLIENT]: Destination:")
    again.sendeof()
    again.expect(pexpect.EOF)
    again.close()
    assert again.exitstatus == 0


def test_direct_mode_from_the_terminal(server, tmp_path):
    alice = spawn_client(server, tmp_path / "alice", "--direct")
    login_flow(alice, "alice", PW_A, new=True)
    bob = spawn_client(server, tmp_path / "bob", "--direct")
    login_flow(bob, "bob", PW_B, new=True)
    _open(alice, "bob")
    alice.expect_exact("Conversation with bob is now direct")
    alice.sendline("/mode bob")
    alice.expect_exact("[CLIENT]: Conversation with bob: direct (peer to peer).")
    alice.sendline("over udp")
    bob.expect_exact("[alice]: over udp")
    quit_client(alice)
    quit_client(bob)
