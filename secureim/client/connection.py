"""The connection to one node of the service: socket, handshake, server pin, frames, barriers.

Owned by :class:`secureim.client.chat.ChatClient`; the session part (session.py) reads and replaces
what it holds (the socket, the protocol object) when it resumes or closes.  Thread-safe through
``send_lock`` (every write of a frame, and the protocol object's state, happen under it).
"""

from __future__ import annotations

import collections
import select
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import crypto_utils as cu
from secureim import proto as P
from secureim.client.pinning import MAX_SERVERS, KnownServers, parse_fingerprint
from secureim.errors import ConfigError, ConnectionClosed, ServerKeyMismatch

CONNECT_TIMEOUT_S = 10.0
REPLY_TIMEOUT_S = 30.0
NODE_CONNECT_TIMEOUT_S = 3.0  # with several servers a dead one is skipped this quickly


class Barrier:
    """A WhoRequest sent after a message: the server answers in order, so once its answer is in,
    every refusal (an Error frame) of what was sent before it has arrived too."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.refusals: list[str] = []


class Connection:
    def __init__(
        self,
        servers: list[tuple[str, int]],
        home: Path,
        *,
        group: str,
        suites: tuple[str, ...],
        server_fingerprint: str | None,
        timeout_s: float,
        reply_timeout_s: float,
        on_key_mismatch: Callable[[], None],
    ) -> None:
        """``on_key_mismatch``: called (the client closes) before ServerKeyMismatch is raised."""
        self.servers: tuple[tuple[str, int], ...] = tuple((str(h), int(p)) for h, p in servers)
        if not 1 <= len(self.servers) <= MAX_SERVERS or len(set(self.servers)) != len(self.servers):
            raise ConfigError(f"Between 1 and {MAX_SERVERS} servers, none twice.")
        self.node = 0  # the index of the server now in use
        self.host, self.port = self.servers[0]
        self.known_servers = KnownServers(home)
        self.pinned_fingerprint = parse_fingerprint(server_fingerprint) if server_fingerprint else None
        self.timeout_s = timeout_s
        self.reply_timeout_s = reply_timeout_s  # the longest wait for the server during the handshake
        self._group, self._suites = group, suites
        self.proto = P.ClientProtocol(group=group, suites=suites)
        self.sock: socket.socket | None = None
        self.server_fingerprint: str | None = None
        self.first_contact = False
        self.send_lock = threading.Lock()
        self._reconnecting = threading.Event()
        self._on_key_mismatch = on_key_mismatch
        self._who_waiters: collections.deque[Barrier | None] = (
            collections.deque()
        )  # per WhoRequest in flight: None or a Barrier

    @property
    def server_id(self) -> str:
        """The service id: the first server listed.  The pin, the identity file and the peer keys
        are kept under it, whichever node is in use (every node presents the same key)."""
        host, port = self.servers[0]
        return f"{host}:{port}"

    @property
    def node_id(self) -> str:
        """The server (node) this client is connected to now."""
        return f"{self.host}:{self.port}"

    def connect(self, *, start_at: int = 0) -> P.HandshakeComplete:
        """TCP connect, handshake, and check the server's key (pinned, known, or first use).

        The servers are tried in order from ``start_at``; one that cannot be reached or drops
        the connection is skipped.  A key mismatch is never skipped: it is raised at once.
        A connection still held (one the server closed at its login deadline) is dropped first.
        """
        self.drop_socket()
        failures = []
        for i in range(len(self.servers)):
            index = (start_at + i) % len(self.servers)
            try:
                return self._connect_node(index)
            except ConnectionClosed as exc:
                failures.append(str(exc))
        if len(failures) == 1:
            raise ConnectionClosed(failures[0])
        raise ConnectionClosed("No server could be reached: " + " ".join(failures))

    def _connect_node(self, index: int) -> P.HandshakeComplete:
        self.node = index
        self.host, self.port = self.servers[index]
        self.proto = P.ClientProtocol(group=self._group, suites=self._suites)
        timeout = self.timeout_s if len(self.servers) == 1 else min(self.timeout_s, NODE_CONNECT_TIMEOUT_S)
        try:
            self.sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except OSError as exc:
            reason = exc.strerror or str(exc) or exc.__class__.__name__
            raise ConnectionClosed(f"Cannot connect to {self.node_id}: {reason}.") from None
        try:
            return self._handshake()
        except ConnectionClosed:
            self.drop_socket()
            raise

    def wait_hangup(self, timeout_s: float) -> bool:
        """Before login nothing reads the connection: True as soon as the server has ended it
        (its login grace ran out; or it sent something, which before login is only ever a
        farewell before it closes), False while it is still open after ``timeout_s``.
        Reads nothing: a login that follows finds every byte."""
        sock = self.sock
        if sock is None:
            return True
        try:
            readable, _, _ = select.select([sock], [], [], timeout_s)
            if not readable:
                return False
            sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except (OSError, ValueError):  # reset, or closed meanwhile
            return True
        return True

    def drop_socket(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a receiver thread blocked in recv()
            except OSError:
                pass
            sock.close()

    def _handshake(self) -> P.HandshakeComplete:
        assert self.sock is not None
        self.sock.settimeout(self.reply_timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small frames: no Nagle delay
        self._sendall(self.proto.initiate())
        done = None
        while done is None:
            for event in self.recv_events():
                if isinstance(event, P.HandshakeComplete):
                    done = event
            self._sendall(self.proto.data_to_send())  # a puzzle's new ClientHello, or ClientFinished
        self._check_server_key(done.server_key)
        self.server_fingerprint = done.fingerprint
        return done

    def _check_server_key(self, key: bytes) -> None:
        got = cu.fingerprint(key)
        if self.pinned_fingerprint is not None:
            if not cu.constant_time_equal(got.encode(), self.pinned_fingerprint.encode()):
                self._on_key_mismatch()
                raise ServerKeyMismatch(
                    f"The server at {self.node_id} presented {got}, "
                    f"but {self.pinned_fingerprint} was expected."
                )
        known = self.known_servers.lookup(self.server_id)
        if known is None:
            self.known_servers.remember(self.server_id, key)
            self.first_contact = True
        elif not cu.constant_time_equal(known, key):
            self._on_key_mismatch()
            service = "it" if self.node_id == self.server_id else f"the service {self.server_id}"
            raise ServerKeyMismatch(
                f"The server at {self.node_id} presented {got}, but this client "
                f"knows {service} as {cu.fingerprint(known)} ({self.known_servers.path})."
            )

    def _sendall(self, data: bytes) -> None:
        if not data:
            return
        assert self.sock is not None
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise ConnectionClosed(f"The connection to {self.node_id} was lost: {exc}.") from None

    def recv_events(self, sock: socket.socket | None = None, proto: P.ClientProtocol | None = None) -> list:
        """One recv() on ``sock`` (default: the current one), fed to its protocol object."""
        sock, proto = sock or self.sock, proto or self.proto
        if sock is None:
            raise ConnectionClosed(f"The connection to {self.node_id} is closed.")
        try:
            data = sock.recv(65536)
        except TimeoutError:
            raise ConnectionClosed(f"The server at {self.node_id} did not answer in time.") from None
        except OSError as exc:
            raise ConnectionClosed(f"The connection to {self.node_id} was lost: {exc}.") from None
        if not data:
            reason = proto.close_reason
            raise ConnectionClosed(
                f"The server at {self.node_id} closed the connection" + (f" ({reason})." if reason else ".")
            )
        with self.send_lock:
            return proto.receive_data(data)

    def send_frame(self, msg: P.Message) -> None:
        if not isinstance(msg, (P.Login, P.Register, P.Resume)):
            self.check_not_reconnecting()
        with self.send_lock:
            self.send_locked(msg)

    @property
    def reconnecting(self) -> bool:
        """auto_reconnect: the connection was lost and is being resumed; sending raises ConnectionClosed."""
        return self._reconnecting.is_set()

    def check_not_reconnecting(self) -> None:
        if self._reconnecting.is_set():
            raise ConnectionClosed(
                f"The connection to {self.server_id} was lost; reconnecting. Try again in a moment."
            )

    def send_locked(self, msg: P.Message) -> None:
        if self.proto.state is P.State.CLOSED:  # the server ended the session (or we did)
            raise ConnectionClosed(
                f"The session with {self.server_id} is closed"
                + (f": {self.proto.close_reason}." if self.proto.close_reason else ".")
            )
        self._sendall(self.proto.send(msg))

    def send_who(self) -> None:
        """A WhoRequest whose answer is a WhoList event, queued in the order the requests go out."""
        self.check_not_reconnecting()
        with self.send_lock:
            self._who_waiters.append(None)
            try:
                self.send_locked(P.WhoRequest())
            except ConnectionClosed:
                self._who_waiters.pop()
                raise

    def fail_barriers(self, reason: str) -> None:
        while self._who_waiters:
            waiter = self._who_waiters.popleft()
            if isinstance(waiter, Barrier):
                waiter.refusals.append(reason)
                waiter.done.set()

    def begin_reconnect(self) -> None:
        self._reconnecting.set()

    def end_reconnect(self) -> None:
        self._reconnecting.clear()

    def barrier_after(self, msg: P.Message, barrier: Barrier | None = None) -> Barrier:
        """Send ``msg`` and a WhoRequest: the barrier is done once every answer to ``msg`` is in.
        The barrier is queued before the message goes: its refusal cannot come first."""
        barrier = barrier if barrier is not None else Barrier()
        self.check_not_reconnecting()
        with self.send_lock:
            self._who_waiters.append(barrier)
            try:
                self.send_locked(msg)
                self.send_locked(P.WhoRequest())
            except ConnectionClosed:
                self._who_waiters.remove(barrier)
                raise
        return barrier

    def on_who_response(self) -> bool:
        """A WhoResponse came: True if it answered a barrier (now done), False if the user asked."""
        waiter = self._who_waiters.popleft() if self._who_waiters else None
        if isinstance(waiter, Barrier):
            waiter.done.set()
            return True
        return False

    def note_refusal(self, reason: str) -> None:
        """An Error frame: it answers something sent before the oldest barrier in flight."""
        barrier = next((w for w in list(self._who_waiters) if isinstance(w, Barrier)), None)
        if barrier is not None:
            barrier.refusals.append(reason)
