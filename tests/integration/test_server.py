"""The real server on loopback with real clients: login, KDC, relay, presence, bad input."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from db_fixtures import mysql_url
from server_fixtures import (
    PASSWORD,
    RecordingSuite,
    chat_pair,
    logged_in_client,
    make_client,
    running_server,
    wait_for,
)

from secureim import client as C
from secureim import proto as P
from secureim.server import accounts as auth

IK = bytes(32)  # a placeholder identity key for protocol-level tests
from secureim.errors import (
    AccountLocked,
    ConnectionClosed,
    InvalidCredentials,
    InvalidPassword,
    InvalidUsername,
    UsernameTaken,
)


@pytest.fixture(params=["sqlite", "mysql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return None  # the default: SQLite in the data dir
    return mysql_url(request.getfixturevalue("mysql_database"))


@pytest.fixture(params=["3des", "aes256"])
def cipher(request):
    return request.param


def test_register_login_chat_both_ways(tmp_path, db_url, cipher):
    with running_server(tmp_path / "srv", db_url=db_url, cipher=cipher) as server:
        alice, bob = chat_pair(server, tmp_path)
        alice.send_message("bob", "hello bob")
        assert wait_for(bob, C.MessageReceived).text == "hello bob"
        bob.send_message("alice", "hi alice ✓")
        got = wait_for(alice, C.MessageReceived)
        assert (got.peer, got.text) == ("bob", "hi alice ✓")
        for i in range(20):
            alice.send_message("bob", f"m{i}")
        assert [wait_for(bob, C.MessageReceived).text for _ in range(20)] == [f"m{i}" for i in range(20)]
        # The database holds users, hashes and the conversation, never a key or a message.
        storage = server.storage
        assert storage.count_users() == 2
        stored_hash = storage.get_password_hash("alice")
        assert stored_hash.startswith("$2b$04$") and PASSWORD not in stored_hash
        cid = alice.conversations["bob"].id
        conv = storage.get_conversation(cid)
        assert conv.members == ("alice", "bob") and conv.key_generation == 1
        alice.close()
        bob.close()


def test_database_holds_no_key_or_message(tmp_path):
    with running_server(tmp_path / "srv") as server:
        recorder = server.service.suite = RecordingSuite(server.service.suite)
        alice, bob = chat_pair(server, tmp_path)
        alice.send_message("bob", "TOP-SECRET-PLAINTEXT")
        wait_for(bob, C.MessageReceived)
        alice.close()
        bob.close()
    raw = b"".join(p.read_bytes() for p in (tmp_path / "srv").glob("secureim.db*"))
    assert recorder.keys and raw
    assert b"TOP-SECRET-PLAINTEXT" not in raw and PASSWORD.encode() not in raw
    for key in recorder.keys:
        assert key not in raw and key[:24] not in raw and key[24:] not in raw


def test_wrong_password_and_unknown_user_get_the_same_answer(tmp_path):
    with running_server(tmp_path / "srv") as server:
        logged_in_client(server, tmp_path / "a", "alice").close()
        answers, bcrypt_checks = [], []
        for user, pw in (("alice", "wrong password"), ("nobody", "wrong password")):
            c = make_client(server, tmp_path / "x")
            before = auth.bcrypt_runs()
            with pytest.raises(InvalidCredentials) as info:
                c.login(user, pw)
            bcrypt_checks.append(auth.bcrypt_runs() - before)
            answers.append(str(info.value))
            c.close()
        # A name that is not even valid takes the same path (sent raw: the client would refuse it).
        c = make_client(server, tmp_path / "x")
        before = auth.bcrypt_runs()
        with pytest.raises(InvalidCredentials) as info:
            c.account.authenticate(
                P.Login(username="no such name!", password=b"wrong password", identity_key=bytes(32))
            )
        bcrypt_checks.append(auth.bcrypt_runs() - before)
        answers.append(str(info.value))
        c.close()
        assert answers[0] == answers[1] == answers[2]
        # Timing is not compared (at the tests' bcrypt cost of 1 ms it proves nothing): the
        # work is counted.  Every path runs exactly one bcrypt check, a dummy one for unknown
        # or invalid names, so response time does not tell whether an account exists.
        assert bcrypt_checks == [1, 1, 1]


def test_lockout_after_five_failures_for_that_source_only(tmp_path):
    with running_server(tmp_path / "srv") as server:
        logged_in_client(server, tmp_path / "a", "alice").close()
        c = make_client(server, tmp_path / "x")
        for _ in range(4):
            with pytest.raises(InvalidCredentials):
                c.login("alice", "wrong password")
        with pytest.raises(AccountLocked) as info:
            c.login("alice", "wrong password")
        assert 55 <= info.value.retry_after_s <= 60
        assert "locked" in str(info.value) and f"{info.value.retry_after_s} seconds" in str(info.value)
        c.close()
        # Even the right password is refused while locked, from this source...
        c = make_client(server, tmp_path / "x")
        with pytest.raises(AccountLocked):
            c.login("alice", PASSWORD)
        c.close()
        # ...but another source is not locked out (the victim can still log in).
        other = server.service.auth.login("alice", PASSWORD.encode(), "192.0.2.7")
        assert other == "alice"


def test_too_many_attempts_close_the_connection(tmp_path):
    with running_server(tmp_path / "srv", max_failures=100) as server:
        c = make_client(server, tmp_path / "x")
        for _ in range(5):
            with pytest.raises(InvalidCredentials):
                c.login("ghost", "wrong password")
        with pytest.raises(ConnectionClosed, match="Too many attempts"):
            c.login("ghost", "wrong password")
        c.close()


def test_registration_rules(tmp_path):
    with running_server(tmp_path / "srv") as server:
        logged_in_client(server, tmp_path / "a", "alice").close()
        c = make_client(server, tmp_path / "x")
        with pytest.raises(UsernameTaken):
            c.register("ALICE", PASSWORD)  # names are case-insensitive
        with pytest.raises(InvalidUsername, match="1 to 32"):
            c.register("bad name", PASSWORD)
        with pytest.raises(InvalidPassword, match="at least 8"):
            c.register("carol", "short")
        c.close()


def test_restart_persistence(tmp_path, db_url):
    with running_server(tmp_path / "srv", db_url=db_url) as server:
        fp = server.fingerprint
        logged_in_client(server, tmp_path / "a", "alice").close()
    with running_server(tmp_path / "srv", db_url=db_url) as server:
        assert server.fingerprint == fp  # identity key reused
        c = logged_in_client(server, tmp_path / "a2", "alice", register=False)
        assert c.username == "alice"
        c.close()


def test_offline_then_online_is_told_automatically(tmp_path):
    with running_server(tmp_path / "srv") as server:
        alice = logged_in_client(server, tmp_path / "a", "alice")
        logged_in_client(server, tmp_path / "b", "bob").close()
        alice.open_conversation("bob")
        wait_for(alice, C.PeerOffline, peer="bob")
        bob = logged_in_client(server, tmp_path / "b", "bob", register=False)
        wait_for(alice, C.PeerOnline, peer="bob")
        wait_for(alice, C.ConversationReady, peer="bob")
        wait_for(bob, C.ConversationReady, peer="alice")
        alice.send_message("bob", "you're back")
        assert wait_for(bob, C.MessageReceived).text == "you're back"
        alice.close()
        bob.close()


def test_unknown_destination_and_self(tmp_path):
    with running_server(tmp_path / "srv") as server:
        alice = logged_in_client(server, tmp_path / "a", "alice")
        alice.open_conversation("nobody")
        wait_for(alice, C.PeerUnknown, peer="nobody")
        alice.open_conversation("alice")
        assert "yourself" in wait_for(alice, C.ServerNotice).text
        alice.close()


def test_who_lists_online_users(tmp_path):
    with running_server(tmp_path / "srv") as server:
        alice = logged_in_client(server, tmp_path / "a", "alice")
        bob = logged_in_client(server, tmp_path / "b", "bob")
        alice.who()
        assert wait_for(alice, C.WhoList).users == ("alice", "bob")
        bob.close()
        alice.close()


def test_peer_leaving_is_reported(tmp_path):
    with running_server(tmp_path / "srv") as server:
        alice, bob = chat_pair(server, tmp_path)
        bob.close()
        wait_for(alice, C.PeerOffline, peer="bob")
        with pytest.raises(ConnectionClosed):
            alice.send_message("bob", "anyone?")
        alice.close()


def test_second_login_replaces_the_first(tmp_path):
    with running_server(tmp_path / "srv") as server:
        alice, bob = chat_pair(server, tmp_path)
        bob2 = logged_in_client(server, tmp_path / "bob", "bob", register=False)  # same device, same identity
        gone = wait_for(bob, C.Disconnected)
        assert "another place" in gone.reason
        # alice is told bob is (still) online and the conversation is re-keyed with the new session
        wait_for(bob2, C.ConversationReady, peer="alice")
        wait_for(alice, C.ConversationReady, peer="bob")
        alice.send_message("bob", "which bob?")
        assert wait_for(bob2, C.MessageReceived).text == "which bob?"
        for c in (alice, bob, bob2):
            c.close()


def test_rekey_after_n_messages_is_invisible(tmp_path):
    # A rekey takes 4 relays itself (2 shares, 2 ML-KEM replies); with min_rekey_interval_s=0 a
    # limit near 4 would let rekeys cascade, so 8: 4 for the exchange and 4 chat messages.
    with running_server(tmp_path / "srv", rekey_after_messages=8, min_rekey_interval_s=0) as server:
        alice, bob = chat_pair(server, tmp_path)
        for i in range(23):
            sender, receiver = (alice, bob) if i % 2 else (bob, alice)
            sender.send_message(receiver.username, f"n{i}")
            got = wait_for(receiver, C.MessageReceived)
            assert got.text == f"n{i}"
        conv = alice.conversations["bob"]
        assert conv.current >= 4
        bob.send_message("alice", "last")  # alice sees bob use a recent generation...
        assert wait_for(alice, C.MessageReceived).text == "last"
        assert min(conv._generations) >= 3  # ...so the first generations' keys are gone
        assert server.storage.get_conversation(conv.id).key_generation >= 4
        alice.close()
        bob.close()


def test_rekeys_are_never_faster_than_the_minimum_interval(tmp_path):
    with running_server(tmp_path / "srv", rekey_after_messages=2, min_rekey_interval_s=3600) as server:
        alice, bob = chat_pair(server, tmp_path)
        for i in range(10):
            alice.send_message("bob", f"m{i}")
            assert wait_for(bob, C.MessageReceived).text == f"m{i}"
        assert server.storage.get_conversation(alice.conversations["bob"].id).key_generation == 1
        alice.close()
        bob.close()


def test_relay_never_sees_plaintext(tmp_path, caplog):
    """The relay path gets only the inner ciphertext; the plaintext is nowhere in the server."""
    seen_payloads = []
    with running_server(tmp_path / "srv") as server:
        original = server.service.conversations.relay

        def spy(session, msg):
            seen_payloads.append(msg.payload)
            return original(session, msg)

        server.service.router.override(P.Relay, spy)
        caplog.set_level("DEBUG")
        alice, bob = chat_pair(server, tmp_path)
        secret = "the eagle lands at midnight"
        alice.send_message("bob", secret)
        assert wait_for(bob, C.MessageReceived).text == secret
        alice.close()
        bob.close()
        registry_dump = repr(server.service.registry.__dict__)
    assert seen_payloads and all(secret.encode() not in p for p in seen_payloads)
    assert secret not in caplog.text and secret not in registry_dump


# --- bad input: never crashes the server, never delays others ------------------------
def _raw(server) -> socket.socket:
    s = socket.create_connection(server.server_address, timeout=10)
    return s


def _assert_server_still_serves(server, tmp_path, name):
    c = logged_in_client(server, tmp_path / name, name)
    c.who()
    assert name in wait_for(c, C.WhoList).users
    c.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\xff\xff\xff",  # oversized frame header
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # wrong protocol
        P.encode_frame(b"\x01garbage"),  # malformed ClientHello
        P.encode_frame(
            P.Login(username="a", password=b"b", identity_key=IK).encode()
        ),  # login before handshake
        b"\x00\x00\x00\x05ab",  # truncated frame, then hang up
    ],
)
def test_garbage_never_crashes_the_server(tmp_path, garbage):
    with running_server(tmp_path / "srv") as server:
        s = _raw(server)
        s.sendall(garbage)
        s.shutdown(socket.SHUT_WR)
        data = s.recv(100)  # the server closes (after a HandshakeError at most)
        assert data == b"" or P.decode_message(data[4:]).__class__ is P.HandshakeError
        s.close()
        _assert_server_still_serves(server, tmp_path, "alice")


def test_silent_client_is_closed_at_the_login_deadline(tmp_path):
    with running_server(tmp_path / "srv", login_grace_s=1.0) as server:
        s = _raw(server)
        t0 = time.monotonic()
        assert s.recv(100) == b""  # closed by the server, not by us
        assert 0.9 <= time.monotonic() - t0 < 8
        s.close()


def test_handshaken_but_never_logged_in_is_closed_at_the_deadline(tmp_path):
    with running_server(tmp_path / "srv", login_grace_s=1.0) as server:
        c = make_client(server, tmp_path / "x")
        with pytest.raises(ConnectionClosed):
            c.connection.recv_events()
        c.close()


def test_silent_and_broken_clients_do_not_delay_others(tmp_path):
    with running_server(tmp_path / "srv") as server:
        hangers = [_raw(server) for _ in range(10)]  # connected, saying nothing
        half = _raw(server)
        half.sendall(P.ClientProtocol().initiate()[:10])  # half a hello
        t0 = time.monotonic()
        _assert_server_still_serves(server, tmp_path, "alice")
        assert time.monotonic() - t0 < 5
        for s in hangers + [half]:
            s.close()


def test_disconnect_mid_handshake_and_mid_chat(tmp_path):
    with running_server(tmp_path / "srv") as server:
        s = _raw(server)
        s.sendall(P.ClientProtocol().initiate())
        s.recv(10)
        s.close()  # gone before ClientFinished
        alice, bob = chat_pair(server, tmp_path)
        bob.sock.shutdown(socket.SHUT_RDWR)  # vanishes without Goodbye
        wait_for(alice, C.PeerOffline, peer="bob")
        _assert_server_still_serves(server, tmp_path, "carol")
        alice.close()


def test_client_that_stops_reading_is_dropped_not_waited_for(tmp_path):
    with running_server(tmp_path / "srv", outbox_limit_bytes=64 * 1024) as server:
        alice = logged_in_client(server, tmp_path / "a", "alice")
        bob = make_client(server, tmp_path / "b")
        bob.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        bob.register("bob", PASSWORD)
        bob.start()
        carol = logged_in_client(server, tmp_path / "c", "carol")
        alice.open_conversation("bob")
        wait_for(alice, C.ConversationReady, peer="bob")
        wait_for(bob, C.ConversationReady, peer="alice")
        bob.connection.send_lock.acquire()  # bob's receiver stalls: from now on nobody reads his socket
        big = "x" * 8000
        t0 = time.monotonic()
        dropped = None
        for _ in range(3000):  # bounded: 24 MB at most
            try:
                alice.send_message("bob", big)
            except ConnectionClosed:
                pass
            event = alice.next_event(timeout=0)
            if isinstance(event, C.PeerOffline):
                dropped = event
                break
        assert dropped is not None and dropped.peer == "bob"
        # alice was never blocked by bob, and carol is served meanwhile.
        assert time.monotonic() - t0 < 60
        carol.who()
        assert wait_for(carol, C.WhoList).users == ("alice", "carol")
        for c in (alice, carol):
            c.close()
        bob.sock.shutdown(socket.SHUT_RDWR)


def test_database_down_gives_try_again_later(tmp_path):
    with running_server(tmp_path / "srv") as server:
        logged_in_client(server, tmp_path / "a", "alice").close()
        server.storage.close()  # the database goes away under the running server
        c = make_client(server, tmp_path / "x")
        from secureim.errors import ServiceUnavailable

        with pytest.raises(ServiceUnavailable, match="try again later"):
            c.login("alice", PASSWORD)
        c.close()
        # the server itself keeps running and accepting connections
        c2 = make_client(server, tmp_path / "y")
        c2.close()


def test_many_clients_in_parallel(tmp_path):
    with running_server(tmp_path / "srv") as server:
        errors = []

        def one(i):
            try:
                c = logged_in_client(server, tmp_path / f"u{i}", f"user{i}")
                c.close()
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors
        assert server.storage.count_users() == 20


# --- resumption tickets --------------------------------------------------------------
def test_resume_after_a_server_restart_without_password_or_bcrypt(tmp_path):
    with running_server(tmp_path / "srv") as server:
        alice = logged_in_client(server, tmp_path / "a", "alice")
        bob = logged_in_client(server, tmp_path / "b", "bob")
        alice.open_conversation("bob")
        wait_for(bob, C.ConversationReady, peer="alice")
        wait_for(alice, C.ConversationReady, peer="bob")
        port = server.server_address[1]
    wait_for(alice, C.Disconnected)  # the restart, as the user sees it
    wait_for(bob, C.Disconnected)
    with running_server(tmp_path / "srv", port=port) as server:  # same data dir: same ticket key
        checks = []
        original = server.service.auth._check
        server.service.auth._check = lambda *a: checks.append(1) or original(*a)
        assert alice.resume() and bob.resume()
        assert checks == []  # no bcrypt for either
        wait_for(alice, C.ConversationReady, peer="bob")
        wait_for(bob, C.ConversationReady, peer="alice")
        alice.send_message("bob", "back again")
        assert wait_for(bob, C.MessageReceived).text == "back again"
        alice.close()
        bob.close()


def test_tickets_are_bound_forged_and_expired_ones_refused(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    import crypto_utils as cu
    from secureim.server import tickets as tickets

    key = tickets.load_or_create_ticket_key(tmp_path)
    assert (tmp_path / "ticket.key").stat().st_mode & 0o777 == 0o600
    now = [1_000_000.0]
    issuer = tickets.TicketIssuer(key, clock=lambda: now[0])
    ik = cu.public_bytes(Ed25519PrivateKey.generate())
    t = issuer.issue("alice", ik)
    assert issuer.redeem(t, ik) == "alice"
    with pytest.raises(InvalidCredentials):
        issuer.redeem(t, bytes(32))  # another identity key
    with pytest.raises(InvalidCredentials):
        issuer.redeem(t[:-1] + bytes([t[-1] ^ 1]), ik)  # tampered
    with pytest.raises(InvalidCredentials):
        tickets.TicketIssuer(cu.random_bytes(32)).redeem(t, ik)  # another server's key
    now[0] += tickets.TICKET_LIFETIME_S + 1
    with pytest.raises(InvalidCredentials, match="expired"):
        issuer.redeem(t, ik)
    assert b"alice" not in t  # the username is sealed too


def test_resume_with_a_bad_ticket_is_refused(tmp_path):
    with running_server(tmp_path / "srv") as server:
        c = make_client(server, tmp_path / "x")
        with pytest.raises(InvalidCredentials, match="ticket"):
            c.account.authenticate(P.Resume(ticket=b"\0" * 60, identity_key=bytes(32)))
        c.close()


def test_sending_after_the_server_closed_the_session_raises_connection_closed(tmp_path):
    with running_server(tmp_path / "srv") as server:
        alice, bob = chat_pair(server, tmp_path)
        server.service.registry.session_of("alice").close("closed for the test")
        wait_for(alice, C.Disconnected)
        with pytest.raises(ConnectionClosed, match="closed for the test"):
            alice.send_message("bob", "too late")
        alice.close()
        bob.close()


def test_finite_field_exponentiations_run_outside_the_server_process(tmp_path):
    """pow() on 2048-bit numbers holds the GIL for milliseconds: the event loop must not wait for it."""
    with running_server(tmp_path / "srv") as server:
        client = logged_in_client(server, tmp_path / "a", "alice", group="ffdhe2048")
        # the client's share checked (2047-bit exponent), the server's share, the shared secret
        assert server.modexp.submitted >= 3
        client.who()
        assert wait_for(client, C.WhoList).users == ("alice",)
        client.close()


def test_a_peer_who_logs_in_while_the_server_looks_them_up_is_not_reported_offline(tmp_path):
    """The open's database read and the peer's login race: the watch and the re-check are one step."""
    with running_server(tmp_path / "srv") as server:
        logged_in_client(server, tmp_path / "b", "bob").close()  # bob exists, and is offline
        alice = logged_in_client(server, tmp_path / "a", "alice")
        original, started, clients = server.storage.get_password_hash, threading.Event(), []

        def lookup_while_bob_logs_in(name):
            if name == "bob" and not started.is_set():
                started.set()
                clients.append(logged_in_client(server, tmp_path / "b", "bob", register=False))
            return original(name)

        server.storage.get_password_hash = lookup_while_bob_logs_in
        alice.open_conversation("bob")
        events = []
        while True:
            event = alice.next_event(timeout=10)
            assert event is not None, f"no ConversationReady; saw {events}"
            events.append(event)
            if isinstance(event, C.ConversationReady):
                break
        assert not any(isinstance(e, C.PeerOffline) for e in events)
        wait_for(clients[0], C.ConversationReady, peer="alice")
        alice.close()
        clients[0].close()


def test_logins_waiting_for_bcrypt_do_not_hold_up_other_work(tmp_path):
    """Password checks have threads of their own: opens, resumes and the KDC never queue behind them."""
    with running_server(tmp_path / "srv") as server:
        alice = logged_in_client(server, tmp_path / "a", "alice")
        bob = logged_in_client(server, tmp_path / "b", "bob")
        release, entered = threading.Event(), threading.Semaphore(0)
        original = server.service.auth.login

        def slow_login(username, *args, **kwargs):
            if username.startswith("slow"):
                entered.release()
                release.wait(timeout=30)  # bounded: the test releases it below
            return original(username, *args, **kwargs)

        server.service.auth.login = slow_login
        blocked = server.config.worker_threads + 1
        stuck = [make_client(server, tmp_path / f"s{i}") for i in range(blocked)]  # handshakes done first
        for i, c in enumerate(stuck):  # more stuck logins than there are worker threads
            threading.Thread(target=lambda c=c, i=i: _try_login(c, f"slow{i}"), daemon=True).start()
        for _ in range(server.config.worker_threads):
            assert entered.acquire(timeout=10)
        try:
            alice.open_conversation("bob")
            wait_for(alice, C.ConversationReady, peer="bob", timeout=10)
            wait_for(bob, C.ConversationReady, peer="alice", timeout=10)
        finally:
            release.set()
        for c in (alice, bob, *stuck):
            c.close()


def _try_login(client, name):
    try:
        client.login(name, PASSWORD)
    except Exception:  # noqa: BLE001 - unknown users: only the wait matters here
        pass
