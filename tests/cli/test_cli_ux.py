"""The terminal client as a newcomer meets it: issue 14's bugs and irssi/weechat habits.

Every test drives the real client.py in a pseudo-terminal (pexpect) against the
real server.py, except the sanitiser's property tests and the ticket check,
which drive the library directly.  Each bug test failed before its fix.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import uuid

import pexpect
import pytest
from cli_helpers import ROOT, ServerProcess, login_flow, quit_client, spawn_client, unstamped
from hypothesis import example, given
from hypothesis import strategies as st

from secureim import client as C
from secureim.errors import InvalidCredentials

PW_A, PW_B, PW_C = "alice-password", "bob-password", "carol-password"


@pytest.fixture
def server(tmp_path):
    srv = ServerProcess(tmp_path / "srvdata")
    yield srv
    srv.stop()


def user(server, tmp_path, name, password, *extra, new=True, home=None):
    """A logged-in terminal client whose whole output is kept in ``child.transcript``."""
    child = spawn_client(server, home or tmp_path / name, *extra)
    child.logfile_read = io.StringIO()
    login_flow(child, name, password, new=new)
    return child


def said(child) -> str:
    return child.logfile_read.getvalue()


def leave_with_ctrl_d(child):
    """Ctrl-D on an empty line until the client exits.  A Ctrl-D that lands between two prompts,
    while the terminal is in cooked mode, is swallowed by the tty itself; the next one reaches
    the prompt.  Bounded: five tries of five seconds."""
    for _ in range(5):
        child.sendeof()
        if child.expect([pexpect.EOF, pexpect.TIMEOUT], timeout=5) == 0:
            return
    raise AssertionError("the client did not leave on Ctrl-D")


def choose(child, dest):
    child.expect_exact("[CLIENT]: Destination:")
    child.sendline(dest)


def talking(a, b, a_name="alice", b_name="bob"):
    """a opens a conversation with b, and b answers; both have the other as destination."""
    choose(a, b_name)
    a.expect_exact(f"Conversation with {b_name} is ready")
    b.expect_exact(f"{a_name} opened a conversation with you")
    choose(b, a_name)
    b.expect_exact("Now talking to")


def library_user(server, tmp_path, name, password, *, register=True):
    client = C.ChatClient(server.host, server.port, home=tmp_path / name)
    client.connect()
    (client.register if register else client.login)(name, password)
    client.start()
    return client


# =============================================================================
# Bugs
# =============================================================================
def test_bug1_destination_already_open_says_its_status_first(server, tmp_path):
    alice = user(server, tmp_path, "alice", PW_A)
    bob = user(server, tmp_path, "bob", PW_B)
    choose(bob, "alice")
    alice.expect_exact("bob opened a conversation with you")
    choose(alice, "bob")
    alice.expect_exact("[CLIENT]: Destination user is online.")
    alice.expect_exact("[CLIENT]: Now talking to bob.")
    alice.sendline("/to bob")
    alice.expect_exact("[CLIENT]: Destination user is online.")
    alice.expect_exact("[CLIENT]: Now talking to bob.")
    quit_client(alice)
    quit_client(bob)


def test_bug2_bug3_a_long_message_is_shown_whole_on_both_screens(server, tmp_path):
    alice = user(server, tmp_path, "alice", PW_A)
    bob = user(server, tmp_path, "bob", PW_B)
    talking(alice, bob)
    text = "".join(f"{i:05d}" for i in range(2000))  # 10,000 characters, one line
    alice.send(text + "\r")
    bob.expect_exact(text[-60:] + "\r\n")  # the end arrives: nothing was cut at 4,096
    alice.expect_exact(text[-60:] + "\r\n")  # the sender sees it whole too, as a line of output
    for child in (alice, bob):
        shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|[\r\n]", "", said(child))
        assert text in shown
        assert "…" not in shown
    quit_client(alice)
    quit_client(bob)


def test_bug4_a_multi_line_paste_is_shown_as_lines_each_with_the_sender(server, tmp_path):
    alice = user(server, tmp_path, "alice", PW_A)
    bob = user(server, tmp_path, "bob", PW_B)
    talking(alice, bob)
    alice.send("\x1b[200~first line\n[carol]: I am carol\nthird\x1b[201~")  # a bracketed paste
    alice.send("\r")
    bob.expect(
        r"\[alice\]: first line\r\n(\d\d:\d\d )?\[alice\]: \[carol\]: I am carol\r\n"
        r"(\d\d:\d\d )?\[alice\]: third"
    )
    assert "\\x0a" not in said(bob)
    quit_client(alice)
    quit_client(bob)


def test_bug5_emoji_with_zero_width_joiners_are_kept_and_bidi_is_not(server, tmp_path):
    alice = user(server, tmp_path, "alice", PW_A)
    mallory = library_user(server, tmp_path, "mallory", "mallory-password")
    mallory.open_conversation("alice")
    while not mallory.has_conversation("alice"):
        assert mallory.next_event(timeout=10) is not None
    family, coder = "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f469\u200d\U0001f4bb"
    mallory.send_message(
        "alice", f"{family} {coder} \u2764\ufe0f \u202egnp.exe \u2066x\u2069 \u200fy \x1b[2J"
    )
    alice.expect_exact(
        f"[mallory]: {family} {coder} \u2764\ufe0f \\u202egnp.exe \\u2066x\\u2069 \\u200fy \\x1b[2J"
    )
    assert "\\u200d" not in said(alice) and "\u202e" not in said(alice)
    mallory.close()
    quit_client(alice)


def test_bug6_destination_online_is_said_once(server, tmp_path):
    bob = user(server, tmp_path, "bob", PW_B)
    quit_client(bob)
    alice = user(server, tmp_path, "alice", PW_A)
    choose(alice, "bob")  # bob has an account but is offline
    alice.expect_exact("[CLIENT]: Destination user is offline.")
    bob = user(server, tmp_path, "bob", PW_B, new=False)
    alice.expect_exact("[CLIENT]: Destination user is online.")
    alice.expect_exact("Conversation with bob is ready")
    bob.expect_exact("alice opened a conversation with you")
    choose(bob, "alice")
    # bob signs in from a second place (same identity): alice is told once.
    again = user(server, tmp_path, "bob", PW_B, new=False, home=tmp_path / "bob")
    bob.expect(pexpect.EOF)
    alice.expect_exact("Conversation with bob is ready")
    alice.sendline("/who")  # a marker: every notice before it has been printed
    alice.expect_exact("[CLIENT]: Online now (2)")
    assert said(alice).count("Destination user is online.") == 2  # once per sign-in of bob
    quit_client(again)
    quit_client(alice)


def test_bug7_every_command_gives_its_usage(server, tmp_path):
    alice = user(server, tmp_path, "alice", PW_A)
    choose(alice, "/help")
    for cmd in ("/to", "/direct", "/mode", "/verify", "/verified", "/accept"):
        alice.sendline(cmd)
        alice.expect_exact(f"[CLIENT]: Usage: {cmd} USER")
    assert "Unknown command" not in said(alice)
    leave_with_ctrl_d(alice)


def _run_client(tmp_path, *args):
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm")
    return subprocess.run(
        [sys.executable, str(ROOT / "client.py"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        stdin=subprocess.DEVNULL,
        cwd=str(tmp_path),
    )


def test_bug8_unusable_home_and_bad_port_are_one_clear_line(server, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for home, why in ((a_file, "is not a folder"), (a_file / "sub", "is not a folder")):
        child = spawn_client(server, home, cwd=tmp_path)
        child.expect(pexpect.EOF)
        child.close()
        assert why in child.before and "Traceback" not in child.before
        assert "Connecting" not in child.before  # checked before connecting
        assert child.exitstatus == 1
    for port in ("99999", "0", "-1", "http"):
        done = _run_client(tmp_path, "--home", str(tmp_path / "h"), "--port", port)
        assert done.returncode == 2 and "--port" in done.stderr and "Traceback" not in done.stderr


def _server_run(tmp_path, *args, timeout=30):
    """server.py that is expected to stop at once (a configuration error)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(tmp_path),
    )


def test_bug9_mysql_errors_say_what_happened_and_the_database_is_created(tmp_path, mysql_database):
    name = f"secureim_new_{uuid.uuid4().hex[:12]}"
    srv = ServerProcess(tmp_path / "data", "--db", f"mysql://root@127.0.0.1:3306/{name}")
    try:
        assert any("database: mysql" in line for line in srv.lines)  # it was created
    finally:
        srv.stop()
        import pymysql

        conn = pymysql.connect(host="127.0.0.1", user="root", password="")
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()
    wrong = _server_run(
        tmp_path,
        "--data-dir",
        str(tmp_path / "d2"),
        "--db",
        "mysql://nosuchuser:wrong@127.0.0.1:3306/secureim_x",
    )
    assert wrong.returncode == 1
    assert "refused user 'nosuchuser': wrong user name or password" in wrong.stderr
    assert "wrong" not in wrong.stderr.replace("wrong user name", "")  # the password is never shown
    down = _server_run(
        tmp_path, "--data-dir", str(tmp_path / "d3"), "--db", "mysql://root@127.0.0.1:1/secureim_x"
    )
    assert down.returncode == 1 and "Cannot reach MySQL at 127.0.0.1:1" in down.stderr


def test_bug10_sqlite_path_and_data_dir_errors_are_clear(tmp_path):
    missing = _server_run(
        tmp_path, "--data-dir", str(tmp_path / "d"), "--db", "sqlite:///no/such/folder/x.db"
    )
    assert missing.returncode == 1 and "does not exist" in missing.stderr and "four slashes" in missing.stderr
    assert not (tmp_path / "no").exists()  # no folder was made silently
    a_file = tmp_path / "f"
    a_file.write_text("x")
    not_dir = _server_run(tmp_path, "--data-dir", str(a_file))
    assert not_dir.returncode == 1 and f"--data-dir {a_file} is not a folder." in not_dir.stderr
    assert "Errno" not in not_dir.stderr
    help_text = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    assert "four slashes" in help_text


def test_bug11_too_many_attempts_is_said_once_and_plainly(server, tmp_path):
    alice = user(server, tmp_path, "alice", PW_A)
    quit_client(alice)
    intruder = spawn_client(server, tmp_path / "intruder")
    intruder.logfile_read = io.StringIO()
    intruder.expect_exact("[CLIENT]: Connection successful.")
    for attempt in range(6):
        intruder.expect_exact("[CLIENT]: Username:")
        intruder.sendline("alice")
        intruder.expect_exact("[CLIENT]: Password:")
        intruder.sendline(f"guess-{attempt}")
        if attempt < 4:
            intruder.expect_exact("(y/n)")
            intruder.sendline("n")
    intruder.expect(pexpect.EOF)
    out = said(intruder)
    assert out.count("Too many attempts") == 1
    assert re.search(
        r"\[CLIENT\]: Account locked after too many failed logins; try again in \d+ seconds.\r\n"
        r"(\d\d:\d\d )?\[CLIENT\]: Too many attempts on this connection; the server closed it.",
        out,
    )


def test_bug12_a_changed_device_is_explained_once_and_accept_works_after_a_restart(server, tmp_path):
    alice = user(server, tmp_path, "alice", PW_A)
    bob = user(server, tmp_path, "bob", PW_B)
    talking(alice, bob)
    quit_client(alice)
    bob.expect_exact("Destination user is offline.")
    alice = user(server, tmp_path, "alice", PW_A, new=False, home=tmp_path / "alice-laptop")  # a new device
    choose(alice, "bob")
    alice.expect_exact("[CLIENT]: Destination user is online.")
    bob.expect_exact("SECURITY WARNING about alice")
    bob.expect_exact("/accept alice")
    alice.sendline("are you there?")
    alice.expect_exact("Not sent: bob's client did not complete the key exchange")
    alice.expect_exact("bob must first accept it with /accept alice")
    assert "is not connected" not in said(alice)
    bob.sendline("/who")  # a marker: every notice before it has been printed
    bob.expect_exact("[CLIENT]: Online now (2)")
    assert said(bob).count("SECURITY WARNING") == 1
    assert "unknown conversation" not in said(bob)
    quit_client(bob)
    bob = spawn_client(server, tmp_path / "bob")  # bob restarts, then accepts
    bob.logfile_read = io.StringIO()
    login_flow(bob, "bob", PW_B, new=False)
    bob.expect_exact("[CLIENT]: Destination:")
    bob.sendline("/accept alice")
    bob.expect_exact("Accepted alice's new identity key")
    bob.expect_exact("Conversation with alice is ready")
    choose(bob, "alice")
    alice.sendline("now?")
    bob.expect_exact("[alice]: now?")
    quit_client(alice)
    quit_client(bob)


def test_bug13_piped_input_never_loses_the_first_message(server, tmp_path):
    bob = user(server, tmp_path, "bob", PW_B)
    alice = user(server, tmp_path, "alice", PW_A)
    quit_client(alice)
    script = f"alice\n{PW_A}\nbob\nfirst line right away\nsecond line\n/quit\n"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "client.py"),
            "--home",
            str(tmp_path / "alice"),
            "--port",
            str(server.port),
        ],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )  # no controlling terminal: getpass reads stdin
    assert done.returncode == 0, done.stdout + done.stderr
    bob.expect_exact("[alice]: first line right away")
    bob.expect_exact("[alice]: second line")
    quit_client(bob)


def test_bug14_sending_to_a_user_who_does_not_exist_says_so(server, tmp_path):
    alice = user(server, tmp_path, "alice", PW_A)
    choose(alice, "zed")
    alice.expect_exact("Destination user zed does not exist")
    alice.sendline("hello?")
    alice.expect_exact("[CLIENT]: Not sent: zed does not exist")
    assert "not connected" not in said(alice)
    quit_client(alice)


# =============================================================================
# What users of terminal chat expect
# =============================================================================
def test_prompt_shows_the_conversation_and_lines_have_times(server, tmp_path):
    alice = user(server, tmp_path, "alice", PW_A)
    bob = user(server, tmp_path, "bob", PW_B, "--no-timestamps")
    talking(alice, bob)
    alice.expect_exact("[alice→bob]>")
    bob.expect_exact("[bob→alice]>")
    alice.sendline("hi")
    bob.expect_exact("[alice]: hi")
    assert not re.search(r"\d\d:\d\d \[alice\]: hi", said(bob))  # --no-timestamps: none
    alice.expect(r"\d\d:\d\d \[alice→bob\]: hi\r\n")  # own line, echoed with its time
    assert re.search(r"\d\d:\d\d \[CLIENT\]: Conversation with bob is ready", said(alice))
    quit_client(alice)
    quit_client(bob)


def test_other_conversations_are_marked_ring_and_show_in_unread(server, tmp_path):
    alice = user(server, tmp_path, "alice", PW_A)
    bob = user(server, tmp_path, "bob", PW_B)
    carol = user(server, tmp_path, "carol", PW_C, "--no-bell")
    talking(alice, bob)
    choose(carol, "alice")
    carol.expect_exact("Conversation with alice is ready")
    alice.expect_exact("carol opened a conversation with you")
    carol.sendline("psst")
    alice.expect_exact("* [carol]: psst")
    alice.expect_exact("(act: carol:1)>")  # the prompt's activity line
    assert "\a" in said(alice)
    alice.sendline("/unread")
    alice.expect_exact("[CLIENT]: Unread: carol (1)")
    alice.sendline("/to carol")
    alice.expect_exact("Now talking to carol.")
    alice.sendline("/unread")
    alice.expect_exact("No unread messages.")
    alice.sendline("back to you")  # carol (--no-bell) talking to alice, bob sends her nothing: no bell
    carol.expect_exact("[alice]: back to you")
    bob.sendline("hi alice")
    alice.expect_exact("* [bob]: hi alice")
    assert "\a" not in said(carol)
    for child in (alice, bob, carol):
        quit_client(child)


def test_tab_completes_commands_and_names(server, tmp_path):
    alice = user(server, tmp_path, "alice", PW_A)
    bob = user(server, tmp_path, "bob", PW_B)
    talking(alice, bob)
    alice.send("/wh\t")
    alice.send("\r")
    alice.expect_exact("[CLIENT]: Online now (2): alice, bob")
    alice.send("/ver\t")  # /verify and /verified: the menu offers both; completes the common part
    alice.send("\x15")  # Ctrl-U: clear
    alice.send("/mode b\t")
    alice.send("\r")
    alice.expect_exact("[CLIENT]: Conversation with bob: relayed by the server.")
    quit_client(alice)
    quit_client(bob)


def test_double_slash_sends_a_slash_line_and_commands_ignore_case(server, tmp_path):
    alice = user(server, tmp_path, "alice", PW_A)
    bob = user(server, tmp_path, "bob", PW_B)
    talking(alice, bob)
    alice.sendline("//etc/hosts is a file")
    bob.expect_exact("[alice]: /etc/hosts is a file")
    alice.sendline("/WHO")
    alice.expect_exact("[CLIENT]: Online now (2)")
    alice.sendline("/Help TO")
    alice.expect_exact("[CLIENT]: /to USER: talk to USER")
    quit_client(alice)
    quit_client(bob)


def test_ctrl_c_clears_the_line_and_ctrl_d_leaves(server, tmp_path):
    alice = user(server, tmp_path, "alice", PW_A)
    bob = user(server, tmp_path, "bob", PW_B)
    talking(alice, bob)
    # Keys go in only while the chat prompt is up: between two prompts the terminal is in cooked
    # mode, where the tty itself turns Ctrl-C into SIGINT and swallows Ctrl-D (a person never
    # types that fast; a test does).
    alice.expect_exact("[alice→bob]>")
    alice.send("never sent")
    alice.sendintr()
    alice.send("sent\r")
    bob.expect_exact("[alice]: sent")
    assert "never sent" not in said(bob)
    alice.expect_exact("[alice→bob]>")
    alice.send("half")
    alice.sendeof()  # Ctrl-D on a line with text: does not leave
    alice.send("\x15")  # Ctrl-U clears it
    alice.sendline("/unread")
    alice.expect_exact("No unread messages.")
    alice.expect_exact("[alice→bob]>")
    alice.sendeof()  # Ctrl-D on an empty line leaves
    alice.expect(pexpect.EOF)
    alice.close()
    assert alice.exitstatus == 0
    assert quit_client(bob) == 0


def test_help_for_one_command_and_direct_mode_explained(server, tmp_path):
    alice = user(server, tmp_path, "alice", PW_A)
    choose(alice, "/help")
    alice.expect_exact("Direct mode shows your address to the peer")
    alice.sendline("/help direct")
    alice.expect_exact("[CLIENT]: /direct USER: talk to USER peer to peer")
    alice.expect_exact("Direct mode shows your IP address and a UDP port to USER")
    alice.sendline("/help /passwd")
    alice.expect_exact("[CLIENT]: /passwd: change your password")
    alice.sendline("/help nosuch")
    alice.expect_exact("No command /nosuch")
    leave_with_ctrl_d(alice)


def test_password_rule_first_and_a_bad_password_asks_for_the_password_only(server, tmp_path):
    child = spawn_client(server, tmp_path / "dora")
    child.logfile_read = io.StringIO()
    child.expect_exact("Passwords are 8 to 1024 characters.")
    child.expect_exact("[CLIENT]: Username:")
    child.sendline("dora")
    child.expect_exact("[CLIENT]: Password:")
    child.sendline("short")
    child.expect_exact("(y/n)")
    child.sendline("y")
    child.expect_exact("Passwords must be at least 8 characters. Type the password again")
    child.expect_exact("[CLIENT]: Password:")
    child.sendline("dora-password")
    child.expect_exact("[CLIENT]: Confirm password:")
    child.sendline("dora-passwort")
    child.expect_exact("The passwords do not match. Type the password again")
    child.expect_exact("[CLIENT]: Password:")
    child.sendline("dora-password")
    child.expect_exact("[CLIENT]: Confirm password:")
    child.sendline("dora-password")
    child.expect_exact("[CLIENT]: Account created.")
    assert "Username:" not in said(child).split("Type the password again", 1)[1]  # never asked again
    quit_client(child)


def test_passwd_changes_the_password_and_keeps_the_identity(server, tmp_path):
    alice = user(server, tmp_path, "alice", PW_A)
    choose(alice, "/fingerprint")
    alice.expect(r"Your identity \(alice\): (SHA256:\S+)")
    identity = alice.match.group(1)
    alice.sendline("/passwd")
    alice.expect_exact("[CLIENT]: Old password:")
    alice.sendline("not-the-old-one")
    alice.expect_exact("[CLIENT]: New password:")
    alice.sendline("new-alice-password")
    alice.expect_exact("[CLIENT]: Confirm new password:")
    alice.sendline("new-alice-password")
    alice.expect_exact("The old password is wrong; the password was not changed.")
    alice.sendline("/passwd")
    alice.expect_exact("[CLIENT]: Old password:")
    alice.sendline(PW_A)
    alice.expect_exact("Passwords are 8 to 1024 characters.")
    alice.expect_exact("[CLIENT]: New password:")
    alice.sendline("tiny")
    alice.expect_exact("Passwords must be at least 8 characters.")
    alice.sendline("new-alice-password")
    alice.expect_exact("[CLIENT]: Confirm new password:")
    alice.sendline("new-alice-password")
    alice.expect_exact("[CLIENT]: Password changed.")
    quit_client(alice)
    old = spawn_client(server, tmp_path / "alice")
    old.expect_exact("[CLIENT]: Username:")
    old.sendline("alice")
    old.expect_exact("[CLIENT]: Password:")
    old.sendline(PW_A)
    old.expect_exact("Unknown user or wrong password.")
    old.expect_exact("(y/n)")
    old.sendeof()
    old.expect(pexpect.EOF)
    again = user(server, tmp_path, "alice", "new-alice-password", new=False)
    choose(again, "/fingerprint")
    again.expect_exact(f"Your identity (alice): {identity}")  # the key file opens with the new password
    quit_client(again)


def test_passwd_ends_every_resumption_ticket(tmp_path):
    from server_fixtures import logged_in_client, running_server

    with running_server(tmp_path / "srv") as srv:
        laptop = logged_in_client(srv, tmp_path / "laptop", "alice")
        phone = logged_in_client(srv, tmp_path / "phone", "alice", register=False)  # replaces the laptop
        phone.change_password("correct horse battery", "a brand new password")
        with pytest.raises(InvalidCredentials):
            laptop.resume()  # its ticket was issued before the change
        phone.close()
        assert phone.resume()  # the ticket that came with PasswordChanged still works
        phone.close()
        laptop.close()


def test_direct_request_is_announced_to_a_peer_who_has_not_opted_in(server, tmp_path):
    alice = user(server, tmp_path, "alice", PW_A, "--direct")
    bob = user(server, tmp_path, "bob", PW_B)
    talking(alice, bob)
    alice.sendline("/direct bob")
    bob.expect_exact(
        "[CLIENT]: alice asks for a direct connection (peer to peer: each of you sees the other's "
        "address); /direct alice to accept."
    )
    bob.sendline("/direct alice")
    bob.expect_exact("Conversation with alice is now direct")
    bob.sendline("over udp")
    alice.expect_exact("[bob]: over udp")
    quit_client(alice)
    quit_client(bob)


# =============================================================================
# The server's console and options
# =============================================================================
def test_server_logs_failed_logins_and_lockouts_by_default_without_passwords(tmp_path):
    srv = ServerProcess(tmp_path / "data", "--log-level", "warning")  # any case
    intruder = spawn_client(srv, tmp_path / "intruder")
    intruder.expect_exact("[CLIENT]: Connection successful.")
    for attempt in range(5):
        intruder.expect_exact("[CLIENT]: Username:")
        intruder.sendline("victim")
        intruder.expect_exact("[CLIENT]: Password:")
        intruder.sendline(f"secret-guess-{attempt}")
        if attempt < 4:
            intruder.expect_exact("(y/n)")
            intruder.sendline("n")
    intruder.expect_exact("Account locked")
    intruder.expect_exact("[CLIENT]: Username:")
    intruder.sendeof()
    intruder.expect(pexpect.EOF)
    srv.stop()
    log = srv.errors
    assert log.count("failed login from 127.0.0.1 for 'victim'") == 4
    assert re.search(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d WARNING .*login refused from 127.0.0.1 for 'victim': "
        r"locked for \d+ s",
        log,
        re.M,
    )
    assert "secret-guess" not in log
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in srv.lines)
    assert "[SERVER]: Stopped." in unstamped(srv.lines)


def test_server_help_shows_every_default_and_log_level_help(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    options = re.split(r"\n  (?=--)", out.split("options:", 1)[1])[1:]
    assert len(options) >= 14
    for option in options:
        assert "default" in option, option
    assert "any case" in out
    bad = _server_run(tmp_path, "--log-level", "loud")
    assert bad.returncode == 2 and "DEBUG, INFO, WARNING, ERROR" in bad.stderr


# =============================================================================
# The sanitiser, property-tested
# =============================================================================
BIDI = [chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)]
DANGEROUS = st.one_of(
    st.sampled_from(BIDI),
    st.characters(categories=["Cc"]),
    st.sampled_from(["\u2028", "\u2029", "\u200b", "\ufeff"]),
)


@given(st.lists(st.one_of(st.characters(), DANGEROUS), max_size=60).map("".join))
@example("hi\r[bob]: a carriage return overwrites the prefix\n\x1b[1A\u202e")
def test_sanitize_never_lets_a_control_or_bidi_character_through(text):
    shown = C.sanitize(text, 10_000)
    for ch in shown:
        assert ch not in BIDI
        assert not (ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0)
        assert ch not in "\u2028\u2029\u200b\ufeff"
    for line in C.sanitize_lines(text):
        assert "\n" not in line and "\r" not in line and "\x1b" not in line


@given(
    st.lists(
        st.sampled_from(
            ["\u200d", "\u200c", "\ufe0f", "\ufe0e", "\U0001f469", "\U0001f4bb", "a", "\U000e0067", "\u00ad"]
        ),
        max_size=40,
    ).map("".join)
)
def test_sanitize_keeps_joiners_and_variation_selectors(text):
    assert C.sanitize(text, 10_000) == text


@given(st.lists(st.text(max_size=20), min_size=1, max_size=8))
def test_sanitize_lines_gives_back_each_line(lines):
    clean = [line.replace("\n", "").replace("\r", "") for line in lines]
    assert C.sanitize_lines("\n".join(clean)) == [C.sanitize(line, C.MAX_DISPLAY_CHARS) for line in clean]
