"""Several servers of one service (issue 11 item 5, the client half): failover and auto-reconnect.

Two in-process ``Server`` nodes share one data dir (the same identity key and
ticket key) and one SQLite database, as the nodes of a cluster share theirs.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import ExitStack

import pytest
from server_fixtures import PASSWORD, chat_pair, running_server, wait_for

from secureim import client as C
from secureim.errors import ConfigError, ConnectionClosed, MessageRefused, ServerKeyMismatch
from secureim.server import accounts as auth


def _events_until(client, kind, timeout=15.0, **fields):
    """Every event up to and including the first ``kind`` with ``fields``."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        event = client.next_event(timeout=max(0.0, deadline - time.monotonic()))
        if event is None:
            raise AssertionError(f"no {kind.__name__} {fields} within {timeout}s; saw {seen}")
        seen.append(event)
        if isinstance(event, kind) and all(getattr(event, k) == v for k, v in fields.items()):
            return seen


def _client(servers, home, name, *, register=True, **kw):
    client = C.ChatClient(servers=servers, home=home, **kw)
    client.connect()
    (client.register if register else client.login)(name, PASSWORD)
    client.start()
    return client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the server list -----------------------------------------------------------------
def test_parse_servers_bounds_and_validates():
    assert C.parse_servers("a,b:6000,[::1]:7000,[::1],10.0.0.1", 5151) == [
        ("a", 5151),
        ("b", 6000),
        ("::1", 7000),
        ("::1", 5151),
        ("10.0.0.1", 5151),
    ]
    assert C.parse_servers("fe80::1", 5151) == [("fe80::1", 5151)]
    for bad, why in (
        ("a,,b", "empty entry"),
        ("a,", "empty entry"),
        ("a:0", "bad port"),
        ("a:99999", "bad port"),
        ("a:http", "bad port"),
        ("a b", "not a host"),
        ("[::1", "IPv6"),
        ("a,a", "listed twice"),
        ("a:1,a:1", "listed twice"),
        (",".join(f"h{i}" for i in range(17)), "at most 16"),
    ):
        with pytest.raises(ConfigError, match=why):
            C.parse_servers(bad, 5151)
    assert len(C.parse_servers(",".join(f"h{i}" for i in range(16)), 1)) == 16
    with pytest.raises(ConfigError):
        C.ChatClient(servers=[])
    with pytest.raises(ConfigError):
        C.ChatClient("a", 1, servers=[("b", 2)])


def test_the_service_id_is_the_first_entry_whichever_node_is_used(tmp_path):
    client = C.ChatClient(servers=[("a", 1), ("b", 2)], home=tmp_path)
    assert client.server_id == "a:1" and client.node_id == "a:1"
    assert C.ChatClient("h", 9, home=tmp_path).server_id == "h:9"  # the old signature still works


def test_connect_skips_a_dead_server_and_pins_the_service(tmp_path):
    dead = ("127.0.0.1", _free_port())
    with running_server(tmp_path / "srv") as server:
        client = C.ChatClient(servers=[dead, server.server_address], home=tmp_path / "a")
        started = time.monotonic()
        client.connect()
        assert time.monotonic() - started < 10  # a loaded machine's handshake, not a dead node's timeout
        assert client.node_id == "{}:{}".format(*server.server_address)
        lines = (tmp_path / "a" / "known_servers").read_text().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{dead[0]}:{dead[1]} ")  # under the service id
        client.close()
    with pytest.raises(ConnectionClosed, match="No server could be reached"):
        C.ChatClient(servers=[dead, ("127.0.0.1", _free_port())], home=tmp_path / "b").connect()


def test_a_node_with_another_key_is_a_mismatch_not_a_failover(tmp_path):
    with running_server(tmp_path / "other") as other, ExitStack() as stack:
        one = stack.enter_context(running_server(tmp_path / "one"))
        servers = [one.server_address, other.server_address]
        first = C.ChatClient(servers=servers, home=tmp_path / "a")
        first.connect()  # pins the service's key, as node 1 presents it
        first.close()
        stack.close()  # node 1 goes down; the next entry presents another key
        with pytest.raises(ServerKeyMismatch, match="knows the service"):
            C.ChatClient(servers=servers, home=tmp_path / "a").connect()


# --- failover with the session ticket ------------------------------------------------
def test_both_clients_fail_over_to_node_2_without_the_password(tmp_path):
    data = tmp_path / "srv"  # one identity key, one ticket key, one SQLite database for both nodes
    with running_server(data) as node2, ExitStack() as stack:
        node1 = stack.enter_context(running_server(data))
        servers = [node1.server_address, node2.server_address]
        alice = _client(servers, tmp_path / "alice", "alice", auto_reconnect=True)
        bob = _client(servers, tmp_path / "bob", "bob", auto_reconnect=True)
        assert alice.node_id == bob.node_id == "{}:{}".format(*node1.server_address)
        alice.open_conversation("bob")
        wait_for(alice, C.ConversationReady, peer="bob")
        wait_for(bob, C.ConversationReady, peer="alice")
        alice.send_message("bob", "on node 1")
        assert wait_for(bob, C.MessageReceived).text == "on node 1"
        bcrypt_before = auth.bcrypt_runs()
        stack.close()  # node 1 shuts down
        for client in (alice, bob):
            seen = _events_until(client, C.Reconnected)
            assert isinstance(seen[0], C.Reconnecting) or any(isinstance(e, C.Reconnecting) for e in seen)
            assert not any(isinstance(e, C.Disconnected) for e in seen)
            assert client.node_id == "{}:{}".format(*node2.server_address)
        for client, peer in ((alice, "bob"), (bob, "alice")):
            seen = _events_until(client, C.ConversationReady, peer=peer)
            assert not any(isinstance(e, C.SecurityWarning) for e in seen)  # no key change for the peer
        assert auth.bcrypt_runs() == bcrypt_before  # resumed with tickets: no password, no bcrypt
        alice.send_confirmed("bob", "on node 2")
        assert wait_for(bob, C.MessageReceived).text == "on node 2"
        bob.send_confirmed("alice", "both ways")
        assert wait_for(alice, C.MessageReceived).text == "both ways"
        assert len((tmp_path / "alice" / "known_servers").read_text().splitlines()) == 1
        alice.close()
        bob.close()


def test_auto_reconnect_gives_up_within_its_bound(tmp_path):
    with running_server(tmp_path / "srv") as server:
        alice = _client(
            [server.server_address],
            tmp_path / "a",
            "alice",
            auto_reconnect=True,
            reconnect_attempts=3,
            reconnect_max_s=10,
        )
    seen = _events_until(alice, C.Disconnected, timeout=30)
    attempts = [e.attempt for e in seen if isinstance(e, C.Reconnecting)]
    assert attempts and attempts == list(range(1, len(attempts) + 1)) and len(attempts) <= 3
    assert "Gave up reconnecting" in seen[-1].reason
    alice.close()


def test_a_kick_from_a_node_that_is_up_is_not_undone_by_reconnecting(tmp_path):
    with running_server(tmp_path / "srv") as server:
        alice = _client([server.server_address], tmp_path / "a", "alice", auto_reconnect=True)
        server.service.registry.session_of("alice").close("kicked for the test")
        seen = _events_until(alice, C.Disconnected)
        assert "kicked for the test" in seen[-1].reason
        assert not any(isinstance(e, C.Reconnecting) for e in seen)
        assert alice.resume()  # coming back by hand still works: a kick is not a ban
        alice.close()


def test_a_kick_that_follows_a_message_the_client_answers_is_still_a_kick(tmp_path):
    """The CI race: the kick arrives in the same read as a message the client answers (here a
    prekey top-up).  The answer fails on the closed session, and that failure must not be taken
    for a lost connection, which would be failed over and undo the kick."""
    from secureim import proto as P

    with running_server(tmp_path / "srv") as server:
        alice = _client([server.server_address], tmp_path / "a", "alice", auto_reconnect=True)
        assert alice.mailbox.published.wait(10)
        session = server.service.registry.session_of("alice")
        done = threading.Event()

        def top_up_then_kick():  # one loop callback: both frames leave in one write
            session.send(P.PrekeyStatus(one_time_left=0, signed_prekey_id=0, signed_prekey_age_s=0))
            session.send(P.Error(code=P.ErrorCode.BAD_REQUEST, reason="a notice after it"))
            session.close("kicked for the test")
            done.set()

        server.loop.call_soon_threadsafe(top_up_then_kick)
        assert done.wait(5)
        seen = _events_until(alice, C.Disconnected)
        assert seen[-1].reason == "the server closed the session: kicked for the test"
        assert not any(isinstance(e, C.Reconnecting) for e in seen)
        # What came before the kick in that read is still shown, after the failed answer.
        assert any(isinstance(e, C.ServerNotice) and e.text == "a notice after it" for e in seen)
        alice.close()


def test_resume_on_a_connection_that_is_still_open_is_safe(tmp_path):
    """The old receiver thread is woken and stays silent: it neither reads the new socket
    nor reports the old connection as lost."""
    with running_server(tmp_path / "srv") as server:
        alice, bob = chat_pair(server, tmp_path)
        old_receiver = alice.session.receiver
        assert alice.resume()
        old_receiver.join(timeout=5)
        assert not old_receiver.is_alive()
        seen = _events_until(alice, C.ConversationReady, peer="bob")
        assert not any(isinstance(e, C.Disconnected) for e in seen)
        alice.send_confirmed("bob", "after resume")
        assert wait_for(bob, C.MessageReceived).text == "after resume"
        bob.send_confirmed("alice", "and back")
        assert wait_for(alice, C.MessageReceived).text == "and back"
        alice.close()
        bob.close()


def test_send_confirmed_reports_the_servers_refusal(tmp_path):
    with running_server(tmp_path / "srv") as server:
        alice, bob = chat_pair(server, tmp_path)
        # bob's session goes without a notice reaching alice yet: the relay itself is refused
        with server.service.registry.lock:
            server.service.registry.online.pop("bob")
        with pytest.raises(MessageRefused, match="offline"):
            alice.send_confirmed("bob", "lost?")
        alice.close()
        bob.close()
