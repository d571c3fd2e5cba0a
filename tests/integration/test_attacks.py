"""The standing attack suite: each case names an attack and asserts the specific defence.

docs/SECURITY.md lists every case with its defence.  All traffic stays on loopback;
every loop is bounded in count and time.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mitm import MitmProxy, flip
from server_fixtures import PASSWORD, logged_in_client, make_client, running_server, wait_for

import crypto_utils as cu
from diffiehellman import DEFAULT_GROUP, GROUPS, DiffieHellman
from secureim import client as C
from secureim import proto as P
from secureim.errors import (
    ConnectionClosed,
    HandshakeFailed,
    InvalidCredentials,
    InvalidPassword,
    InvalidUsername,
    ProtocolError,
    ServerKeyMismatch,
)
from secureim.proto import puzzle as puzzle
from secureim.server.puzzle_gate import PuzzleGate


def rewrite(frame: bytes, **changes) -> bytes:
    msg = P.decode_message(frame[4:])
    return P.encode_frame(dataclasses.replace(msg, **changes).encode())


def _read_messages(s: socket.socket) -> list:
    """Every plaintext message the server sends until it closes (the socket is closed after)."""
    decoder = P.FrameDecoder()
    out = []
    while chunk := s.recv(65536):
        decoder.feed(chunk)
        while (body := decoder.next_frame()) is not None:
            out.append(P.decode_message(body))
    s.close()
    return out


def via_proxy(server, tmp_path, tamper, name="victim", **client_options):
    proxy = MitmProxy(server.server_address, tamper)
    host, port = proxy.address
    client = C.ChatClient(host, port, home=tmp_path / name, **client_options)
    return proxy, client


def _on(direction_wanted, index_wanted, fn):
    def tamper(direction, index, frame):
        if direction == direction_wanted and index == index_wanted:
            return fn(frame)
        return [frame]

    return tamper


# =============================================================================
# Handshake tampering (attacker in the middle)
# =============================================================================
HANDSHAKE_ATTACKS = {
    "A01 flip a bit in ClientHello's nonce": (
        "c2s",
        0,
        lambda f: [
            rewrite(
                f, nonce=bytes([P.decode_message(f[4:]).nonce[0] ^ 1]) + P.decode_message(f[4:]).nonce[1:]
            )
        ],
        HandshakeFailed,
        "signature",
    ),
    "A02 flip a bit in ServerHello's nonce": (
        "s2c",
        0,
        lambda f: [
            rewrite(
                f, nonce=bytes([P.decode_message(f[4:]).nonce[0] ^ 1]) + P.decode_message(f[4:]).nonce[1:]
            )
        ],
        HandshakeFailed,
        "signature",
    ),
    "A03 flip a bit in the server's signature": (
        "s2c",
        1,
        lambda f: [
            rewrite(
                f,
                signature=bytes([P.decode_message(f[4:]).signature[0] ^ 1])
                + P.decode_message(f[4:]).signature[1:],
            )
        ],
        HandshakeFailed,
        "signature",
    ),
    "A04 flip a bit in the server's key confirmation": (
        "s2c",
        1,
        lambda f: [
            rewrite(
                f,
                confirm=bytes([P.decode_message(f[4:]).confirm[0] ^ 1]) + P.decode_message(f[4:]).confirm[1:],
            )
        ],
        HandshakeFailed,
        "confirmation",
    ),
    "A05 substitute the client's DH value": (
        "c2s",
        0,
        lambda f: [rewrite(f, public=DiffieHellman(DEFAULT_GROUP).public_bytes)],
        HandshakeFailed,
        "signature",
    ),
    "A06 substitute the server's DH value": (
        "s2c",
        0,
        lambda f: [rewrite(f, public=DiffieHellman.respond(DEFAULT_GROUP, DiffieHellman().public_bytes)[0])],
        HandshakeFailed,
        "signature",
    ),
    "A07 downgrade the group to modp1024": (
        "c2s",
        0,
        lambda f: [rewrite(f, group="modp1024", groups=("modp1024",))],
        HandshakeFailed,
        "unsupported group",
    ),
    "A08 swap the server's identity key": (
        "s2c",
        0,
        lambda f: [rewrite(f, server_key=cu.public_bytes(Ed25519PrivateKey.generate()))],
        HandshakeFailed,
        "signature",
    ),
    "A09 drop the ServerAuth": ("s2c", 1, lambda f: [], ConnectionClosed, "did not answer|closed"),
    "A10 truncate the ServerHello": (
        "s2c",
        0,
        lambda f: [P.encode_frame(f[4:-3])],
        ProtocolError,
        "truncated",
    ),
}


CLIENT_REPLY_TIMEOUT_S = 2.0


@pytest.mark.parametrize("name", list(HANDSHAKE_ATTACKS))
def test_handshake_tampering_is_detected(tmp_path, name):
    direction, index, fn, error, reason = HANDSHAKE_ATTACKS[name]
    # The server's login grace is far longer than the client's reply deadline: a client
    # waiting for a reply (A09) is stopped by its own deadline, not by the server closing.
    with running_server(tmp_path / "srv", login_grace_s=600) as server:
        proxy, client = via_proxy(
            server, tmp_path, _on(direction, index, fn), reply_timeout_s=CLIENT_REPLY_TIMEOUT_S
        )
        t0 = time.monotonic()
        with pytest.raises(error, match=reason):
            client.connect()
            client.register("victim", PASSWORD)
        assert time.monotonic() - t0 < CLIENT_REPLY_TIMEOUT_S + 5
        assert client.username is None  # never logged in, never shown anything
        proxy.close()
        logged_in_client(server, tmp_path / "ok", "bystander").close()  # the server is unharmed


def test_A09_client_gives_up_on_a_server_that_accepts_and_never_answers(tmp_path):
    """A listener that accepts and then neither answers nor closes: only the client's own
    reply deadline can end the wait.  connect() runs in a thread so that a client without
    a deadline fails this test quickly instead of hanging it."""
    listener = socket.create_server(("127.0.0.1", 0))
    held = []
    accepted = threading.Event()

    def accept_and_hold():
        conn, _ = listener.accept()
        held.append(conn)  # read nothing, send nothing, close nothing
        accepted.set()

    threading.Thread(target=accept_and_hold, daemon=True).start()
    host, port = listener.getsockname()[:2]
    client = C.ChatClient(host, port, home=tmp_path / "c", reply_timeout_s=1.0)
    outcome = []

    def connect():
        t0 = time.monotonic()
        try:
            client.connect()
            outcome.append(("connected", time.monotonic() - t0))
        except ConnectionClosed as exc:
            outcome.append((str(exc), time.monotonic() - t0))

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    try:
        assert accepted.wait(10)
        worker.join(timeout=10)
        assert not worker.is_alive(), "the client kept waiting for a server that never answers"
        ((message, elapsed),) = outcome
        assert "did not answer in time" in message and 0.9 <= elapsed < 5
    finally:
        for conn in held:
            conn.close()  # lets a hung client thread end
        listener.close()
        worker.join(timeout=10)


def test_A11_flip_a_bit_in_client_finished_is_refused_by_the_server(tmp_path):
    with running_server(tmp_path / "srv") as server:
        proxy, client = via_proxy(server, tmp_path, _on("c2s", 1, lambda f: [flip(f)]))
        client.connect()
        with pytest.raises(ConnectionClosed):
            client.register("victim", PASSWORD)
        assert server.storage.get_password_hash("victim") is None
        proxy.close()


def test_A12_downgrade_the_suite_in_server_hello(tmp_path):
    with running_server(tmp_path / "srv", cipher="aes256") as server:
        proxy, client = via_proxy(server, tmp_path, _on("s2c", 0, lambda f: [rewrite(f, suite=1)]))
        with pytest.raises(HandshakeFailed, match="signature"):
            client.connect()
        proxy.close()


def test_A13_impostor_server_with_its_own_identity_is_refused_once_pinned(tmp_path):
    home = tmp_path / "alice"
    with running_server(tmp_path / "real") as real:
        host, port = real.server_address
        c = C.ChatClient(host, port, home=home)
        c.connect()  # pins the real key on first contact
        c.close()
        fp = real.fingerprint
    with running_server(tmp_path / "impostor") as impostor:
        ihost, iport = impostor.server_address
        known = home / "known_servers"  # the impostor answers at the address the client knows
        known.write_text(known.read_text().replace(f"{host}:{port}", f"{ihost}:{iport}"))
        c = C.ChatClient(ihost, iport, home=home)
        with pytest.raises(ServerKeyMismatch) as info:
            c.connect()
        assert fp in str(info.value) and impostor.fingerprint in str(info.value)


def test_A14_replay_a_whole_recorded_session_later(tmp_path):
    with running_server(tmp_path / "srv") as server:
        proxy, client = via_proxy(server, tmp_path, lambda d, i, f: [f])
        client.connect()
        client.register("alice", PASSWORD)
        client.close()
        recorded = proxy.frames("c2s")
        proxy.close()
        assert len(recorded) >= 3
        s = socket.create_connection(server.server_address, timeout=10)
        for frame in recorded:
            try:
                s.sendall(frame)
            except OSError:
                break
        replies = _read_messages(s)
        # Only a new ServerHello and ServerAuth come back: the replayed ClientFinished fails.
        assert [type(m) for m in replies] == [P.ServerHello, P.ServerAuth]
        watcher = logged_in_client(server, tmp_path / "w", "watcher")
        watcher.who()
        assert wait_for(watcher, C.WhoList).users == ("watcher",)
        watcher.close()


# =============================================================================
# Record tampering after login (both directions)
# =============================================================================
class ArmedAttack:
    """Tampers with frames in one direction, once armed, by kind."""

    def __init__(self, direction: str, kind: str) -> None:
        self.direction, self.kind = direction, kind
        self.armed = threading.Event()
        self.seen = 0
        self.held: bytes | None = None

    def __call__(self, direction, index, frame):
        if direction != self.direction or not self.armed.is_set():
            return [frame]
        self.seen += 1
        k, n = self.kind, self.seen
        if k == "flip" and n == 1:
            return [flip(frame, 12)]
        if k == "truncate" and n == 1:
            return [P.encode_frame(frame[4:-1])]
        if k == "drop" and n == 1:
            return []
        if k == "duplicate" and n == 1:
            return [frame, frame]
        if k == "reorder":
            if n == 1:
                self.held = frame
                return []
            if n == 2:
                return [frame, self.held]
        if k == "inject" and n == 1:
            return [P.encode_frame(os.urandom(80)), frame]
        if k == "oversize" and n == 1:
            return [b"\x7f\xff\xff\xff"]
        return [frame]


RECORD_ATTACKS = ["flip", "truncate", "drop", "duplicate", "reorder", "inject"]


@pytest.mark.parametrize("kind", RECORD_ATTACKS)
@pytest.mark.parametrize("direction", ["c2s", "s2c"])
def test_record_tampering_is_detected_and_nothing_wrong_is_shown(tmp_path, kind, direction):
    """A15-A26: every manipulation ends the session with a stated reason; no wrong message appears."""
    attack = ArmedAttack(direction, kind)
    with running_server(tmp_path / "srv") as server:
        proxy, alice = via_proxy(server, tmp_path, attack, name="alice")
        alice.connect()
        alice.register("alice", PASSWORD)
        alice.start()
        bob = logged_in_client(server, tmp_path / "bob", "bob")
        alice.open_conversation("bob")
        wait_for(alice, C.ConversationReady, peer="bob")
        wait_for(bob, C.ConversationReady, peer="alice")
        attack.armed.set()
        sender, receiver = (alice, bob) if direction == "c2s" else (bob, alice)
        sent = [f"message {i}" for i in range(3)]
        for text in sent:
            try:
                sender.send_message(receiver.username, text)
            except (ConnectionClosed, OSError):
                break
        ended = wait_for(alice, C.Disconnected, timeout=15)
        assert "integrity" in ended.reason or "too large" in ended.reason
        shown = []
        while (event := receiver.next_event(timeout=0.5)) is not None:
            if isinstance(event, C.MessageReceived):
                shown.append(event.text)
        assert all(text in sent for text in shown) and len(shown) == len(set(shown))
        proxy.close()
        bob.close()
        logged_in_client(server, tmp_path / "c", "carol").close()  # the server is unharmed


def test_A27_oversized_frame_from_a_client_closes_only_that_client(tmp_path):
    attack = ArmedAttack("c2s", "oversize")
    with running_server(tmp_path / "srv") as server:
        # The server sends alice its farewell before it forgets her session: wait for that
        # (an event, not a sleep) so bob's who list below cannot race it.
        alice_gone = threading.Event()
        forget = server.service.disconnected

        def disconnected(session):
            forget(session)
            if session.username == "alice":
                alice_gone.set()

        server.service.disconnected = disconnected
        proxy, alice = via_proxy(server, tmp_path, attack, name="alice")
        alice.connect()
        alice.register("alice", PASSWORD)
        alice.start()
        bob = logged_in_client(server, tmp_path / "bob", "bob")
        attack.armed.set()
        alice.who()
        wait_for(alice, C.Disconnected, timeout=15)
        assert alice_gone.wait(15)
        bob.who()
        assert wait_for(bob, C.WhoList).users == ("bob",)
        proxy.close()
        bob.close()


# =============================================================================
# Hostile input straight to the server
# =============================================================================
def _hello(**changes) -> bytes:
    client = P.ClientProtocol()
    if "group" in changes:  # a hello for another group offers that group alone
        changes.setdefault("groups", (changes["group"],))
    return rewrite(client.initiate(), **changes)


def _raw_exchange(server, data: bytes) -> list:
    s = socket.create_connection(server.server_address, timeout=10)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)  # nothing more from us: the server answers, then closes
    return _read_messages(s)


@pytest.mark.parametrize("label", ["zero", "one", "p-1", "p"])
def test_A28_bad_dh_public_values_on_the_wire(tmp_path, label):
    group = GROUPS["ffdhe2048"]
    y = {"zero": 0, "one": 1, "p-1": group.p - 1, "p": group.p}[label]
    with running_server(tmp_path / "srv") as server:
        replies = _raw_exchange(server, _hello(group="ffdhe2048", public=y.to_bytes(256, "big")))
        assert replies == [P.HandshakeError(code=P.HandshakeErrorCode.BAD_PUBLIC_VALUE)]


@pytest.mark.parametrize("group", ["modp1024", "ffdhe1536", "secp256k1"])
def test_A29_groups_off_the_allowlist_on_the_wire(tmp_path, group):
    with running_server(tmp_path / "srv") as server:
        assert _raw_exchange(server, _hello(group=group)) == [
            P.HandshakeError(code=P.HandshakeErrorCode.UNSUPPORTED_GROUP)
        ]


@pytest.mark.parametrize(
    "username",
    [
        "alice' OR '1'='1",
        "bob; DROP TABLE users; --",
        'x"--',
        "%_%",  # SQL metacharacters
        "аlice",
        "ａｌｉｃｅ",
        "alice\u200b",  # look-alikes, zero width
        "ali\x1bce",
        "ali\nce",
        "\x00alice",
        "alice\u202e",  # control and bidi
        "",
        "a" * 33,
        "../../etc/passwd",
    ],
)
def test_A30_hostile_usernames_are_refused(tmp_path, username):
    with running_server(tmp_path / "srv") as server:
        c = make_client(server, tmp_path / "x")
        with pytest.raises((InvalidUsername, InvalidPassword)):
            c.account.authenticate(
                P.Register(username=username[:32], password=PASSWORD.encode(), identity_key=bytes(32))
                if len(username.encode()) <= 32
                else P.Register(username="a" * 32 + "b", password=b"", identity_key=bytes(32))
            )
        c.close()
        assert server.storage.count_users() == 0


def test_A31_password_lengths(tmp_path):
    with running_server(tmp_path / "srv") as server:
        c = make_client(server, tmp_path / "x")
        with pytest.raises(InvalidPassword, match="at least 8"):
            c.register("alice", "")
        c.close()
        long_pw = "p" * 73  # bcrypt alone would silently ignore the 73rd byte
        c = logged_in_client(server, tmp_path / "a", "alice", password=long_pw)
        c.close()
        c = make_client(server, tmp_path / "b")
        with pytest.raises(InvalidCredentials):
            c.login("alice", long_pw[:72])  # no truncation: the 72-byte prefix is wrong
        c.close()
        c = make_client(server, tmp_path / "c")
        with pytest.raises(InvalidPassword, match="at most"):
            c.login("alice", "x" * (1 << 20))  # 1 MB: refused before it is sent
        with pytest.raises(InvalidCredentials):
            c.login("alice", "")  # empty password: refused, the same answer as a wrong one
        c.close()


def test_A32_relay_into_a_conversation_one_is_not_in(tmp_path):
    with running_server(tmp_path / "srv") as server:
        alice = logged_in_client(server, tmp_path / "a", "alice")
        bob = logged_in_client(server, tmp_path / "b", "bob")
        alice.open_conversation("bob")
        wait_for(bob, C.ConversationReady, peer="alice")
        cid = alice.conversations["bob"].id
        mallory = logged_in_client(server, tmp_path / "m", "mallory")
        mallory.send_frame(P.Relay(conversation_id=cid, payload=b"\x02forged"))
        assert "No such conversation" in wait_for(mallory, C.ServerNotice).text
        assert bob.next_event(timeout=0.5) is None  # bob saw nothing
        for c in (alice, bob, mallory):
            c.close()


def test_A33_relay_to_oneself_and_to_nobody(tmp_path):
    with running_server(tmp_path / "srv") as server:
        alice = logged_in_client(server, tmp_path / "a", "alice")
        alice.open_conversation("alice")
        assert "yourself" in wait_for(alice, C.ServerNotice).text
        alice.open_conversation("ghost")
        wait_for(alice, C.PeerUnknown, peer="ghost")
        alice.send_frame(P.Relay(conversation_id=999, payload=b"x"))
        assert "No such conversation" in wait_for(alice, C.ServerNotice).text
        alice.close()


def test_A34_terminal_escape_sequences_are_neutralised():
    hostile = "\x1b[2J\x1b]0;title\x07\x9b31m\u202eevil\u200b\r\n\x7f"
    shown = C.sanitize(hostile)
    assert not any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in shown)
    assert "\u202e" not in shown and "\u200b" not in shown
    assert "\\x1b[2J" in shown


# =============================================================================
# Denial of service
# =============================================================================
def test_A35_puzzle_is_required_before_any_dh_work(tmp_path):
    with running_server(tmp_path / "srv", puzzle_mode="always", puzzle_bits=12) as server:
        # A hello without a solution gets a Puzzle, not a DH answer (even with a bad DH value).
        replies = _raw_exchange(server, _hello(public=bytes(GROUPS[DEFAULT_GROUP].byte_length)))
        assert len(replies) == 1 and isinstance(replies[0], P.Puzzle) and replies[0].difficulty == 12
        # A real client solves it quickly and logs in.
        t0 = time.perf_counter()
        c = logged_in_client(server, tmp_path / "a", "alice")
        assert time.perf_counter() - t0 < 5
        c.close()


def _connect_from(server, source_ip: str) -> socket.socket:
    s = socket.socket()
    s.bind((source_ip, 0))
    s.settimeout(10)
    s.connect(server.server_address)
    return s


def _first_reply(s: socket.socket, data: bytes):
    """Send ``data`` and return the first message the server answers with."""
    s.sendall(data)
    decoder = P.FrameDecoder()
    while (body := decoder.next_frame()) is None:
        chunk = s.recv(65536)
        assert chunk, "the server closed without answering"
        decoder.feed(chunk)
    return P.decode_message(body)


def test_A35_a_client_that_ignores_the_puzzle_is_refused(tmp_path):
    with running_server(tmp_path / "srv", puzzle_mode="always", puzzle_bits=8) as server:
        hello = _hello()
        # The same unsolved hello twice: one Puzzle, then a refusal (never a second puzzle).
        assert [type(m) for m in _raw_exchange(server, hello + hello)] == [P.Puzzle, P.HandshakeError]
        assert _raw_exchange(server, hello + hello)[1] == P.HandshakeError(
            code=P.HandshakeErrorCode.PUZZLE_FAILED
        )


def test_A36_the_real_server_binds_puzzles_to_the_source_address(tmp_path):
    """A solution computed for 127.0.0.1 is refused from 127.0.0.2, and accepted from 127.0.0.1."""
    with running_server(tmp_path / "srv", puzzle_mode="always", puzzle_bits=8) as server:
        hello = P.decode_message(_hello()[4:])
        with _connect_from(server, "127.0.0.1") as s:
            issued = _first_reply(s, P.encode_frame(hello.encode()))
        assert isinstance(issued, P.Puzzle) and issued.difficulty == 8
        solution = puzzle.solve(issued.challenge, hello.public, issued.difficulty)
        answer = P.encode_frame(
            dataclasses.replace(hello, puzzle_challenge=issued.challenge, puzzle_solution=solution).encode()
        )
        moved = _connect_from(server, "127.0.0.2")
        moved.sendall(answer)
        moved.shutdown(socket.SHUT_WR)
        assert _read_messages(moved) == [P.HandshakeError(code=P.HandshakeErrorCode.PUZZLE_FAILED)]
        with _connect_from(server, "127.0.0.1") as s:  # the refusal above was the address, nothing else
            assert isinstance(_first_reply(s, answer), P.ServerHello)


def test_A37_load_adaptive_difficulty_through_the_real_server(tmp_path):
    """Calm: no puzzle.  Half-open connections reach the threshold: the base difficulty.
    Twice the threshold: 2 more bits.  A real client still solves it and logs in."""
    threshold, base = 4, 6
    with running_server(
        tmp_path / "srv", puzzle_mode="auto", puzzle_bits=base, puzzle_load_threshold=threshold
    ) as server:

        def probe():
            # Connections are admitted (and counted) in accept order, so the idle
            # connections made before this one are counted when its hello is answered.
            with _connect_from(server, "127.0.0.1") as s:
                return _first_reply(s, _hello())

        assert isinstance(probe(), P.ServerHello)
        idle = [_connect_from(server, "127.0.0.2") for _ in range(threshold - 1)]  # + the probe itself
        first = probe()
        assert isinstance(first, P.Puzzle) and first.difficulty == base
        idle += [_connect_from(server, "127.0.0.2") for _ in range(threshold)]
        second = probe()
        assert isinstance(second, P.Puzzle) and second.difficulty == base + 2
        logged_in_client(server, tmp_path / "a", "alice").close()
        for s in idle:
            s.close()


def test_A36_puzzle_solutions_cannot_be_forged_replayed_or_moved(tmp_path):
    now = [1_000_000.0]
    gate = PuzzleGate("always", base_difficulty=8, clock=lambda: now[0])
    pub = os.urandom(32)
    challenge = gate.issue("192.0.2.1", 8)
    solution = puzzle.solve(challenge, pub, 8)
    assert (
        gate.check("192.0.2.2", challenge, pub, solution, 8) == "puzzle challenge not issued to this address"
    )
    assert gate.check("192.0.2.1", challenge, os.urandom(32), solution, 8) == "wrong puzzle solution"
    forged = challenge[:-1] + bytes([challenge[-1] ^ 1])
    assert "not issued" in gate.check("192.0.2.1", forged, pub, solution, 8)
    assert gate.check("192.0.2.1", challenge, pub, solution, 10) == "puzzle too easy for the current load"
    assert gate.check("192.0.2.1", challenge, pub, solution, 8) is None
    assert gate.check("192.0.2.1", challenge, pub, solution, 8) == "puzzle solution already used"
    late = gate.issue("192.0.2.1", 8)
    now[0] += puzzle.LIFETIME_S + 1
    assert gate.check("192.0.2.1", late, pub, puzzle.solve(late, pub, 8), 8) == "expired puzzle challenge"


def test_A37_puzzle_difficulty_adapts_to_load():
    load = [0]
    gate = PuzzleGate("auto", base_difficulty=16, load_threshold=64, load=lambda: load[0])
    assert gate.difficulty() == 0
    load[0] = 64
    assert gate.difficulty() == 16
    load[0] = 256
    assert gate.difficulty() == 20
    load[0] = 100_000
    assert gate.difficulty() == puzzle.MAX_DIFFICULTY
    assert PuzzleGate("off", load=lambda: 10**6).difficulty() == 0


def test_A38_client_refuses_absurd_puzzles():
    """Refused at once, before any work.  Run in a thread: a client without the cap would
    grind through 2^40 hashes, and this test then fails in seconds instead of hanging."""
    client = P.ClientProtocol()
    client.initiate()
    refusals = []

    def receive():
        with pytest.raises(HandshakeFailed, match="at most") as info:
            client.receive_data(P.encode_frame(P.Puzzle(challenge=b"x" * 14, difficulty=40).encode()))
        refusals.append(info.value)

    worker = threading.Thread(target=receive, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "the client started working on a 40-bit puzzle"
    assert len(refusals) == 1


def test_A39_per_source_connection_rate_limit(tmp_path):
    with running_server(
        tmp_path / "srv", connections_per_source_per_s=1.0, connection_burst_per_source=5
    ) as server:
        refused = 0
        for _ in range(12):
            replies = _raw_exchange(server, b"")
            if replies == [P.HandshakeError(code=P.HandshakeErrorCode.BUSY)]:
                refused += 1
        assert refused >= 6


def _junk_connection(server_address, source_ip: str, kind: int):
    s = socket.socket()
    s.bind((source_ip, 0))
    s.settimeout(10)
    s.connect(server_address)
    if kind == 1:
        s.sendall(os.urandom(32))
    elif kind == 2:
        s.sendall(b"\x00\x00\x10\x00")  # a frame header, then nothing
    return s


def test_A41_half_open_connections_are_capped_per_source(tmp_path):
    cap = 3
    with running_server(tmp_path / "srv", max_unauthenticated_per_source=cap) as server:
        silent = [_connect_from(server, "127.0.0.2") for _ in range(cap)]
        extra = _connect_from(server, "127.0.0.2")
        extra.shutdown(socket.SHUT_WR)
        assert _read_messages(extra) == [P.HandshakeError(code=P.HandshakeErrorCode.BUSY)]
        logged_in_client(server, tmp_path / "a", "alice").close()  # another source is not affected
        for s in silent:
            s.close()


JUNK_CONNECTIONS = 1000


@pytest.fixture
def enough_file_descriptors():
    """The flood holds 1,000 client sockets and the in-process server's 1,000 ends (plus
    threads' and clients' sockets): more than the usual soft limit of 1,024 descriptors.
    Raise the soft limit (up to the hard limit) for this test, and restore it after."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(8192, hard)
    if wanted < 4 * JUNK_CONNECTIONS:
        pytest.fail(f"the flood needs {4 * JUNK_CONNECTIONS} file descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_A40_flood_of_junk_from_one_source_does_not_stop_others(tmp_path, enough_file_descriptors):
    """1,000 junk connections from 127.0.0.2; 20 legitimate users from 127.0.0.1 log in and chat."""
    with running_server(tmp_path / "srv", login_grace_s=20) as server:
        t0 = time.monotonic()
        # Every junk connection is really opened (TCP accepts it before the server's limits
        # refuse it at the door): a failure to open one fails the test instead of shrinking the flood.
        junk = [_junk_connection(server.server_address, "127.0.0.2", i % 3) for i in range(JUNK_CONNECTIONS)]
        assert len(junk) == JUNK_CONNECTIONS
        users = []
        errors = []

        def user(i):
            try:
                users.append(logged_in_client(server, tmp_path / f"u{i}", f"user{i}"))
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=user, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors and len(users) == 20
        by_name = {u.username: u for u in users}
        for i in range(0, 20, 2):
            a, b = by_name[f"user{i}"], by_name[f"user{i + 1}"]
            a.open_conversation(b.username)
            wait_for(a, C.ConversationReady, peer=b.username, timeout=30)
            wait_for(b, C.ConversationReady, peer=a.username, timeout=30)
            a.send_message(b.username, "still here")
            assert wait_for(b, C.MessageReceived, timeout=30).text == "still here"
        elapsed = time.monotonic() - t0
        assert elapsed < 120
        assert (
            server.service.registry.unauthenticated.get("127.0.0.2", 0)
            <= server.config.max_unauthenticated_per_source
        )
        for s in junk:
            s.close()
        for u in users:
            u.close()
