"""The scriptable client (issue 15): ``send``, ``receive``, ``--json`` and the local history.

Real processes: server.py as a process, client.py as a subprocess (scripts) or in a
pseudo-terminal (pexpect, a person), peers as library clients.  Synchronised on what
the programs print, never on sleep.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading

import pexpect
import pytest
from cli_helpers import ROOT, ServerProcess, login_flow, quit_client, spawn_client
from server_fixtures import wait_for

import crypto_utils as cu
from secureim import client as C
from secureim.client import history as H
from secureim.errors import HistoryLocked

PW_A, PW_B, PW_C = "alice-password", "bob-password", "carol-password"
TIMEOUT_S = 60


@pytest.fixture
def server(tmp_path):
    srv = ServerProcess(tmp_path / "srvdata")
    yield srv
    srv.stop()


def _env(password: str | None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECUREIM_")}
    if password is not None:
        env["SECUREIM_PASSWORD"] = password
    env.update(extra)
    return env


def _args(server, home, *args):
    return [sys.executable, str(ROOT / "client.py"), "--home", str(home), "--port", str(server.port), *args]


def run_cli(server, home, *args, password: str | None = PW_A, stdin: str = "", **extra):
    """client.py as a script runs it: no terminal (getpass would read stdin), stdin piped."""
    return subprocess.run(
        _args(server, home, *args),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=_env(password, **extra),
        start_new_session=True,
    )


def peer(server, home, name, password, *, register=True, **kw) -> C.ChatClient:
    client = C.ChatClient(server.host, server.port, home=home, **kw)
    client.connect()
    (client.register if register else client.login)(name, password)
    client.start()
    return client


def registered(server, home, name, password) -> None:
    """A user who has logged in once and left, with prekeys on the server (so they can be written to)."""
    client = peer(server, home, name, password)
    assert client.mailbox.published.wait(20), "the client did not publish its prekeys"
    client.close()


class JsonProcess:
    """client.py with --json: lines read on a thread, taken with a timeout, each parsed."""

    def __init__(self, server, home, *args, password=PW_A) -> None:
        self.proc = subprocess.Popen(
            _args(server, home, "--json", *args),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(password),
            start_new_session=True,
        )
        self.lines: queue.Queue = queue.Queue()
        self.raw: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.raw.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def command(self, **doc) -> None:
        self.proc.stdin.write(json.dumps(doc) + "\n")
        self.proc.stdin.flush()

    def expect(self, event: str, **fields) -> dict:
        seen = []
        while True:
            try:
                line = self.lines.get(timeout=TIMEOUT_S)
            except queue.Empty:
                raise AssertionError(f"no {event} {fields}; saw {seen}") from None
            if line is None:
                raise AssertionError(f"exited before {event} {fields}; saw {seen}; {self.proc.stderr.read()}")
            doc = json.loads(line)
            seen.append(doc)
            if doc["event"] == event and all(doc.get(k) == v for k, v in fields.items()):
                return doc

    def finish(self) -> int:
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        code = self.proc.wait(timeout=TIMEOUT_S)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code

    def all_json(self) -> list[dict]:
        return [json.loads(line) for line in self.raw]  # every line parses, or this raises


# =============================================================================
# One-shot commands
# =============================================================================
def test_send_from_a_script_shows_in_bobs_terminal(server, tmp_path):
    registered(server, tmp_path / "alice", "alice", PW_A)
    bob = spawn_client(server, tmp_path / "bob")
    login_flow(bob, "bob", PW_B, new=True)
    bob.expect_exact("[CLIENT]: Destination:")
    with socket.socket() as s:  # a dead first node: skipped
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    done = run_cli(
        server,
        tmp_path / "alice",
        "--host",
        f"127.0.0.1:{dead},127.0.0.1:{server.port}",
        "send",
        "bob",
        "build 1234 passed",
        "--user",
        "alice",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr
    bob.expect_exact("[alice]: build 1234 passed")
    quit_client(bob)


def test_receive_count_1_json_prints_one_valid_object(server, tmp_path):
    registered(server, tmp_path / "bob", "bob", PW_B)
    receiver = JsonProcess(
        server, tmp_path / "bob", "receive", "--count", "1", "--user", "bob", password=PW_B
    )
    receiver.expect("ready", user="bob")
    alice = peer(server, tmp_path / "alice", "alice", PW_A)
    alice.send_confirmed("bob", 'ping {"json": true} \x1b[2J \u202egnp.exe')
    assert receiver.finish() == 0
    docs = receiver.all_json()
    messages = [d for d in docs if d["event"] == "message"]
    assert len(messages) == 1
    assert (
        messages[0]["from"] == "alice" and messages[0]["text"] == 'ping {"json": true} \x1b[2J \u202egnp.exe'
    )
    assert all(d["v"] == 1 and isinstance(d["time"], float) for d in docs)
    raw = "".join(receiver.raw)
    assert "\x1b" not in raw and "\u202e" not in raw  # escaped in the JSON text (ASCII only), never raw
    alice.close()


def test_receive_plain_prints_the_message_and_times_out_with_exit_1(server, tmp_path):
    registered(server, tmp_path / "bob", "bob", PW_B)
    alice = peer(server, tmp_path / "alice", "alice", PW_A)
    proc = subprocess.Popen(
        _args(server, tmp_path / "bob", "receive", "--count", "2", "--timeout", "10", "--user", "bob"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(PW_B),
        start_new_session=True,
    )
    alice.open_conversation("bob")  # bob's receive may not be up yet: then the server tells alice when it is
    if not alice.wait_conversation("bob", 5):
        wait_for(alice, C.ConversationReady, timeout=30, peer="bob")
    alice.send_confirmed("bob", "two\nlines")
    alice.close()
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 1 and "1 of 2 messages" in err  # the count was not reached
    assert out == "[alice]: two\n[alice]: lines\n"


def test_a_changed_server_key_gives_exit_3_and_sends_nothing(server, tmp_path):
    registered(server, tmp_path / "alice", "alice", PW_A)
    registered(server, tmp_path / "carol", "carol", PW_C)
    bob = peer(server, tmp_path / "bob", "bob", PW_B)
    known = tmp_path / "alice" / "known_servers"
    host_port, _key = known.read_text().split()
    known.write_text(f"{host_port} {cu.b64encode(bytes(32))}\n")  # the service as alice knows it
    done = run_cli(server, tmp_path / "alice", "send", "bob", "must not arrive", "--user", "alice")
    assert done.returncode == 3, done.stderr
    assert "presented" in done.stderr and "Traceback" not in done.stderr
    ok = run_cli(server, tmp_path / "carol", "send", "bob", "marker", "--user", "carol", password=PW_C)
    assert ok.returncode == 0, ok.stderr
    first = wait_for(bob, C.MessageReceived)
    assert (first.peer, first.text) == ("carol", "marker")  # nothing from alice came before it
    bob.close()


def test_a_wrong_password_gives_exit_4(server, tmp_path):
    registered(server, tmp_path / "alice", "alice", PW_A)
    done = run_cli(
        server, tmp_path / "alice", "send", "bob", "x", "--user", "alice", password="wrong-password"
    )
    assert done.returncode == 4 and "wrong password" in done.stderr.lower()
    json_done = run_cli(
        server, tmp_path / "alice", "--json", "receive", "--user", "alice", password="wrong-pw-2"
    )
    assert json_done.returncode == 4
    assert [
        json.loads(line)["exit"]
        for line in json_done.stdout.splitlines()
        if json.loads(line)["event"] == "error"
    ] == [4]


def test_sending_to_an_offline_user_stores_it_and_wait_delivered_needs_the_receipt(server, tmp_path):
    registered(server, tmp_path / "alice", "alice", PW_A)
    registered(server, tmp_path / "bob", "bob", PW_B)
    done = run_cli(server, tmp_path / "alice", "--json", "send", "bob", "anyone?", "--user", "alice")
    assert done.returncode == 0, done.stderr
    assert [
        json.loads(line)["state"] for line in done.stdout.splitlines() if json.loads(line)["event"] == "sent"
    ] == ["stored"]
    bob = peer(server, tmp_path / "bob", "bob", PW_B, register=False)
    assert wait_for(bob, C.MessageReceived).text == "anyone?"
    delivered = run_cli(
        server,
        tmp_path / "alice",
        "--json",
        "send",
        "bob",
        "are you there?",
        "--user",
        "alice",
        "--wait-delivered",
    )
    assert delivered.returncode == 0, delivered.stderr
    assert [json.loads(line)["event"] for line in delivered.stdout.splitlines()][-2:] == ["sent", "delivered"]
    bob.close()
    nobody = run_cli(server, tmp_path / "alice", "--json", "send", "zed", "anyone?", "--user", "alice")
    assert nobody.returncode == 1
    assert "zed does not exist" in json.loads(nobody.stdout.splitlines()[-1])["error"]


def test_usage_errors_are_exit_2(server, tmp_path):
    registered(server, tmp_path / "alice", "alice", PW_A)
    argv = run_cli(server, tmp_path / "alice", "send", "bob", "x", "--user", "alice", "--password", PW_A)
    assert argv.returncode == 2 and "never given as an argument" in argv.stderr
    loose = tmp_path / "pw-loose"
    loose.write_text(PW_A + "\n")
    loose.chmod(0o644)
    read_by_others = run_cli(
        server,
        tmp_path / "alice",
        "send",
        "bob",
        "x",
        "--user",
        "alice",
        "--password-file",
        str(loose),
        password=None,
    )
    assert read_by_others.returncode == 2 and "can be read by others" in read_by_others.stderr
    no_user = run_cli(server, tmp_path / "alice", "send", "bob", "x")
    assert no_user.returncode == 2 and "--user" in no_user.stderr
    no_password = run_cli(server, tmp_path / "alice", "send", "bob", "x", "--user", "alice", password=None)
    assert no_password.returncode == 2 and "SECUREIM_PASSWORD" in no_password.stderr
    bad_host = run_cli(server, tmp_path / "alice", "--host", "a,,b", "send", "bob", "x")
    assert bad_host.returncode == 2 and "--host" in bad_host.stderr


def test_password_file_and_user_from_the_environment(server, tmp_path):
    registered(server, tmp_path / "alice", "alice", PW_A)
    bob = peer(server, tmp_path / "bob", "bob", PW_B)
    secret = tmp_path / "pw"
    secret.write_text(PW_A + "\n")
    secret.chmod(0o600)
    done = run_cli(
        server,
        tmp_path / "alice",
        "send",
        "bob",
        "-",
        "--password-file",
        str(secret),
        password=None,
        SECUREIM_USER="alice",
        stdin="from stdin\n",
    )
    assert done.returncode == 0, done.stderr
    assert wait_for(bob, C.MessageReceived).text == "from stdin\n"
    bob.close()


# =============================================================================
# --json sessions driven by a program
# =============================================================================
def json_alice_and_bob(server, tmp_path) -> tuple[JsonProcess, C.ChatClient]:
    """alice's --json session (started, perhaps not logged in yet) and bob, logged in."""
    registered(server, tmp_path / "alice", "alice", PW_A)
    bob = peer(server, tmp_path / "bob", "bob", PW_B)
    return JsonProcess(server, tmp_path / "alice", "--user", "alice"), bob


def test_json_session_stdin_commands_send_and_every_line_is_json(server, tmp_path):
    session, bob = json_alice_and_bob(server, tmp_path)
    session.command(cmd="send", to="bob", text="first line, written before the client is up", id=1)
    session.proc.stdin.write("this is not json\n")
    session.proc.stdin.flush()
    assert wait_for(bob, C.MessageReceived).text == "first line, written before the client is up"
    session.expect("sent", to="bob", id=1, state="accepted")
    session.expect("error")  # the bad line: said, and the session goes on
    bob.send_confirmed("alice", "hi script")
    assert session.expect("message", **{"from": "bob"})["text"] == "hi script"
    session.command(cmd="who")
    assert session.expect("who")["users"] == ["alice", "bob"]
    session.command(cmd="history", peer="bob", id="h")
    entries = session.expect("history", id="h")["entries"]
    assert [(e["from"], e["text"]) for e in entries] == [
        ("alice", "first line, written before the client is up"),
        ("bob", "hi script"),
    ]
    # accepted by the server, then delivered once bob's end-to-end receipt is in (it may be already)
    assert entries[0]["state"] in ("accepted", "delivered") and entries[1]["state"] == "received"
    session.command(cmd="send", to="zed", text="nobody", id=2)
    assert "does not exist" in session.expect("error", id=2)["error"]
    session.command(cmd="quit")
    assert session.finish() == 0
    docs = session.all_json()
    assert docs[0]["event"] in ("ready", "info")
    assert all("event" in d and d["v"] == 1 for d in docs)
    bob.close()


def test_json_a_changed_identity_key_is_an_event_and_never_accepted_silently(server, tmp_path):
    session, bob = json_alice_and_bob(server, tmp_path)
    session.command(cmd="send", to="bob", text="hello", id=1)
    session.expect("sent", id=1)
    wait_for(bob, C.MessageReceived)
    bob.close()
    bob = peer(server, tmp_path / "bob-new-device", "bob", PW_B, register=False)  # a new identity key
    warning = session.expect("security_warning", peer="bob")
    assert "bob" in warning["text"]
    session.command(cmd="send", to="bob", text="should not go", id=2)
    assert "identity key changed" in session.expect("error", id=2)["error"]
    session.command(cmd="accept", peer="bob", id=3)
    assert session.expect("accepted", id=3)["changed"] is True
    session.expect("conversation_ready", peer="bob")
    session.command(cmd="send", to="bob", text="after accepting", id=4)
    session.expect("sent", id=4)
    assert wait_for(bob, C.MessageReceived).text == "after accepting"
    session.command(cmd="quit")
    assert session.finish() == 0
    bob.close()


# =============================================================================
# The local history, through the real terminal client
# =============================================================================
def alice_talks_to_bob(server, tmp_path, *extra, new: bool) -> pexpect.spawn:
    """alice's terminal client, logged in, with bob as the destination."""
    alice = spawn_client(server, tmp_path / "alice", *extra)
    login_flow(alice, "alice", PW_A, new=new)
    alice.expect_exact("[CLIENT]: Destination:")
    alice.sendline("bob")
    return alice


def test_history_survives_quit_holds_no_plaintext_and_needs_the_password(server, tmp_path):
    bob = peer(server, tmp_path / "bob", "bob", PW_B)
    alice = alice_talks_to_bob(server, tmp_path, new=True)
    alice.expect_exact("Conversation with bob is ready")
    alice.sendline("the eagle lands at noon")
    assert wait_for(bob, C.MessageReceived).text == "the eagle lands at noon"
    bob.send_message("alice", "roger that, over")
    alice.expect_exact("[bob]: roger that, over")
    assert quit_client(alice) == 0
    again = alice_talks_to_bob(server, tmp_path, new=False)
    again.expect_exact("[CLIENT]: Earlier with bob (last 2):")  # opening shows the last lines
    again.expect(r"\d\d:\d\d \[alice→bob\]: the eagle lands at noon")
    again.expect_exact("[bob]: roger that, over")
    again.sendline("/history 1")
    again.expect_exact("[CLIENT]: Earlier with bob (last 1):")
    again.expect_exact("[bob]: roger that, over")
    assert quit_client(again) == 0
    files = list((tmp_path / "alice" / "history").iterdir())
    raw = b"".join(p.read_bytes() for p in files)
    assert raw and b"eagle" not in raw and b"roger" not in raw and b"bob" not in raw
    service = f"127.0.0.1:{server.port}"
    with pytest.raises(HistoryLocked):
        H.History.open(tmp_path / "alice", "alice", service, "not-alices-password")
    h = H.History.open(tmp_path / "alice", "alice", service, PW_A)
    assert [e.text for e in h.last("bob").entries] == ["the eagle lands at noon", "roger that, over"]
    h.close()
    bob.close()


def test_no_history_leaves_no_file_and_forget_erases(server, tmp_path):
    bob = peer(server, tmp_path / "bob", "bob", PW_B)
    alice = alice_talks_to_bob(server, tmp_path, "--no-history", new=True)
    alice.expect_exact("Conversation with bob is ready")
    alice.sendline("off the record")
    assert wait_for(bob, C.MessageReceived).text == "off the record"
    alice.sendline("/history")
    alice.expect_exact("No history is kept in this session")
    assert quit_client(alice) == 0
    assert not (tmp_path / "alice" / "history").exists()
    done = run_cli(server, tmp_path / "alice", "--no-history", "send", "bob", "also off", "--user", "alice")
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "alice" / "history").exists()
    assert wait_for(bob, C.MessageReceived).text == "also off"
    # With history: /forget erases the conversation.
    alice = alice_talks_to_bob(server, tmp_path, new=False)
    alice.expect_exact(["Conversation with bob is ready", "Now talking to bob"])  # bob may reopen it first
    alice.sendline("on the record")
    assert wait_for(bob, C.MessageReceived).text == "on the record"
    alice.sendline("/forget bob")
    alice.expect_exact("[CLIENT]: Erased the history with bob (1 message(s)).")
    alice.sendline("/history")
    alice.expect_exact("[CLIENT]: No history with bob.")
    assert quit_client(alice) == 0
    bob.close()
