"""A terminal client that stays (issue 12 item 4): real server.py processes, client.py in a pseudo-terminal.

The server is killed (SIGKILL) mid-chat and started again on the same port with the
same data dir (identity key, ticket key, database): both terminals stay open, say
so, resume with their tickets (no password), and a line typed during the outage is
delivered once.  Two servers in ``--host``: the dead one is skipped.  The login
window says at once when the server's login grace ran out.  A refused ticket asks
to log in again.  No sleeps: every wait is on a line the programs print.
"""

from __future__ import annotations

import io
import re
import time
from types import SimpleNamespace

import pexpect
from cli_helpers import ServerProcess, login_flow, quit_client, spawn_client

from secureim import client as C
from secureim import proto as P
from secureim.server.config import ServerConfig
from secureim.server.options import build_arg_parser
from secureim.server.tickets import KEY_FILE, TICKET_LIFETIME_S
from secureim.tui import main as CLI

PW_A, PW_B, PW_C = "alice-password", "bob-password", "carol-password"
RECONNECT_WITHIN_S = 15  # issue 12: both terminals are back within 15 s of the server
LOST = r"\[CLIENT\]: Connection lost \([^\r\n]+\); reconnecting"


def user(server, tmp_path, name, password, *extra, new=True):
    child = spawn_client(server, tmp_path / name, *extra)
    child.logfile_read = io.StringIO()
    login_flow(child, name, password, new=new)
    return child


def said(child) -> str:
    return child.logfile_read.getvalue()


def talking(a, b, a_name="alice", b_name="bob"):
    a.expect_exact("[CLIENT]: Destination:")
    a.sendline(b_name)
    a.expect_exact(f"Conversation with {b_name} is ready")
    b.expect_exact(f"{a_name} opened a conversation with you")
    b.expect_exact("[CLIENT]: Destination:")
    b.sendline(a_name)
    b.expect_exact("Now talking to")


def restart(old: ServerProcess, *extra: str) -> ServerProcess:
    """The same data dir (identity key, ticket key, database) on the same port."""
    return ServerProcess(old.data_dir, "--port", str(old.port), *extra)


def test_sigkill_mid_chat_both_terminals_stay_reconnect_and_deliver_the_queued_line_once(tmp_path):
    srv = ServerProcess(tmp_path / "srvdata")
    alice = user(srv, tmp_path, "alice", PW_A)
    bob = user(srv, tmp_path, "bob", PW_B)
    talking(alice, bob)
    alice.sendline("before the drop")
    bob.expect_exact("[alice]: before the drop")
    mark_a, mark_b = len(said(alice)), len(said(bob))

    srv.proc.kill()  # SIGKILL: no Goodbye, no cleanup
    srv.proc.wait()
    alice.expect(LOST)
    bob.expect(LOST)
    alice.sendline("typed during the outage")
    alice.expect_exact("[CLIENT]: Queued (not connected); it will be sent after reconnecting.")
    bob.send("half typed")  # no Enter: the line being typed survives the reconnect

    srv = restart(srv)
    back = time.monotonic()
    for child in (alice, bob):
        child.expect_exact(f"[CLIENT]: Reconnected to 127.0.0.1:{srv.port}.", timeout=RECONNECT_WITHIN_S)
    assert time.monotonic() - back < RECONNECT_WITHIN_S
    bob.expect_exact("[alice]: typed during the outage")  # sent once alice's conversation is keyed again
    alice.expect_exact("[alice→bob]: typed during the outage")
    bob.sendline(" and finished after the restart")
    alice.expect_exact("[bob]: half typed and finished after the restart")
    alice.sendline("the last one")
    bob.expect_exact("[alice]: the last one")

    for child, mark in ((alice, mark_a), (bob, mark_b)):
        after = said(child)[mark:]
        assert "Password:" not in after and "Username:" not in after  # the ticket, not the password
        assert "Traceback" not in after
    assert said(bob).count("[alice]: typed during the outage") == 1
    assert said(bob).count("[alice]: before the drop") == 1  # nothing sent before the drop comes again
    assert quit_client(alice) == 0
    assert quit_client(bob) == 0
    srv.stop()


def test_two_servers_in_host_the_dead_first_one_is_skipped(tmp_path):
    """Two nodes of one service: two server.py processes on one data dir (one identity key, one
    ticket key, one SQLite database), as tests/integration/test_failover.py does in-process."""
    data = tmp_path / "srvdata"
    node1 = ServerProcess(data)
    node2 = ServerProcess(data)
    hosts = ("--host", f"127.0.0.1:{node1.port},127.0.0.1:{node2.port}")
    alice = user(node1, tmp_path, "alice", PW_A, *hosts)
    bob = user(node1, tmp_path, "bob", PW_B, *hosts)
    talking(alice, bob)
    alice.sendline("on node 1")
    bob.expect_exact("[alice]: on node 1")

    node1.proc.kill()
    node1.proc.wait()
    for child in (alice, bob):
        child.expect(LOST)
        child.expect_exact(f"[CLIENT]: Reconnected to 127.0.0.1:{node2.port}.", timeout=RECONNECT_WITHIN_S)
    alice.expect_exact("Conversation with bob is ready")
    alice.sendline("on node 2")
    bob.expect_exact("[alice]: on node 2")
    bob.sendline("and back")
    alice.expect_exact("[bob]: and back")

    carol = spawn_client(node1, tmp_path / "carol", *hosts)  # a new start skips the dead first entry too
    carol.logfile_read = io.StringIO()
    login_flow(carol, "carol", PW_C, new=True)
    carol.expect_exact("[CLIENT]: Destination:")
    carol.sendline("alice")
    carol.expect_exact("Conversation with alice is ready")
    for child in (alice, bob, carol):
        assert quit_client(child) == 0
    node2.stop()


def test_the_login_window_says_at_once_when_the_server_closed_it(tmp_path):
    srv = ServerProcess(tmp_path / "srvdata", "--login-grace", "2")
    registered = C.ChatClient(srv.host, srv.port, home=tmp_path / "lib")
    registered.connect()
    registered.register("alice", PW_A)
    registered.close()

    alice = spawn_client(srv, tmp_path / "alice")
    alice.expect_exact("[CLIENT]: Connection successful.")
    alice.expect_exact("[CLIENT]: Username:")
    alice.send("ali")  # no Enter: the notice comes while the prompt waits, not after a name and a password
    alice.expect(
        r"\[CLIENT\]: The server closed the login after (\d+) s of waiting; press Enter to reconnect\."
    )
    assert 1 <= int(alice.match.group(1)) <= 3
    alice.sendline(
        "ce"
    )  # what was typed stays; the answer reconnects (a new handshake) and the dialogue goes on
    alice.expect_exact(f"[CLIENT]: Reconnected to 127.0.0.1:{srv.port}.")
    alice.expect_exact("[CLIENT]: Password:")
    alice.sendline(PW_A)
    alice.expect_exact("[CLIENT]: User logged in successfully.")
    alice.expect_exact("[CLIENT]: Destination:")
    assert quit_client(alice) == 0
    srv.stop()


def test_a_refused_ticket_asks_to_log_in_again_and_no_ends_it(tmp_path):
    srv = ServerProcess(tmp_path / "srvdata")
    alice = user(srv, tmp_path, "alice", PW_A)
    bob = user(srv, tmp_path, "bob", PW_B)
    talking(alice, bob)
    srv.proc.kill()
    srv.proc.wait()
    (srv.data_dir / KEY_FILE).unlink()  # a new ticket key: every ticket issued before is refused
    for child in (alice, bob):
        child.expect(LOST)
    bob.send("/wh")  # half typed when the question interrupts the prompt: it comes back after the login
    srv = restart(srv)
    for child in (alice, bob):
        child.expect_exact("[CLIENT]: Your session expired; log in again? (y/n)", timeout=RECONNECT_WITHIN_S)

    alice.sendline("n")
    alice.expect(pexpect.EOF)
    alice.close()
    assert alice.exitstatus == 0
    assert "Traceback" not in said(alice)

    bob.sendline("y")  # a fresh connection and the password; the destination stays
    bob.expect_exact("[CLIENT]: Log in again as bob.")
    bob.expect_exact("[CLIENT]: Password:")
    bob.sendline(PW_B)
    bob.expect_exact("[CLIENT]: User logged in successfully.")
    bob.expect_exact("[CLIENT]: Now talking to alice.")
    bob.sendline("o")
    bob.expect_exact("[CLIENT]: Online now (1): bob")
    bob.expect(re.escape("[bob→alice]"))
    assert quit_client(bob) == 0
    srv.stop()


def test_the_terminal_keeps_trying_as_long_as_a_ticket_lives(tmp_path):
    """The library's default gives up after 8 tries in 60 s; the terminal's client does not."""
    args = SimpleNamespace(
        servers=[("127.0.0.1", 1)],
        group=P.DEFAULT_GROUP,
        server_fingerprint=None,
        no_history=True,
        history_max=10,
        history_days=1.0,
    )
    terminal = CLI.client_factory(args, tmp_path, stays=True)()
    assert terminal.auto_reconnect
    assert terminal.reconnect_max_s >= TICKET_LIFETIME_S
    assert terminal.reconnect_attempts * C.RECONNECT_MAX_DELAY_S / 2 > TICKET_LIFETIME_S  # the window ends it
    script = CLI.client_factory(args, tmp_path)()
    assert not script.auto_reconnect  # send/receive/--json end on a lost connection, as documented


def test_the_login_grace_is_openssh_s_120_s():
    assert ServerConfig().login_grace_s == 120.0
    assert build_arg_parser().parse_args([]).login_grace == 120.0
