"""Several server.py nodes as one service: real NATS, real MariaDB, real processes (issue 11).

Every node runs with ``--cluster`` on the machine's NATS under a subject prefix of
this run's own, shares one MariaDB database and one identity key.  The terminal
client runs in a pseudo-terminal; the library drives the failover cases.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pexpect
import pymysql
import pytest
from cli_helpers import ROOT, login_flow, quit_client, spawn_client
from cluster_helpers import Cluster, OwnNats, free_port, shared_nats_url
from db_fixtures import MYSQL_HOST, MYSQL_PORT, MYSQL_USER
from server_fixtures import PASSWORD, wait_for

from secureim import client as C
from secureim.errors import MessageRefused

pytestmark = [pytest.mark.mysql, pytest.mark.slow]


@pytest.fixture
def cluster(tmp_path, mysql_database):
    c = Cluster(tmp_path / "cluster", mysql_database, shared_nats_url())
    yield c
    c.stop()


def _who_until(child, expected: str, tries: int = 20) -> None:
    """/who until it shows ``expected``: presence crosses nodes over NATS, a moment after a login."""
    for _ in range(tries):
        child.sendline("/who")
        if child.expect([re.escape(expected), r"Online now \(\d+\): [^\r\n]*"]) == 0:
            return
    raise AssertionError(f"/who never showed {expected!r}")


def _client(node, home, name, *, register=True, **kw) -> C.ChatClient:
    client = C.ChatClient(node.host, node.port, home=home, **kw)
    client.connect()
    (client.register if register else client.login)(name, PASSWORD)
    client.start()
    return client


def _who(client: C.ChatClient, expected: tuple[str, ...], within_s: float = 10.0) -> None:
    """/who until it lists ``expected``: each answer is a round trip; presence is on its way over NATS."""
    users, deadline = None, time.monotonic() + within_s
    while time.monotonic() < deadline:
        client.who()
        users = wait_for(client, C.WhoList).users
        if users == expected:
            return
    raise AssertionError(f"who stayed {users}, expected {expected}")


def _audit(database: str, event: str, username: str) -> int:
    conn = pymysql.connect(host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, password="", database=database)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT COUNT(*) FROM audit_log WHERE event = %s AND username = %s", (event, username)
            )
            return cur.fetchone()[0]
    finally:
        conn.close()


# =============================================================================
# Three nodes through the terminal client
# =============================================================================
def test_three_nodes_are_one_service_in_the_terminal_client(cluster, tmp_path):
    n1, n2, n3 = cluster.node(), cluster.node(), cluster.node()
    assert n1.fingerprint == n2.fingerprint == n3.fingerprint  # one identity: the client pins one key
    alice = spawn_client(n1, tmp_path / "alice")
    login_flow(alice, "alice", "alice-password", new=True)
    bob = spawn_client(n2, tmp_path / "bob")
    login_flow(bob, "bob", "bob-password", new=True)
    carol = spawn_client(n3, tmp_path / "carol")
    login_flow(carol, "carol", "carol-password", new=True)
    for child in (alice, bob, carol):  # /who lists all three on every node
        _who_until(child, "Online now (3): alice, bob, carol")

    # Chat both ways across nodes 1 and 2 (/to: the /who lines above already passed the prompt).
    alice.sendline("/to bob")
    alice.expect_exact("[CLIENT]: Destination user is online.")
    alice.expect_exact("Conversation with bob is ready")
    bob.expect_exact("alice opened a conversation with you")
    bob.sendline("/to alice")
    bob.expect_exact("Now talking to alice")
    alice.sendline("hello bob, from node 1")
    bob.expect_exact("[alice]: hello bob, from node 1")
    bob.sendline("hi alice, from node 2")
    alice.expect_exact("[bob]: hi alice, from node 2")

    # Online and offline notices cross nodes: carol (node 3) waits for dave, who logs in on node 1.
    dave = spawn_client(n1, tmp_path / "dave")
    login_flow(dave, "dave", "dave-password", new=True)
    assert quit_client(dave) == 0
    carol.sendline("/to dave")
    carol.expect_exact("[CLIENT]: Destination user is offline.")
    dave = spawn_client(n1, tmp_path / "dave")
    login_flow(dave, "dave", "dave-password", new=False)
    carol.expect_exact("[CLIENT]: Destination user is online.")  # the watch crossed from node 3 to node 1
    carol.expect_exact("Conversation with dave is ready")
    carol.sendline("hello dave")
    dave.expect_exact("[carol]: hello dave")
    assert quit_client(dave) == 0
    carol.expect_exact("[CLIENT]: Destination user is offline.")

    # A second login on another node replaces the first: bob signs in on node 3 from his laptop.
    bob2 = spawn_client(n3, tmp_path / "bob-laptop")
    login_flow(bob2, "bob", "bob-password", new=False)
    bob.expect_exact("signed in from another place")
    bob.expect(pexpect.EOF)
    alice.expect_exact("SECURITY WARNING about bob")  # a new device: a new identity key, said loudly
    alice.sendline("/accept bob")
    alice.expect_exact("Accepted bob's new identity key")
    alice.expect_exact("Conversation with bob is ready")  # re-opened with the session on node 3
    bob2.expect_exact("alice opened a conversation with you")
    bob2.sendline("/to alice")
    bob2.expect_exact("Now talking to alice")
    alice.sendline("still there, bob?")
    bob2.expect_exact("[alice]: still there, bob?")
    _who_until(alice, "Online now (3): alice, bob, carol")
    for child in (alice, bob2, carol):
        assert quit_client(child) == 0
    for node in (n1, n2, n3):
        assert node.proc.poll() is None  # nobody crashed


# =============================================================================
# Node failure: SIGKILL, and the client resumes on another node with its ticket
# =============================================================================
def test_killed_node_its_users_resume_elsewhere_with_their_ticket(cluster, tmp_path, mysql_database):
    n1, n2 = cluster.node(), cluster.node()
    alice = _client(n1, tmp_path / "alice", "alice")
    # bob's client knows both nodes of the service, his own first, and reconnects by itself.
    bob = C.ChatClient(
        servers=[(n2.host, n2.port), (n1.host, n1.port)], home=tmp_path / "bob", auto_reconnect=True
    )
    bob.connect()
    bob.register("bob", PASSWORD)
    bob.start()
    _who(alice, ("alice", "bob"))
    alice.open_conversation("bob")
    wait_for(alice, C.ConversationReady, peer="bob")
    wait_for(bob, C.ConversationReady, peer="alice")
    alice.send_message("bob", "before the crash")
    assert wait_for(bob, C.MessageReceived).text == "before the crash"
    logins_before = _audit(mysql_database, "login", "bob") + _audit(mysql_database, "register", "bob")

    n2.proc.send_signal(signal.SIGKILL)
    n2.proc.wait(timeout=10)
    back = wait_for(bob, C.Reconnected, timeout=30)  # to node 1, with the ticket
    assert back.server == f"{n1.host}:{n1.port}"
    # alice hears bob is back (node 1 now) and re-opens; the conversation goes on.
    wait_for(alice, C.ConversationReady, peer="bob", timeout=15)
    wait_for(bob, C.ConversationReady, peer="alice", timeout=15)
    bob.send_message("alice", "after the crash")
    assert wait_for(alice, C.MessageReceived).text == "after the crash"
    alice.send_message("bob", "and back")
    assert wait_for(bob, C.MessageReceived).text == "and back"
    # With the ticket: a resume row, and no new password login.
    assert _audit(mysql_database, "resume", "bob") == 1
    assert _audit(mysql_database, "login", "bob") + _audit(mysql_database, "register", "bob") == logins_before
    alice.close()
    bob.close()


# =============================================================================
# NATS trouble
# =============================================================================
def test_nats_stopped_and_restarted_mid_run(tmp_path, mysql_database):
    nats = OwnNats(tmp_path)
    cluster = Cluster(tmp_path / "cluster", mysql_database, nats.url)
    try:
        n1, n2 = cluster.node(), cluster.node()
        alice = _client(n1, tmp_path / "alice", "alice")
        carol = _client(n1, tmp_path / "carol", "carol")
        bob = _client(n2, tmp_path / "bob", "bob")
        _who(alice, ("alice", "bob", "carol"))
        for peer in ("bob", "carol"):
            alice.open_conversation(peer)
            wait_for(alice, C.ConversationReady, peer=peer)
        wait_for(bob, C.ConversationReady, peer="alice")
        wait_for(carol, C.ConversationReady, peer="alice")
        alice.send_message("bob", "m1")
        assert wait_for(bob, C.MessageReceived).text == "m1"

        nats.stop()
        lost = [n.wait_log("lost the cluster bus") for n in (n1, n2)]  # both nodes know the link is down
        # Same node: chat goes on.  Across nodes: a clear error at once, nothing queued for later.
        alice.send_message("carol", "same node while NATS is down")
        assert wait_for(carol, C.MessageReceived).text == "same node while NATS is down"
        with pytest.raises(MessageRefused, match="temporarily unreachable"):
            alice.send_confirmed("bob", "during the outage")

        nats.start()
        for node, since in zip((n1, n2), lost):  # each node's link is back (nats-py, or the watchdog)
            node.wait_log("is back", after=since)
        delivered = "after the outage"
        alice.send_confirmed("bob", delivered)
        assert wait_for(bob, C.MessageReceived, timeout=15).text == delivered  # the refused one never came
        # Nothing twice, nothing late: bob's next message is alice's next one.
        alice.send_message("bob", "m-last")
        assert wait_for(bob, C.MessageReceived).text == "m-last"
        bob.send_message("alice", "back both ways")
        assert wait_for(alice, C.MessageReceived).text == "back both ways"
        assert n1.proc.poll() is None and n2.proc.poll() is None
        for c in (alice, bob, carol):
            c.close()
    finally:
        cluster.stop()
        nats.stop()


def test_unreachable_nats_at_start_is_one_clear_line(tmp_path, mysql_database):
    from db_fixtures import mysql_url

    url = f"nats://127.0.0.1:{free_port()}"  # nobody listens there
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "server.py"),
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "d"),
            "--db",
            mysql_url(mysql_database),
            "--cluster",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if "Cannot start" in line]
    assert len(lines) == 1 and url in lines[0] and "cluster bus" in lines[0]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--cluster", "nats://127.0.0.1:4222"], "--cluster needs a database every node shares"),
        (["--workers", "2"], "--workers 2 needs --cluster"),
        (["--cluster", "http://x"], "--cluster takes a NATS URL"),
        (
            [
                "--cluster",
                "nats://127.0.0.1:4222",
                "--db",
                "mysql://root@127.0.0.1/x",
                "--cluster-prefix",
                "a b",
            ],
            "--cluster-prefix",
        ),
    ],
)
def test_cluster_configuration_mistakes_are_refused_plainly(tmp_path, args, needle):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "--port", "0", "--data-dir", str(tmp_path / "d"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode != 0
    assert needle in proc.stderr


# =============================================================================
# Worker processes on one port
# =============================================================================
def test_workers_share_the_port_and_their_users_chat(cluster, tmp_path, mysql_database):
    from cli_helpers import ServerProcess

    node = ServerProcess(
        tmp_path / "w",
        "--workers",
        "2",
        "--identity-key",
        str(cluster.identity),
        "--db",
        cluster.db_url,
        "--cluster",
        cluster.nats_url,
        "--cluster-prefix",
        cluster.prefix,
    )
    cluster.nodes.append(node)
    names = [f"user{i}" for i in range(10)]
    clients = [_client(node, tmp_path / n, n) for n in names]
    _who(clients[0], tuple(sorted(names)))
    conn = pymysql.connect(
        host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, password="", database=mysql_database
    )
    with conn.cursor() as cur:
        cur.execute("SELECT COUNT(DISTINCT node) FROM live_sessions")
        workers_used = cur.fetchone()[0]
    conn.close()
    assert workers_used == 2  # the kernel spread 10 connections over both (all on one: p = 2/1024)
    # Every pair chats, wherever each landed.
    first = clients[0]
    for other, name in zip(clients[1:], names[1:]):
        first.open_conversation(name)
        wait_for(first, C.ConversationReady, peer=name)
        wait_for(other, C.ConversationReady, peer=names[0])
        first.send_message(name, f"hello {name}")
        assert wait_for(other, C.MessageReceived).text == f"hello {name}"
        other.send_message(names[0], "hi")
        assert wait_for(first, C.MessageReceived).text == "hi"
    for c in clients:
        c.close()


# =============================================================================
# Store and forward across nodes (issue 12)
# =============================================================================
def test_a_stored_message_reaches_its_recipient_on_another_node(cluster, tmp_path):
    n1, n2 = cluster.node(), cluster.node()
    bob = _client(n2, tmp_path / "bob", "bob")
    assert bob.mailbox.published.wait(20)
    bob.close()
    alice = _client(n1, tmp_path / "alice", "alice")
    alice.send_offline("bob", "stored on node 1")
    assert wait_for(alice, C.MessageStored).online is False
    bob = _client(n2, tmp_path / "bob", "bob", register=False)  # logs in on the other node
    assert wait_for(bob, C.MessageReceived, timeout=20).text == "stored on node 1"
    assert wait_for(alice, C.MessageDelivered, timeout=20).text == "stored on node 1"
    _who(alice, ("alice", "bob"))
    alice.send_offline("bob", "while you are on node 2")  # online elsewhere: the nudge crosses NATS
    assert wait_for(alice, C.MessageStored).online is True
    assert wait_for(bob, C.MessageReceived, timeout=20).text == "while you are on node 2"
    alice.close()
    bob.close()


def test_a_room_spans_nodes_live_and_stored(cluster, tmp_path):
    """issue 13: members on different nodes; a change made on one node reaches the others'
    members, a message goes live over the bus, and the copy for a member away is stored."""
    from secureim.client import rooms as RC

    n1, n2 = cluster.node(), cluster.node()
    carol = _client(n2, tmp_path / "carol", "carol")
    assert carol.mailbox.published.wait(20)
    carol.close()
    alice = _client(n1, tmp_path / "alice", "alice")
    bob = _client(n2, tmp_path / "bob", "bob")
    assert alice.mailbox.published.wait(20) and bob.mailbox.published.wait(20)
    _who(alice, ("alice", "bob"))
    alice.rooms.create("#span")
    alice.rooms.invite("#span", "bob")
    alice.rooms.invite("#span", "carol")
    assert wait_for(bob, RC.RoomNotice, timeout=20).text == "alice added you to #span (members: alice, bob)."
    assert wait_for(bob, RC.RoomNotice, timeout=20).text == "alice added carol to #span."
    sent = alice.rooms.send("#span", "across the bus")
    assert (sent.online, sent.stored) == (1, 1)
    got = wait_for(bob, RC.RoomMessageReceived, timeout=20)
    assert (got.sender, got.text, got.stored_at) == ("alice", "across the bus", None)
    bob.rooms.send("#span", "back from node 2")
    assert wait_for(alice, RC.RoomMessageReceived, timeout=20).text == "back from node 2"
    carol = _client(
        n2, tmp_path / "carol", "carol", register=False
    )  # (its identity is filed per service address)
    texts = [wait_for(carol, RC.RoomMessageReceived, timeout=20).text for _ in range(2)]
    assert texts == ["across the bus", "back from node 2"]
    for client in (alice, bob, carol):
        client.close()
