"""Operating the server, with real processes: `python server.py` on port 0 and `python server.py admin ...`.

Bans and kicks end live sessions within the servers' one-second poll (waited on
with events, never sleeps); reset-password ends resumption tickets; delete-user
removes the account; the audit log has the expected rows on SQLite and MariaDB
and no secret; the metrics endpoint answers and moves with a chat; bad admin
input is one line and exit 2; the console works on a piped stdin.
"""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pexpect
import pytest
from cli_helpers import ROOT, ServerProcess, login_flow, spawn_client
from db_fixtures import mysql_admin, mysql_url
from server_fixtures import PASSWORD, wait_for

import database
from secureim import client as clientlib
from secureim.errors import AccountBanned, AccountLocked, InvalidCredentials

WRONG_PASSWORD = "wrong horse battery staple"
KICK_WAIT_S = 10.0  # the poll is every second; generous for a loaded 2-core machine


def admin(server: ServerProcess, *args: str, db: str | None = None) -> subprocess.CompletedProcess:
    where = ["--db", db] if db else ["--data-dir", str(server.data_dir)]
    return subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "admin", *where, "--bcrypt-cost", "4", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(server.data_dir.parent),
    )


def client_for(server: ServerProcess, home: Path) -> clientlib.ChatClient:
    c = clientlib.ChatClient(server.host, server.port, home=home)
    c.connect()
    return c


def logged_in(
    server: ServerProcess, home: Path, name: str, *, register: bool = True, password: str = PASSWORD
) -> clientlib.ChatClient:
    c = client_for(server, home)
    (c.register if register else c.login)(name, password)
    c.start()
    return c


@pytest.fixture
def server(tmp_path):
    proc = ServerProcess(tmp_path / "data")
    yield proc
    proc.stop()


def test_a_banned_user_is_disconnected_at_once_and_cannot_log_in(server, tmp_path):
    alice = logged_in(server, tmp_path / "alice", "alice")
    done = admin(server, "ban", "alice", "--for", "1h", "--reason", "spamming the team")
    assert done.returncode == 0, done.stderr
    gone = wait_for(alice, clientlib.Disconnected, timeout=KICK_WAIT_S)
    assert "This account is banned until" in gone.reason and "spamming the team" in gone.reason
    alice.close()
    again = client_for(server, tmp_path / "alice")
    with pytest.raises(AccountBanned, match="banned until .*spamming the team"):
        again.login("alice", PASSWORD)
    again.close()
    # The terminal client shows the plain reason and exits.
    child = spawn_client(server, tmp_path / "alice")
    child.expect_exact("[CLIENT]: Username:")
    child.sendline("alice")
    child.expect_exact("[CLIENT]: Password:")
    child.sendline(PASSWORD)
    child.expect("This account is banned until .*: spamming the team")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 4  # login failed (docs/CLIENT.md exit codes)
    # Lifted: alice is back.
    assert admin(server, "unban", "alice").returncode == 0
    logged_in(server, tmp_path / "alice", "alice", register=False).close()


def test_a_banned_network_is_disconnected_and_refused(server, tmp_path):
    alice = logged_in(server, tmp_path / "alice", "alice")
    done = admin(server, "ban-address", "127.0.0.0/8", "--reason", "bots")
    assert done.returncode == 0, done.stderr
    assert (
        "Your network address is banned"
        in wait_for(alice, clientlib.Disconnected, timeout=KICK_WAIT_S).reason
    )
    alice.close()
    again = client_for(server, tmp_path / "alice")
    with pytest.raises(AccountBanned, match="network address is banned"):
        again.login("alice", PASSWORD)
    again.close()
    assert admin(server, "unban-address", "127.0.0.1/8").returncode == 0  # the same network, normalised
    logged_in(server, tmp_path / "alice", "alice", register=False).close()


def test_kick_shows_the_reason_and_the_user_may_come_back(server, tmp_path):
    alice = logged_in(server, tmp_path / "alice", "alice")
    assert admin(server, "kick", "alice", "--reason", "server move").returncode == 0
    gone = wait_for(alice, clientlib.Disconnected, timeout=KICK_WAIT_S)
    assert "An administrator disconnected you: server move." in gone.reason
    assert alice.resume()  # a kick is not a ban: the ticket still works
    alice.close()


def test_reset_password_ends_tickets_and_the_old_password(server, tmp_path):
    alice = logged_in(server, tmp_path / "alice", "alice")
    done = admin(server, "reset-password", "alice")
    assert done.returncode == 0, done.stderr
    temporary = re.search(r"Temporary password: (\S+)", done.stdout).group(1)
    assert len(temporary) >= 16
    assert "reset your password" in wait_for(alice, clientlib.Disconnected, timeout=KICK_WAIT_S).reason
    with pytest.raises(InvalidCredentials, match="ticket"):
        alice.resume()  # the ticket from before the reset is void
    alice.close()
    old = client_for(server, tmp_path / "alice")
    with pytest.raises(InvalidCredentials):
        old.login("alice", PASSWORD)
    old.close()
    logged_in(server, tmp_path / "alice2", "alice", register=False, password=temporary).close()


def test_delete_user_removes_the_account_and_their_conversations(server, tmp_path):
    alice = logged_in(server, tmp_path / "alice", "alice")
    bob = logged_in(server, tmp_path / "bob", "bob")
    alice.open_conversation("bob")
    wait_for(alice, clientlib.ConversationReady, peer="bob")
    done = admin(server, "delete-user", "bob", "--yes")
    assert done.returncode == 0, done.stderr
    assert "deleted by an administrator" in wait_for(bob, clientlib.Disconnected, timeout=KICK_WAIT_S).reason
    bob.close()
    users = admin(server, "users").stdout
    assert re.search(r"^alice\s", users, re.M) and not re.search(r"^bob\s", users, re.M)
    again = client_for(server, tmp_path / "bob")
    with pytest.raises(InvalidCredentials):
        again.login("bob", PASSWORD)
    again.close()
    store = database.open_storage(f"sqlite:///{server.data_dir / 'secureim.db'}")
    try:
        assert store.get_password_hash("bob") is None
        assert store.get_conversation(1) is None
        assert store.get_ticket_epoch("bob") is None
    finally:
        store.close()
    alice.close()


def test_sessions_and_users_show_who_is_online(server, tmp_path):
    alice = logged_in(server, tmp_path / "alice", "alice")
    sessions = admin(server, "sessions")
    assert sessions.returncode == 0
    assert re.search(rf"^alice\s+127\.0\.0\.1\s+\S+ \S+\s+\S+:{server.port}$", sessions.stdout, re.M), (
        sessions.stdout
    )
    assert re.search(r"^alice\s.*\syes\s+no\s+no$", admin(server, "users").stdout, re.M)
    alice.close()


def _exercise_and_audit(server, tmp_path, db: str | None) -> str:
    """Register, fail, get locked out, be kicked, banned, reset; returns `admin audit` output."""
    alice = logged_in(server, tmp_path / "alice", "alice")
    alice.close()
    for _ in range(5):  # the fifth wrong password locks alice for this address
        c = client_for(server, tmp_path / "alice")
        with pytest.raises((InvalidCredentials, AccountLocked)):
            c.login("alice", WRONG_PASSWORD)
        c.close()
    assert admin(server, "unlock", "alice", db=db).returncode == 0
    alice = logged_in(server, tmp_path / "alice", "alice", register=False)
    assert admin(server, "kick", "alice", db=db).returncode == 0
    wait_for(alice, clientlib.Disconnected, timeout=KICK_WAIT_S)
    alice.close()
    assert admin(server, "ban", "alice", "--for", "10m", "--reason", "flood", db=db).returncode == 0
    assert admin(server, "reset-password", "alice", db=db).returncode == 0
    out = admin(server, "audit", "--user", "alice", db=db)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _events(audit_output: str) -> list[str]:
    return [line.split()[2] for line in audit_output.splitlines()[1:]]


EXPECTED_EVENTS = [
    "register",
    "login_failed",
    "login_failed",
    "login_failed",
    "login_failed",
    "lockout",
    "unlock",
    "login",
    "kick",
    "ban",
    "reset_password",
]


def test_audit_log_on_sqlite_has_the_rows_and_no_secret(server, tmp_path):
    text = _exercise_and_audit(server, tmp_path, None)
    raw = b"".join(p.read_bytes() for p in server.data_dir.glob("secureim.db*"))
    assert b"login_failed" in raw  # the check below reads the real bytes
    for secret in (PASSWORD, WRONG_PASSWORD):
        assert secret.encode() not in raw
    assert _events(text) == EXPECTED_EVENTS, text
    assert re.search(r"login_failed\s+alice\s+127\.0\.0\.1\s+INVALID_CREDENTIALS", text)
    assert re.search(r"ban\s+alice\s+admin-cli:\S+\s+600 s: flood", text)


def test_audit_log_on_mariadb_has_the_rows_and_no_secret(mysql_database, tmp_path):
    url = mysql_url(mysql_database)
    server = ServerProcess(tmp_path / "data", "--db", url)
    try:
        text = _exercise_and_audit(server, tmp_path, url)
    finally:
        server.stop()
    conn = mysql_admin()
    dump = []
    with conn.cursor() as cur:
        cur.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (mysql_database,)
        )
        for (table,) in cur.fetchall():
            cur.execute(f"SELECT * FROM `{mysql_database}`.`{table}`")  # names from information_schema
            dump.append(repr(cur.fetchall()))
    conn.close()
    everything = "\n".join(dump)
    assert "login_failed" in everything and "alice" in everything
    for secret in (PASSWORD, WRONG_PASSWORD):
        assert secret not in everything
    assert _events(text) == EXPECTED_EVENTS, text


def _scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return resp.read().decode()


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_metrics_answer_and_move_with_a_chat(tmp_path):
    server = ServerProcess(tmp_path / "data", "--metrics-port", "0")
    try:
        line = next(x for x in server.lines if "Metrics on" in x)  # printed before "Ready"
        port = int(re.search(r"127\.0\.0\.1:(\d+)/metrics", line).group(1))
        assert _scrape(port, "/healthz") == "ok\n"
        health = subprocess.run(
            [sys.executable, str(ROOT / "server.py"), "admin", "health", "--metrics-port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert health.returncode == 0 and health.stdout.strip() == "ok"
        before = _scrape(port)
        a = logged_in(server, tmp_path / "alice", "alice")
        b = logged_in(server, tmp_path / "bob", "bob")
        a.open_conversation("bob")
        wait_for(a, clientlib.ConversationReady, peer="bob")
        wait_for(b, clientlib.ConversationReady, peer="alice")
        for i in range(20):
            a.send_message("bob", f"hello {i}")
            wait_for(b, clientlib.MessageReceived, text=f"hello {i}")
        for i in range(20):  # bob's receipts are relayed too: none may be in flight during the scrape
            wait_for(a, clientlib.MessageDelivered, text=f"hello {i}")
        after = _scrape(port)
        assert (
            _metric(after, "secureim_messages_relayed_total")
            >= _metric(before, "secureim_messages_relayed_total") + 3
        )
        assert (
            _metric(after, 'secureim_logins_total{result="ok"}')
            == _metric(before, 'secureim_logins_total{result="ok"}') + 2
        )
        assert _metric(after, "secureim_online_users") == 2
        relayed = _metric(after, "secureim_messages_relayed_total")
        assert relayed >= 20
        # One relay in 16 is timed (server.RELAY_SAMPLE_MASK), the first one included.
        assert _metric(after, "secureim_relay_latency_seconds_count") == -(-relayed // 16)
        assert "secureim_bcrypt_queue_length" in after and "secureim_puzzle_difficulty_bits" in after
        a.close()
        b.close()
    finally:
        server.stop()


@pytest.mark.parametrize(
    "args, message",
    [
        (("kick", "nobody"), "No user named 'nobody'."),
        (("ban", "alice", "--for", "forever"), "Bad duration 'forever'"),
        (("ban", "alice", "--for", "0h"), "Bad duration '0h'"),
        (("ban-address", "10.0.0.300/8"), "Bad network '10.0.0.300/8'"),
        (("ban-address", "10.0.0.0/33"), "Bad network"),
        (("audit", "--since", "yesterday"), "Bad --since 'yesterday'"),
        (("delete-user", "alice"), "needs --yes"),
        (("reset-password", "Not A Name!"), "Bad username"),
        (("ban",), "the following arguments are required: user"),
        (("frobnicate",), "invalid choice"),
    ],
)
def test_bad_admin_input_is_one_line_and_exit_2(server, tmp_path, args, message):
    logged_in(server, tmp_path / "alice", "alice").close()
    done = admin(server, *args)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr


def test_admin_without_a_database_says_so(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "admin", "--data-dir", str(tmp_path / "none"), "users"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and "No database" in done.stderr
    assert not (tmp_path / "none").exists()


def test_the_console_on_a_piped_stdin(tmp_path):
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "server.py"),
            "--port",
            "0",
            "--data-dir",
            str(data),
            "--bcrypt-cost",
            "4",
            "--console",
            "on",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(tmp_path),
    )
    lines: list[str] = []

    def until(marker: str) -> str:
        while True:
            line = proc.stdout.readline()
            assert line, f"server exited: {lines}"
            lines.append(line)
            if marker in line:
                return line

    try:
        port = int(re.search(r":(\d+) \(", until("Listening on")).group(1))
        until("Console ready")
        server = ServerProcess.__new__(ServerProcess)
        server.host, server.port, server.data_dir = "127.0.0.1", port, data
        alice = logged_in(server, tmp_path / "alice", "alice")
        until("alice connected")
        proc.stdin.write("/help\n/users\n/bogus\n/kick nobody\n/ban alice 1h too loud\n")
        proc.stdin.flush()
        until("Console commands")
        assert re.search(r"\[SERVER\]: alice\s", until("[SERVER]: alice "))
        assert "Unknown command '/bogus'" in until("Unknown command")
        assert "No user named 'nobody'." in until("No user named")
        until("Banned alice")
        assert "too loud" in wait_for(alice, clientlib.Disconnected, timeout=KICK_WAIT_S).reason
        alice.close()
        proc.stdin.close()  # the console ends; the server goes on
        logged_in(server, tmp_path / "bob", "bob").close()
        assert proc.poll() is None
    finally:
        proc.terminate()
        if not proc.stdin.closed:
            proc.stdin.close()
        proc.stdout.read()
        proc.wait(timeout=20)


# --- account self-service: /delete-account (protocol 0x68 / 0x69) ------------------------------
def test_delete_account_messages_encode_to_literal_bytes():
    from secureim import proto as P

    assert P.DeleteAccount(password=b"pw", confirm="al").encode() == bytes.fromhex("68 0002 7077 0002 616c")
    assert P.AccountDeleted(deleted=True, reason="ok").encode() == bytes.fromhex("69 01 0002 6f6b")
    assert P.decode_message(bytes.fromhex("69 00 0000")) == P.AccountDeleted(deleted=False, reason="")


def test_delete_account_asks_password_and_confirmation_then_deletes(server, tmp_path):
    child = spawn_client(server, tmp_path / "alice")
    login_flow(child, "alice", PASSWORD, new=True)
    child.expect_exact("[CLIENT]: Destination:")
    child.sendline("/delete-account")
    child.expect_exact("[CLIENT]: Password:")
    child.sendline(PASSWORD)
    child.expect_exact("Type your username (alice) to confirm:")
    child.sendline("bob")
    child.expect_exact("[CLIENT]: Not confirmed; nothing was deleted.")
    child.sendline("/delete-account")
    child.expect_exact("[CLIENT]: Password:")
    child.sendline(WRONG_PASSWORD)
    child.expect_exact("to confirm:")
    child.sendline("alice")
    child.expect_exact("[CLIENT]: Wrong password; nothing was deleted.")
    assert re.search(r"^alice\s", admin(server, "users").stdout, re.M)
    child.sendline("/delete-account")
    child.expect_exact("[CLIENT]: Password:")
    child.sendline(PASSWORD)
    child.expect_exact("to confirm:")
    child.sendline("alice")
    child.expect_exact("[CLIENT]: Your account and everything the server kept for it were deleted.")
    child.expect_exact("[CLIENT]: Goodbye.")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert not re.search(r"^alice\s", admin(server, "users").stdout, re.M)
    events = _events(admin(server, "audit", "--user", "alice").stdout)
    assert events == [
        "login_failed",
        "register",
        "delete_account_failed",
        "delete_account",
    ]  # login first: new user
    again = client_for(server, tmp_path / "alice")
    with pytest.raises(InvalidCredentials):
        again.login("alice", PASSWORD)
    again.close()


def test_delete_account_refuses_a_confirmation_that_is_not_the_username(server, tmp_path):
    alice = logged_in(server, tmp_path / "alice", "alice")
    alice.delete_account(PASSWORD, "bob")
    answer = wait_for(alice, clientlib.AccountDeletion)
    assert not answer.deleted and "nothing was deleted" in answer.reason
    alice.delete_account(PASSWORD, "alice")
    assert wait_for(alice, clientlib.AccountDeletion).deleted
    assert "Your account was deleted." in wait_for(alice, clientlib.Disconnected).reason
    alice.close()


def test_metrics_listen_on_loopback_only():
    from secureim.server.metrics import MetricsEndpoint, ServerMetrics

    endpoint = MetricsEndpoint(ServerMetrics(), lambda: "database", 0)
    try:
        assert endpoint._httpd.server_address[0] == "127.0.0.1"
        endpoint.start()
        with pytest.raises(urllib.error.HTTPError) as info:
            _scrape(endpoint.port, "/healthz")
        assert info.value.code == 503 and info.value.read() == b"unavailable: database\n"
    finally:
        endpoint.stop()


def test_the_console_starts_by_itself_in_a_terminal(tmp_path):
    child = pexpect.spawn(
        sys.executable,
        [str(ROOT / "server.py"), "--port", "0", "--data-dir", str(tmp_path / "d"), "--bcrypt-cost", "4"],
        encoding="utf-8",
        timeout=20,
        cwd=str(tmp_path),
    )
    try:
        child.expect_exact("[SERVER]: Console ready; type /help.")
        child.expect_exact("Ready to accept connections.")
        child.sendline("/who")
        child.expect(r"\[SERVER\]: USER\s+FROM\s+SINCE \(UTC\)\s+NODE")
        child.sendline("/ban nobody 1x")
        child.expect_exact("[SERVER]: No user named 'nobody'.")
    finally:
        child.kill(15)
        child.expect(pexpect.EOF)
        child.close()


def test_password_change_hook_ends_older_tickets_and_is_audited(tmp_path):
    from server_fixtures import logged_in_client, running_server

    with running_server(tmp_path / "data") as srv:
        alice = logged_in_client(srv, tmp_path / "alice", "alice")
        epoch = srv.service.password_changed("alice", "127.0.0.1")
        assert epoch == 1
        assert srv.service.kick("alice", "bye")
        wait_for(alice, clientlib.Disconnected)
        with pytest.raises(InvalidCredentials, match="ticket"):
            alice.resume()
        alice.close()
        assert [e.event for e in srv.storage.audit_events("alice")] == ["register", "password_change"]


def test_identity_key_changes_and_lockouts_are_visible(server, tmp_path):
    logged_in(server, tmp_path / "alice", "alice").close()
    logged_in(server, tmp_path / "alice-laptop", "alice", register=False).close()  # a new identity key
    for _ in range(5):
        c = client_for(server, tmp_path / "alice")
        with pytest.raises((InvalidCredentials, AccountLocked)):
            c.login("alice", WRONG_PASSWORD)
        c.close()
    lockouts = admin(server, "lockouts").stdout
    assert re.search(r"^alice\s+127\.0\.0\.1\s+5\s+\d+ s$", lockouts, re.M), lockouts
    assert re.search(r"^alice\s.*\sno\s+yes\s+no$", admin(server, "users").stdout, re.M)
    events = _events(admin(server, "audit", "--user", "alice", "--since", "1h").stdout)
    assert events[:3] == ["register", "identity_key_changed", "login"]
    assert admin(server, "unlock", "alice").stdout.startswith("Unlocked alice (1 address cleared)")
    assert admin(server, "lockouts").stdout.splitlines()[1:] == []


def test_the_terminal_client_shows_why_it_was_disconnected(server, tmp_path):
    child = spawn_client(server, tmp_path / "alice")
    login_flow(child, "alice", PASSWORD, new=True)
    child.expect_exact("[CLIENT]: Destination:")
    assert admin(server, "ban", "alice", "--reason", "harassment").returncode == 0
    child.expect_exact(
        "[CLIENT]: Connection to the server lost: the server closed the session: "
        "This account is banned until lifted: harassment."
    )
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
