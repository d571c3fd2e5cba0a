"""``ChatClient``: connect, pin the server, log in, open conversations, chat."""

from __future__ import annotations

import collections
import logging
import os
import queue
import random
import select
import socket
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import crypto_utils as cu
from secureim import proto as P
from secureim.client import history as H
from secureim.client import offline as offline
from secureim.client import rooms as room_client
from secureim.client.display import sanitize
from secureim.client.events import (
    AUTH_ERRORS,
    AccountDeletion,
    ConversationReady,
    DirectFallback,
    DirectReady,
    DirectRequested,
    Disconnected,
    HistoryUnavailable,
    MessageDelivered,
    MessageNotStored,
    MessageReceived,
    MessageRejected,
    MessageStored,
    MessageUndelivered,
    PeerOffline,
    PeerOnline,
    PeerUnknown,
    Reconnected,
    Reconnecting,
    SecurityWarning,
    ServerNotice,
    WhoList,
)
from secureim.client.pinning import MAX_SERVERS, KnownServers, PendingKeys, parse_fingerprint
from secureim.e2e import datagrams as direct
from secureim.e2e import sessions as e2e
from secureim.errors import (
    AccountLocked,
    AuthError,
    ConfigError,
    ConnectionClosed,
    DecryptionFailed,
    HistoryError,
    InvalidPassword,
    InvalidUsername,
    MessageRefused,
    ProtocolError,
    SecureIMError,
    ServerKeyMismatch,
    ServiceUnavailable,
)

log = logging.getLogger("secureim.client")


CONNECT_TIMEOUT_S = 10.0
REPLY_TIMEOUT_S = 30.0
EVENT_QUEUE_MAX = 10000
NODE_CONNECT_TIMEOUT_S = 3.0  # with several servers a dead one is skipped this quickly
RECONNECT_ATTEMPTS = 8  # auto_reconnect: at most this many tries...
RECONNECT_MAX_S = 60.0  # ...within this long
RECONNECT_BASE_DELAY_S = 0.25  # the first wait is up to this (full jitter), doubling each try...
RECONNECT_MAX_DELAY_S = 8.0  # ...up to this
# Goodbye reasons of a node that is going away (server.Server.shutdown's): failed over at once.
# The protocol's Goodbye has no code; any other Goodbye (a kick, a ban, a login from another
# place) is failed over only if the node no longer takes connections.
NODE_SHUTDOWN_REASONS = frozenset({"The server is shutting down."})


def _now_ms() -> int:
    return int(time.time() * 1000)


def default_home() -> Path:
    env = os.environ.get("SECUREIM_HOME")
    return Path(env) if env else Path.home() / ".secureim"


# =============================================================================
# The client
# =============================================================================
PRESENCE_ONLINE, PRESENCE_OFFLINE, PRESENCE_UNKNOWN, PRESENCE_REFUSED = (
    "online",
    "offline",
    "unknown",
    "refused",
)
PUBLISH_WAIT_S = 3.0  # close() waits this long at most for prekeys still being published
KEY_EXCHANGE_WAIT_S = 10.0  # how long a message waits for its conversation to be keyed


class _Barrier:
    """A WhoRequest sent after a message: the server answers in order, so once its answer is in,
    every refusal (an Error frame) of what was sent before it has arrived too."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.refusals: list[str] = []


class ChatClient:
    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        *,
        servers: list[tuple[str, int]] | None = None,
        home: Path | None = None,
        group: str = P.DEFAULT_GROUP,
        suites: tuple[str, ...] = cu.SUITE_NAMES,
        server_fingerprint: str | None = None,
        timeout_s: float = CONNECT_TIMEOUT_S,
        persist_identity: bool = True,
        reply_timeout_s: float = REPLY_TIMEOUT_S,
        auto_reconnect: bool = False,
        reconnect_attempts: int = RECONNECT_ATTEMPTS,
        reconnect_max_s: float = RECONNECT_MAX_S,
        history: bool = False,
        history_max_messages: int = H.DEFAULT_MAX_PER_CONVERSATION,
        history_max_age_days: float = H.DEFAULT_MAX_AGE_DAYS,
        receipts: bool = True,
    ) -> None:
        """``ChatClient(host, port)`` or ``ChatClient(servers=[(host, port), ...])``: the nodes of
        one service, tried in order; the first is the service id the server key is pinned under.

        ``persist_identity=False`` keeps the identity key in memory only (benchmarks:
        no scrypt per login, nothing on disk; peers see a new key every session).
        ``auto_reconnect=True``: a lost connection is resumed on the next live node (bounded
        exponential backoff with jitter), with Reconnecting/Reconnected events, Disconnected
        when it gives up.  ``history=True`` keeps the encrypted local history (history.py).
        """
        if servers is None:
            if host is None or port is None:
                raise ConfigError("Give a host and port, or servers=[(host, port), ...].")
            servers = [(host, port)]
        elif host is not None or port is not None:
            raise ConfigError("Give either host and port or servers, not both.")
        self.servers: tuple[tuple[str, int], ...] = tuple((str(h), int(p)) for h, p in servers)
        if not 1 <= len(self.servers) <= MAX_SERVERS or len(set(self.servers)) != len(self.servers):
            raise ConfigError(f"Between 1 and {MAX_SERVERS} servers, none twice.")
        self._node = 0  # the index of the server now in use
        self.host, self.port = self.servers[0]
        self.auto_reconnect = auto_reconnect
        self.reconnect_attempts, self.reconnect_max_s = reconnect_attempts, reconnect_max_s
        self.history_enabled = history
        self._history_limits = (history_max_messages, history_max_age_days)
        self.history: H.History | None = None
        self.home = Path(home) if home is not None else default_home()
        self.known_servers = KnownServers(self.home)
        self.pinned_fingerprint = parse_fingerprint(server_fingerprint) if server_fingerprint else None
        self.timeout_s = timeout_s
        self.reply_timeout_s = reply_timeout_s  # the longest wait for the server during the handshake
        self._group, self._suites = group, suites
        self.proto = P.ClientProtocol(group=group, suites=suites)
        self._ticket: bytes | None = None  # resumption ticket: memory only, never on disk
        self.sock: socket.socket | None = None
        self.server_fingerprint: str | None = None
        self.first_contact = False
        self.username: str | None = None
        self.events: queue.Queue = queue.Queue(maxsize=EVENT_QUEUE_MAX)
        self.conversations: dict[str, e2e.E2ESession] = {}
        self.identities = e2e.IdentityStore(self.home, self.server_id)
        self.persist_identity = persist_identity
        self.identity: Ed25519PrivateKey | None = None
        self.peer_trust: e2e.PeerTrust | None = None
        self._changed_identity: dict[str, bytes] = {}  # peer -> new key awaiting /accept
        self._opened_by_peer: dict[str, bool] = {}
        self._wanted: set[str] = set()
        self._pending_open: set[str] = set()
        self._auto_reopen: set[str] = set()  # reopened on a notice: its answer is not news
        self._presence: dict[str, str] = {}  # peer -> PRESENCE_* (what the server last said)
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._state_changed = threading.Condition(self._state_lock)
        self._password_reply: queue.Queue = queue.Queue(maxsize=1)
        self._receiver: threading.Thread | None = None
        self.closed = threading.Event()
        self._stop = threading.Event()  # close() was called: never reconnect again
        self._reconnecting = threading.Event()
        self._connection = 0  # bumped on every (re)connection: older receivers stay silent
        self._resume_lock = threading.Lock()
        self._who_waiters: collections.deque = (
            collections.deque()
        )  # per WhoRequest in flight: None or a _Barrier
        # Direct mode (docs/PROTOCOL.md section 12): off until enable_direct().
        self._udp: socket.socket | None = None
        self._links: direct.DirectLinks | None = None
        self._direct_lock = threading.Lock()
        self._direct_sent: dict[tuple[str, int], str | None] = {}  # None: a receipt
        self._udp_thread: threading.Thread | None = None
        # Store and forward (offline.py, docs/PROTOCOL.md section 15).
        self.receipts = receipts  # answer every message that opens with an end-to-end receipt
        self.mailbox = offline.Mailbox(self)
        self.rooms = room_client.RoomsClient(self)
        self._early: list = []  # frames that came in the same read as AuthOk
        self._last_sent: offline.Outgoing | None = None

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

    # -- connection and handshake -------------------------------------------------
    def connect(self, *, start_at: int = 0) -> P.HandshakeComplete:
        """TCP connect, handshake, and check the server's key (pinned, known, or first use).

        The servers are tried in order from ``start_at``; one that cannot be reached or drops
        the connection is skipped.  A key mismatch is never skipped: it is raised at once.
        A connection still held (one the server closed at its login deadline) is dropped first.
        """
        self._drop_socket()
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
        self._node = index
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
            self._drop_socket()
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

    def _drop_socket(self) -> None:
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
            for event in self._recv_events():
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
                self.close()
                raise ServerKeyMismatch(
                    f"The server at {self.node_id} presented {got}, "
                    f"but {self.pinned_fingerprint} was expected."
                )
        known = self.known_servers.lookup(self.server_id)
        if known is None:
            self.known_servers.remember(self.server_id, key)
            self.first_contact = True
        elif not cu.constant_time_equal(known, key):
            self.close()
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

    def _recv_events(self, sock: socket.socket | None = None, proto: P.ClientProtocol | None = None) -> list:
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
        with self._send_lock:
            return proto.receive_data(data)

    def send_frame(self, msg: P.Message) -> None:
        if not isinstance(msg, (P.Login, P.Register, P.Resume)):
            self._check_not_reconnecting()
        with self._send_lock:
            self._send_locked(msg)

    @property
    def reconnecting(self) -> bool:
        """auto_reconnect: the connection was lost and is being resumed; sending raises ConnectionClosed."""
        return self._reconnecting.is_set()

    def _check_not_reconnecting(self) -> None:
        if self._reconnecting.is_set():
            raise ConnectionClosed(
                f"The connection to {self.server_id} was lost; reconnecting. Try again in a moment."
            )

    def _send_locked(self, msg: P.Message) -> None:
        if self.proto.state is P.State.CLOSED:  # the server ended the session (or we did)
            raise ConnectionClosed(
                f"The session with {self.server_id} is closed"
                + (f": {self.proto.close_reason}." if self.proto.close_reason else ".")
            )
        self._sendall(self.proto.send(msg))

    def _send_who(self) -> None:
        """A WhoRequest whose answer is a WhoList event, queued in the order the requests go out."""
        self._check_not_reconnecting()
        with self._send_lock:
            self._who_waiters.append(None)
            try:
                self._send_locked(P.WhoRequest())
            except ConnectionClosed:
                self._who_waiters.pop()
                raise

    # -- accounts --------------------------------------------------------------------
    def login(self, username: str, password: str) -> P.AuthOk:
        """Log in; the identity key stored for this user opens with the same password.

        A user with no identity on this machine (or whose file the password
        does not open) gets a new one; their peers will see the key change.
        """
        name = P.normalize_username(username)
        identity = self.identities.load(name, password) if self.persist_identity else None
        created = identity is None
        identity = identity or Ed25519PrivateKey.generate()
        ok = self._authenticate(
            P.Login(username=name, password=password.encode("utf-8"), identity_key=cu.public_bytes(identity))
        )
        self._logged_in(ok, password, identity, save=created)
        return ok

    def register(self, username: str, password: str) -> P.AuthOk:
        """Create the account with a new identity key made here; it never leaves this machine."""
        name = P.normalize_username(username)
        identity = Ed25519PrivateKey.generate()
        ok = self._authenticate(
            P.Register(
                username=name, password=password.encode("utf-8"), identity_key=cu.public_bytes(identity)
            )
        )
        self._logged_in(ok, password, identity, save=True)
        return ok

    def _logged_in(self, ok: P.AuthOk, password: str, identity: Ed25519PrivateKey, *, save: bool) -> None:
        if save and self.persist_identity:
            self.identities.save(ok.username, password, identity)
        self.identity = identity
        self.peer_trust = e2e.PeerTrust(self.home, ok.username, self.server_id)
        if self.persist_identity and self.mailbox.store is None:
            self.mailbox.open_store(self.home, ok.username, self.server_id, password)
            self.rooms.load()
        if self.history_enabled and self.history is None:
            try:
                self.history = H.History.open(
                    self.home,
                    ok.username,
                    self.server_id,
                    password,
                    max_per_conversation=self._history_limits[0],
                    max_age_days=self._history_limits[1],
                )
            except HistoryError as exc:
                self._emit(HistoryUnavailable(str(exc)))

    def resume(self) -> bool:
        """Reconnect after the connection dropped (a server restart, a dead node), without the password.

        A new handshake with the next server of the list (the current one first when there
        is only one; the server's key is checked again), then the ticket from the last
        login.  The conversations that were open are asked for again.  Safe on a connection
        that is still open: the old receiver is woken and stays silent (it belongs to an
        older connection), so it never reads the new socket nor reports the old one lost.
        """
        self._after_resume(self._resume_session())
        return True

    def _resume_session(self) -> set[str]:
        """resume()'s first half: a new session with the ticket.  The conversations to ask for again."""
        if self._ticket is None or self.identity is None:
            raise AuthError("No session ticket; log in with the password.")
        with self._resume_lock:
            wanted = set(self._wanted)
            self._connection += 1  # first: the old receiver, once woken, knows it is stale
            self._drop_socket()
            if self._receiver is not None and self._receiver is not threading.current_thread():
                self._receiver.join(timeout=5)
            self._fail_barriers("the connection was lost before the server answered")
            self.closed.clear()
            with self._state_lock:
                self.conversations.clear()
                self._pending_open.clear()
                self._auto_reopen.clear()
            self.connect(start_at=self._node + 1)
            self._authenticate(P.Resume(ticket=self._ticket, identity_key=cu.public_bytes(self.identity)))
            self._reconnecting.clear()
            self.start()
        return wanted

    def _after_resume(self, wanted: set[str]) -> None:
        """resume()'s second half, on the new session: what the old one left unfinished."""
        if self._udp is not None:
            self.enable_direct()  # a new session has a new ticket key
        for peer in sorted(wanted):
            self.open_conversation(peer)
        self.mailbox.resend_unanswered()  # stores the server may not have seen: the same bytes again
        self.mailbox.after_reconnect()  # live messages with no receipt go again once keyed (or stored)

    @property
    def identity_fingerprint(self) -> str | None:
        return cu.fingerprint(cu.public_bytes(self.identity)) if self.identity is not None else None

    def _authenticate(self, msg: P.Login | P.Register | P.Resume) -> P.AuthOk:
        if len(getattr(msg, "password", b"")) > P.MAX_PASSWORD_BYTES:
            raise InvalidPassword(f"Passwords must be at most {P.MAX_PASSWORD_BYTES} bytes.")
        if len(getattr(msg, "username", "").encode()) > P.MAX_USERNAME_BYTES:
            raise InvalidUsername("Usernames are at most 32 characters.")
        self.send_frame(msg)
        while True:
            events = self._recv_events()
            for i, event in enumerate(events):
                if isinstance(event, P.AuthOk):
                    self.username = event.username
                    self._ticket = event.ticket or None
                    self._early = events[i + 1 :]  # the prekey status, stored messages: after start()
                    return event
                if isinstance(event, P.AuthFailed):
                    self._raise_auth_failed(event)
                if isinstance(event, P.Goodbye):
                    raise ConnectionClosed(f"The server closed the session: {sanitize(event.reason)}")

    @staticmethod
    def _raise_auth_failed(event: P.AuthFailed) -> None:
        reason = sanitize(event.reason, 512)
        if event.code == P.AuthCode.LOCKED:
            raise AccountLocked(event.retry_after_s)
        if event.code == P.AuthCode.TOO_MANY_ATTEMPTS:
            # The server's reason ends with its own "Too many attempts..." sentence: say each thing once.
            first = reason.split(" Too many attempts", 1)[0].strip()
            raise ConnectionClosed(
                (f"{first}\n" if first else "")
                + "Too many attempts on this connection; the server closed it. "
                "Start the client again to try once more."
            )
        raise AUTH_ERRORS.get(event.code, AuthError)(reason)

    # -- after login ---------------------------------------------------------------
    def start(self) -> None:
        """Start the receiver thread (after a successful login)."""
        if self.username is None:
            raise AuthError("Log in first.")
        assert self.sock is not None
        self.sock.settimeout(None)
        early, self._early = self._early, []
        receiver = threading.Thread(
            target=self._receive_loop,
            args=(self.sock, self.proto, self._connection, early),
            name="receiver",
            daemon=True,
        )
        receiver.start()
        self._receiver = receiver  # only once started: close() may join it from another thread

    def _receive_loop(
        self, sock: socket.socket, proto: P.ClientProtocol, connection: int, early: list | None = None
    ) -> None:
        """Read one connection until it ends; only the current connection may report its end."""
        reason, goodbye, going_away = "closed", False, False
        try:
            while not self.closed.is_set():
                events, early = (early, None) if early else (self._recv_events(sock, proto), None)
                if connection != self._connection:
                    return  # resume() replaced this connection: nothing of it is news any more
                # A Goodbye is taken first: what came before it in the same read is still shown,
                # but an answer it asks for fails on the closed session, and that failure must
                # not pass for a lost connection (auto_reconnect would undo a kick).
                bye = next((i for i, e in enumerate(events) if isinstance(e, P.Goodbye)), None)
                if bye is not None:
                    reason = f"the server closed the session: {sanitize(events[bye].reason, 512)}"
                    goodbye, going_away = True, events[bye].reason in NODE_SHUTDOWN_REASONS
                    events = events[:bye]
                for event in events:
                    try:
                        self._dispatch(event)
                    except ConnectionClosed:
                        if not goodbye:
                            raise
                if goodbye or proto.state is P.State.CLOSED:
                    reason = reason if goodbye else proto.close_reason or "closed"
                    break
        except ConnectionClosed as exc:
            reason = str(exc)
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
        finally:
            if connection == self._connection:
                self._connection_ended(reason, goodbye and not going_away)

    def _connection_ended(self, reason: str, goodbye: bool) -> None:
        """``goodbye``: the server ended this session on purpose while staying up (probably)."""
        self._fail_barriers(f"the connection was lost before the server answered ({reason})")
        ticket_refused = False
        if (
            self.auto_reconnect
            and not self._stop.is_set()
            and self._ticket is not None
            and (not goodbye or not self._node_reachable())
        ):
            self._reconnecting.set()
            failure = self._reconnect(reason)
            if failure is None:  # _resume_session cleared it; a newer connection's loss may have set it since
                return
            self._reconnecting.clear()
            reason, ticket_refused = failure, self._ticket is None  # _reconnect forgets a refused ticket
        if not self.closed.is_set() and not self._stop.is_set():
            self._emit(Disconnected(reason, ticket_refused))
        self.closed.set()
        with self._state_changed:  # nobody waits for a conversation on a dead connection
            self._state_changed.notify_all()

    def _node_reachable(self) -> bool:
        """After a Goodbye: does this node still take connections?  A kick, a ban or a login from
        another place comes from a node that is still up, and reconnecting must not undo it (nor
        start two devices kicking each other out)."""
        try:
            socket.create_connection((self.host, self.port), timeout=NODE_CONNECT_TIMEOUT_S).close()
        except OSError:
            return False
        return True

    def _reconnect(self, reason: str) -> str | None:
        """auto_reconnect: resume on the next live server, with exponential backoff and full jitter
        (at most ``reconnect_attempts`` tries within ``reconnect_max_s``).  None once the session
        goes on (or close() was called meanwhile); else why it gave up."""
        deadline = time.monotonic() + self.reconnect_max_s
        for attempt in range(1, self.reconnect_attempts + 1):
            ceiling = min(RECONNECT_MAX_DELAY_S, RECONNECT_BASE_DELAY_S * 2 ** (attempt - 1))
            delay = random.uniform(0, ceiling)  # spread a whole node's clients over the window
            if time.monotonic() + delay > deadline or self._stop.wait(delay):
                break
            self._emit(Reconnecting(attempt, reason))
            try:
                wanted = self._resume_session()
            except ServerKeyMismatch as exc:  # never retried: a security event
                return f"Reconnecting failed: {exc}"
            except (
                AuthError
            ) as exc:  # never retried: the ticket is void (expired, or a password change ended it)
                self._ticket = None
                return f"Reconnecting failed: {exc}"
            except (ConnectionClosed, ProtocolError, ServiceUnavailable) as exc:
                reason = str(exc)
                continue
            if self._stop.is_set():  # close() was called while we reconnected
                self.close()
                return None
            # Said before the conversations are asked for again: their ConversationReady comes after.
            self._emit(Reconnected(self.node_id, attempt))
            try:
                self._after_resume(wanted)
            except (ConnectionClosed, ProtocolError) as exc:  # the new connection's receiver reports it
                log.info("after reconnecting: %s", exc)
            return None
        return f"Gave up reconnecting: {reason}"

    def _fail_barriers(self, reason: str) -> None:
        while self._who_waiters:
            waiter = self._who_waiters.popleft()
            if isinstance(waiter, _Barrier):
                waiter.refusals.append(reason)
                waiter.done.set()

    def _emit(self, event) -> None:
        try:
            self.events.put_nowait(event)
        except queue.Full:  # the UI stopped reading events; drop the oldest notice
            log.warning("event queue full; an event was dropped")

    def _dispatch(self, msg: P.Message) -> None:
        if isinstance(msg, P.PeerStatus):
            self._on_peer_status(msg)
        elif isinstance(msg, P.ConversationKey):
            self._on_key(msg)
        elif isinstance(msg, P.Deliver):
            self._on_deliver(msg)
        elif isinstance(msg, P.WhoResponse):
            waiter = self._who_waiters.popleft() if self._who_waiters else None
            if isinstance(waiter, _Barrier):
                waiter.done.set()
            else:
                self._emit(WhoList(tuple(sanitize(u, 64) for u in msg.users), msg.total))
        elif isinstance(msg, P.DirectOffer):
            self._on_direct_offer(msg)
        elif isinstance(msg, P.DirectAsked):
            try:
                self._emit(DirectRequested(P.normalize_username(msg.peer)))
            except InvalidUsername:
                log.debug("a direct-link request named an invalid user")
        elif isinstance(msg, P.DirectUnavailable):
            self._emit(DirectFallback(msg.peer, sanitize(msg.reason, 512)))
        elif isinstance(msg, (P.PasswordChanged, P.PasswordChangeFailed)):
            try:
                self._password_reply.put_nowait(msg)
            except queue.Full:
                log.warning("an unasked password-change answer was ignored")
        elif isinstance(msg, P.Error):
            reason = sanitize(msg.reason, 512)
            barrier = next((w for w in list(self._who_waiters) if isinstance(w, _Barrier)), None)
            if barrier is not None:  # it answers something sent before the oldest barrier in flight
                barrier.refusals.append(reason)
            self._emit(ServerNotice(reason, msg.code))
        elif isinstance(msg, P.AccountDeleted):
            self._emit(AccountDeletion(msg.deleted, sanitize(msg.reason, 512)))
        elif isinstance(msg, P.StoredMessage):
            self.mailbox.on_stored(msg)
        elif isinstance(msg, P.StoreResult):
            self.mailbox.on_store_result(msg)
        elif isinstance(msg, P.OfflineKey):
            self.mailbox.on_offline_key(msg)
        elif isinstance(msg, P.PrekeyStatus):
            self.mailbox.on_prekey_status(msg)
        elif isinstance(msg, P.RoomMessage):
            self.rooms.on_message(msg)
        elif isinstance(msg, P.RoomChanged):
            self.rooms.on_changed(msg)
        elif isinstance(msg, P.RoomSendResult):
            self.rooms.on_send_result(msg)
        elif isinstance(msg, P.RoomResult):
            self.rooms.on_result(msg)

    def _on_peer_status(self, msg: P.PeerStatus) -> None:
        peer = msg.peer
        if not msg.known:
            with self._state_lock:
                self._wanted.discard(peer)
                self._pending_open.discard(peer)
                self._presence[peer] = PRESENCE_UNKNOWN
                self._state_changed.notify_all()
            self._emit(PeerUnknown(sanitize(peer, 64)))
            return
        if not msg.online:
            with self._state_lock:
                self.conversations.pop(peer, None)  # keys discarded
                self._pending_open.discard(peer)
                self._auto_reopen.discard(peer)
                self._presence[peer] = PRESENCE_OFFLINE
                self._state_changed.notify_all()
            with self._direct_lock:
                if self._links is not None:
                    self._links.close(peer)
            self._emit(PeerOffline(peer))
            self.mailbox.resend_due(peer, live=False)  # what died with a connection is stored for them
            return
        with self._state_lock:
            # Only an unasked notice means the peer (re)connected: a new session of the peer
            # has none of our keys, so start over.  An answer to our own request does not.
            reopen = msg.notice and peer in self._wanted and peer not in self._pending_open
            if reopen:
                self._pending_open.add(peer)
                self._auto_reopen.add(peer)
                self.conversations.pop(peer, None)
            # The answer to a reopen we made on a notice repeats what the notice said: once is enough.
            repeat = not msg.notice and peer in self._auto_reopen
            if repeat:
                self._auto_reopen.discard(peer)
            self._presence[peer] = PRESENCE_ONLINE
            self._state_changed.notify_all()
        if not repeat:
            self._emit(PeerOnline(peer))
        if reopen:  # told again automatically: open (and key) the conversation, no user action
            self.send_frame(P.OpenConversation(peer=peer))

    def _on_key(self, msg: P.ConversationKey) -> None:
        """KDC key: check the peer's identity key, then send our signed DH share."""
        peer = msg.peer
        try:
            suite = cu.suite_by_id(msg.suite)
            P.normalize_username(peer)
            if len(msg.key) != suite.key_bytes or peer == self.username:
                raise DecryptionFailed()
        except SecureIMError:
            self._emit(ServerNotice("The server sent an unusable conversation key; it was ignored."))
            return
        assert self.peer_trust is not None and self.identity is not None and self.username is not None
        if not self.trust_peer(peer, msg.peer_identity):
            return
        with self._state_lock:
            conv = self.conversations.get(peer)
            if conv is None or conv.id != msg.conversation_id or conv.peer_identity != msg.peer_identity:
                conv = e2e.E2ESession(
                    self.username, self.identity, peer, msg.peer_identity, msg.conversation_id, suite
                )
                self.conversations[peer] = conv
                self._opened_by_peer[peer] = peer not in self._wanted
            try:
                share = conv.new_generation(msg.generation, msg.key)
            except DecryptionFailed:
                return  # a stale generation
            self._wanted.add(peer)
            self._pending_open.discard(peer)
            self._presence[peer] = PRESENCE_ONLINE
            self._state_changed.notify_all()
        self.send_frame(P.Relay(conversation_id=msg.conversation_id, payload=share))

    def trust_peer(self, peer: str, key: bytes) -> bool:
        """Pin on first use; a changed key is refused loudly, once per key, until /accept."""
        assert self.peer_trust is not None
        try:
            self.peer_trust.check(peer, key)
            return True
        except e2e.IdentityChanged as exc:
            with self._state_lock:
                # The same refused key again (the peer reconnected, or we reopened): warned already.
                known = self._changed_identity.get(peer)
                again = known is not None and cu.constant_time_equal(known, key)
                self._changed_identity[peer] = key
                self.conversations.pop(peer, None)
                self._pending_open.discard(peer)
                self._presence[peer] = PRESENCE_REFUSED
                self._state_changed.notify_all()
            self._pending_keys().put(peer, key)  # so /accept works after a restart too
            self.mailbox.forget_outbound(peer)
            if not again:
                self._emit(SecurityWarning(peer, str(exc)))
            return False

    def warn(self, peer: str, text: str) -> None:
        """A SecurityWarning about ``peer`` (the parts' way to say one)."""
        self._emit(SecurityWarning(peer, text))

    def reject(self, peer: str, reason: str) -> None:
        """A MessageRejected from ``peer`` (shown sanitized)."""
        self._emit(MessageRejected(sanitize(peer, 64), reason))

    def emit(self, event: object) -> None:
        """Queue an event for the user (the parts' way in; ``_emit`` stays the override hook)."""
        self._emit(event)

    def has_refused_key(self, peer: str) -> bool:
        """``peer`` presented a changed identity key that is not accepted yet."""
        return peer in self._changed_identity

    @property
    def stopping(self) -> threading.Event:
        """Set once close() was called: never reconnect (or work) again."""
        return self._stop

    def on_room_key_stored(self, msg: P.StoreResult) -> None:
        self.rooms.on_key_stored(msg)

    def on_opened(
        self,
        sender: str,
        opened: e2e.Opened,
        *,
        stored_at: float | None = None,
        direct: bool = False,
        identity: bytes | None = None,
    ) -> None:
        """An end-to-end message opened (live, direct or stored): show it, or mark what it receipts.
        ``identity``: the sender's identity key the session was with (a room checks it against its roster)."""
        if opened.kind == e2e.BODY_RECEIPT:
            self.mailbox.on_receipt(sender, opened.receipts)
            return
        if opened.kind == e2e.BODY_SENDER_KEY:  # a room's sender key (room_client.py): nothing to show
            self.rooms.on_sender_key(sender, opened.content, identity)
            return
        if self.mailbox.seen_before(sender, opened.msg_id):
            log.debug("a message resent after a reconnect was shown already")
        else:
            self._received(
                MessageReceived(sender, opened.text, opened.sent_at, direct=direct, stored_at=stored_at)
            )
        if self.receipts:
            self.mailbox.receipt(sender, opened.msg_id)

    def stored_event(self, entry: "offline.Outgoing") -> None:
        if entry.state == offline.REFUSED:  # the server's reason, or our own
            self._emit(MessageNotStored(entry.peer, entry.text, sanitize(entry.reason, 512)))
        else:
            self._emit(MessageStored(entry.peer, entry.text, online=entry.state == offline.HANDED))

    def delivered_event(self, entry: "offline.Outgoing", *, emit: bool = True) -> None:
        if self.history is not None and entry.row is not None:
            try:
                self.history.set_state(entry.row, H.STATE_DELIVERED)
            except HistoryError as exc:
                log.info("the history could not mark a message delivered: %s", exc)
        if emit:
            self._emit(MessageDelivered(entry.peer, entry.text, entry.stored))

    def barrier_after(self, msg: P.Message) -> "_Barrier":
        """Send ``msg`` and a WhoRequest: the barrier is done once every answer to ``msg`` is in."""
        barrier = _Barrier()
        self._check_not_reconnecting()
        with self._send_lock:
            self._who_waiters.append(barrier)
            try:
                self._send_locked(msg)
                self._send_locked(P.WhoRequest())
            except ConnectionClosed:
                self._who_waiters.remove(barrier)
                raise
        return barrier

    def send_live_body(self, peer: str, body_type: int, content: bytes) -> bool:
        """Seal in the live conversation with ``peer`` and relay; False when there is none ready."""
        with self._state_lock:
            conv = self.conversations.get(peer)
            if conv is None or not conv.ready:
                return False
            payload = conv.seal_body(body_type, e2e.new_msg_id(), content)
            cid = conv.id
        if self.is_direct(peer):  # over the direct link, as the messages it answers: the server sees none
            with self._direct_lock:
                assert self._links is not None
                message_id, datagrams = self._links.send(peer, payload, _now_ms())
                self._direct_sent[(peer, message_id)] = None  # a receipt: nothing to say if it is lost
            self._sendto(datagrams)
            return True
        self.send_frame(P.Relay(conversation_id=cid, payload=payload))
        return True

    def pending(self) -> list["offline.Outgoing"]:
        """Messages sent this session with no delivery receipt yet, oldest first."""
        return self.mailbox.pending()

    def _on_deliver(self, msg: P.Deliver) -> None:
        sender = msg.sender
        with self._state_lock:
            conv = self.conversations.get(sender)
            if conv is not None and conv.id != msg.conversation_id:
                conv = None
            refused = sender in self._changed_identity
        if conv is None or not msg.payload:
            if refused or msg.payload[:1] in (bytes([k]) for k in e2e.SHARE_KINDS):
                # the key share of a conversation we refused (the warning said what to do), or one
                # from before we dropped the conversation: a share carries no message
                log.debug("discarded a key share or message outside a conversation")
                return
            self._emit(
                MessageRejected(sanitize(sender, 64), "A message for an unknown conversation was discarded.")
            )
            return
        if msg.payload[0] in e2e.SHARE_KINDS:
            self._on_share(conv, msg.payload)
            return
        with self._state_lock:
            try:
                opened, failure = conv.open_message(msg.payload), ""
            except DecryptionFailed as exc:
                opened, failure = None, str(exc)
        if opened is None:
            self._emit(MessageRejected(sender, failure))
        else:
            self.on_opened(sender, opened, identity=conv.peer_identity)

    def _received(self, event: MessageReceived) -> None:
        if self.history is not None:
            self.history.record(event.peer, H.INCOMING, event.text, state=H.STATE_RECEIVED)
        self._emit(event)

    def _on_share(self, conv: e2e.E2ESession, payload: bytes) -> None:
        peer = conv.peer
        with self._state_lock:
            was_ready = conv.ready
            reply = None
            try:
                reply = conv.receive_share(payload)  # a share is answered with our ML-KEM reply
                generation = conv.current
                warning = None
            except e2e.StaleShare:
                log.debug("a key share for an earlier generation was ignored")
                return
            except e2e.ShareRejected as exc:
                warning = str(exc)
                if self.conversations.get(peer) is conv:
                    del self.conversations[peer]
            self._state_changed.notify_all()
        if warning is not None:
            self._emit(SecurityWarning(peer, warning))
        elif reply is not None:
            self.send_frame(P.Relay(conversation_id=conv.id, payload=reply))
        elif not was_ready and generation is not None:
            assert self.peer_trust is not None
            self.mailbox.forget_outbound(peer)  # live now: a later offline message starts afresh
            self.mailbox.resend_due(peer, live=True)  # what may have died with the last connection goes first
            self._emit(
                ConversationReady(
                    peer, generation, self._opened_by_peer.get(peer, False), self.peer_trust.is_verified(peer)
                )
            )

    # -- identities of peers --------------------------------------------------------
    def _pending_keys(self) -> "PendingKeys":
        assert self.peer_trust is not None
        return PendingKeys(self.peer_trust.path.with_name(self.peer_trust.path.name + ".changed"))

    def _changed_key(self, peer: str) -> bytes | None:
        with self._state_lock:
            key = self._changed_identity.get(peer)
        return key if key is not None else self._pending_keys().get(peer)

    def safety_number(self, peer: str) -> str | None:
        """The safety number with ``peer``'s pinned (or newly presented) identity key."""
        assert self.peer_trust is not None and self.identity is not None and self.username is not None
        key = self._changed_key(peer) or self.peer_trust.pinned(peer)
        if key is None:
            return None
        return e2e.safety_number(self.username, cu.public_bytes(self.identity), peer, key)

    def accept_identity(self, peer: str, *, reopen: bool = True) -> bool:
        """Accept ``peer``'s changed identity key (the one last presented, remembered across
        restarts of this client), then open the conversation again (``reopen=False``: the caller
        does, once it has said so, so that its line comes before the ConversationReady)."""
        assert self.peer_trust is not None
        key = self._changed_key(peer)
        if key is None:
            return False
        with self._state_lock:
            self._changed_identity.pop(peer, None)
            if self._presence.get(peer) == PRESENCE_REFUSED:
                del self._presence[peer]
        self.peer_trust.accept(peer, key)
        self._pending_keys().remove(peer)
        self.mailbox.forget_outbound(peer)
        self.mailbox.release_held(peer)  # stored messages that waited for this decision
        if reopen:
            self.open_conversation(peer)
        return True

    def mark_verified(self, peer: str) -> bool:
        assert self.peer_trust is not None
        return self.peer_trust.mark_verified(peer)

    def is_verified(self, peer: str) -> bool:
        return self.peer_trust is not None and self.peer_trust.is_verified(peer)

    # -- user actions ------------------------------------------------------------------
    def open_conversation(self, peer: str) -> None:
        """Ask for ``peer``: answered by PeerOnline/PeerOffline/PeerUnknown, then ConversationReady."""
        peer = P.normalize_username(peer)
        with self._state_lock:
            self._wanted.add(peer)
            self._pending_open.add(peer)
            if self._presence.get(peer) != PRESENCE_REFUSED:
                self._presence.pop(peer, None)  # the answer says it again
        self.send_frame(P.OpenConversation(peer=peer))

    def presence(self, peer: str) -> str | None:
        """What the server last said about ``peer`` (a PRESENCE_* value), or None."""
        with self._state_lock:
            return self._presence.get(peer)

    def open_conversations(self) -> list[str]:
        with self._state_lock:
            return sorted(p for p, conv in self.conversations.items() if conv.ready)

    def wait_conversation(self, peer: str, timeout_s: float = KEY_EXCHANGE_WAIT_S) -> bool:
        """Wait (bounded) while the conversation with ``peer`` is being opened or keyed;
        True once it is ready, False as soon as it cannot be (offline, unknown, refused)."""
        deadline = time.monotonic() + timeout_s
        with self._state_changed:
            while True:
                conv = self.conversations.get(peer)
                if conv is not None and conv.ready:
                    return True
                if self.closed.is_set() or self._presence.get(peer) in (
                    PRESENCE_OFFLINE,
                    PRESENCE_UNKNOWN,
                    PRESENCE_REFUSED,
                ):
                    return False
                if conv is None and peer not in self._pending_open:
                    return False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._state_changed.wait(remaining)

    def has_conversation(self, peer: str) -> bool:
        with self._state_lock:
            conv = self.conversations.get(peer)
            return conv is not None and conv.ready

    def send_message(self, peer: str, text: str) -> int | None:
        """Seal ``text`` end to end for ``peer``: directly over UDP if that link is up, else via the relay.

        Returns the history row of the message (None without a history).  The server gives no
        positive answer: a refusal comes later as a ServerNotice; :meth:`send_confirmed` waits
        for it.
        """
        return self.send_sealed(peer, text, None)

    def send_offline(self, peer: str, text: str) -> int | None:
        """Seal ``text`` for ``peer`` from their prekeys and hand it to the server's queue
        (docs/PROTOCOL.md section 15): a MessageStored or MessageNotStored event answers it,
        a MessageDelivered follows once their client has opened it."""
        peer = P.normalize_username(peer)
        if peer == self.username:
            raise MessageRefused("That is you; messages go to someone else.")
        if self.presence(peer) in (PRESENCE_UNKNOWN, PRESENCE_REFUSED):
            raise MessageRefused(f"Not sent to {peer}: {self.why_not_ready(peer)}.")
        entry = self._last_sent = self.mailbox.send_text(peer, text, e2e.new_msg_id())
        return self._record_sent(entry)

    def _record_sent(self, entry: "offline.Outgoing") -> int | None:
        """Write a message that has gone into the history.  Its receipt may have come meanwhile
        (on another thread): whichever of the two sees the other's write marks the row delivered."""
        entry.row = (
            self.history.record(entry.peer, H.OUTGOING, entry.text, state=H.STATE_SENT)
            if self.history
            else None
        )
        if entry.state == offline.DELIVERED and entry.row is not None:
            self.delivered_event(entry, emit=False)
        return entry.row

    def send_sealed(
        self, peer: str, text: str, barrier: "_Barrier | None", *, resend: "offline.Outgoing | None" = None
    ) -> int | None:
        """Seal and send live; the outbox entry and the history row are written only once the
        message has gone (a line that never left is queued by the terminal and written then).
        ``resend``: the same message again, under its own id (the peer shows it once)."""
        msg_id = resend.msg_id if resend is not None else e2e.new_msg_id()
        with self._state_lock:
            conv = self.conversations.get(peer)
            if conv is None or not conv.ready:
                raise ConnectionClosed(f"No open conversation with {peer}; they may be offline.")
            payload = conv.seal(text, msg_id)
            cid = conv.id
        if self.is_direct(peer):
            with self._direct_lock:
                assert self._links is not None
                message_id, datagrams = self._links.send(peer, payload, _now_ms())
                self._direct_sent[(peer, message_id)] = text
            self._sendto(datagrams)
            if barrier is not None:
                barrier.done.set()  # nothing to wait for: the direct link acknowledges by itself
        elif barrier is None:
            self.send_frame(P.Relay(conversation_id=cid, payload=payload))
        else:
            self._check_not_reconnecting()
            with (
                self._send_lock
            ):  # the barrier is queued before the message goes: its refusal cannot come first
                self._who_waiters.append(barrier)
                try:
                    self._send_locked(P.Relay(conversation_id=cid, payload=payload))
                    self._send_locked(P.WhoRequest())
                except ConnectionClosed:
                    self._who_waiters.remove(barrier)
                    raise
        if resend is not None:
            return None
        entry = self._last_sent = self.mailbox.sent_live(peer, text, msg_id)
        return self._record_sent(entry)

    def send_confirmed(
        self, peer: str, text: str, timeout_s: float = KEY_EXCHANGE_WAIT_S + REPLY_TIMEOUT_S
    ) -> "offline.Outgoing":
        """Open the conversation if needed, send, and return once the server has accepted the message
        (relayed to the peer's connection) or, the peer being offline, stored it for them.

        A relayed message has no positive answer, only an Error frame when it is refused.  So a
        WhoRequest follows it as a barrier: the server handles one session's frames in order, so
        once the WhoResponse is in, any refusal has arrived.  A stored message is answered by a
        StoreResult.  :class:`MessageRefused` with the server's reason if there was one (or if
        the conversation cannot be opened); :class:`ConnectionClosed` on a lost connection or no
        answer in time.  The returned entry's ``receipted`` event is set once the peer's client
        sends its end-to-end receipt (``state`` is then "delivered").
        """
        peer = P.normalize_username(peer)
        if peer == self.username:
            raise MessageRefused("That is you; messages go to someone else.")
        deadline = time.monotonic() + timeout_s
        if not self.has_conversation(peer):
            if (
                self.presence(peer) == PRESENCE_REFUSED
            ):  # asking again would only start a key exchange we refuse
                raise MessageRefused(f"Not sent to {peer}: {self.why_not_ready(peer)}.")
            self.open_conversation(peer)
            if not self.wait_conversation(peer, min(KEY_EXCHANGE_WAIT_S, timeout_s)):
                if self.presence(peer) != PRESENCE_OFFLINE:
                    raise MessageRefused(f"Not sent to {peer}: {self.why_not_ready(peer)}.")
                return self._store_confirmed(peer, text, deadline)
        barrier = _Barrier()
        row = self.send_sealed(peer, text, barrier)
        entry = self._last_sent
        if not barrier.done.wait(max(0.0, deadline - time.monotonic())):
            raise ConnectionClosed(f"The server at {self.node_id} did not answer in time.")
        if row is not None and self.history is not None:
            self.history.set_state(row, H.STATE_REFUSED if barrier.refusals else H.STATE_ACCEPTED)
        if barrier.refusals:
            raise MessageRefused(f"Not sent to {peer}: {barrier.refusals[0]}")
        assert entry is not None
        return entry

    def _store_confirmed(self, peer: str, text: str, deadline: float) -> "offline.Outgoing":
        row = self.send_offline(peer, text)
        entry = self._last_sent
        assert entry is not None
        if not entry.answered.wait(max(0.0, deadline - time.monotonic())):
            raise ConnectionClosed(f"The server at {self.node_id} did not answer in time.")
        entry = self.mailbox.entry(entry.msg_id) or entry
        if row is not None and self.history is not None:  # a row already 'delivered' stays so (History)
            self.history.set_state(
                row, H.STATE_REFUSED if entry.state == offline.REFUSED else H.STATE_ACCEPTED
            )
        if entry.state == offline.REFUSED:
            raise MessageRefused(f"Not sent to {peer}: {entry.reason}")
        return entry

    def why_not_ready(self, peer: str) -> str:
        """Why there is no conversation with ``peer``, in words (after :meth:`wait_conversation`)."""
        presence = self.presence(peer)
        if self.closed.is_set():
            return f"the connection to {self.node_id} is closed"
        if presence == PRESENCE_UNKNOWN:
            return f"{peer} does not exist"
        if presence == PRESENCE_OFFLINE:
            return f"{peer} is offline (a message to them is stored until they log in)"
        if presence == PRESENCE_REFUSED:
            return f"{peer}'s identity key changed and was refused (check the safety number, then accept it)"
        if presence == PRESENCE_ONLINE:
            return f"{peer}'s client did not complete the key exchange"
        return f"there is no conversation with {peer}"

    # -- the local history -------------------------------------------------------------------
    def history_page(self, peer: str, limit: int = 20) -> H.Page:
        """The last ``limit`` messages with ``peer``, oldest first (empty without a history)."""
        return self.history.last(P.normalize_username(peer), limit) if self.history else H.Page(())

    def forget(self, peer: str) -> int:
        """Erase the history of the conversation with ``peer``; how many messages went."""
        return self.history.forget(P.normalize_username(peer)) if self.history else 0

    # -- direct mode -------------------------------------------------------------------------
    def enable_direct(self) -> int:
        """Listen on UDP (on the address the server sees) and tell the server; returns the port."""
        assert self.sock is not None and self.proto.direct_ticket_key is not None
        if self._udp is None:
            self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._udp.bind((self.sock.getsockname()[0], 0))
            self._udp.settimeout(0.05)
            self._udp_thread = threading.Thread(target=self._udp_loop, name="direct", daemon=True)
            self._udp_thread.start()
        with self._direct_lock:
            self._links = direct.DirectLinks(self.proto.direct_ticket_key, self.username or "")
        port = self._udp.getsockname()[1]
        self.send_frame(P.RegisterEndpoint(port=port))
        return port

    def open_direct(self, peer: str) -> None:
        """Ask the server for ``peer``'s endpoint and a ticket; DirectReady or DirectFallback follows."""
        if self._links is None:
            self.enable_direct()
        peer = P.normalize_username(peer)
        if self.is_direct(peer):
            self._emit(DirectReady(peer))
            return
        self.send_frame(P.DirectRequest(peer=peer))

    def is_direct(self, peer: str) -> bool:
        with self._direct_lock:
            return self._links is not None and self._links.is_up(peer)

    def _on_direct_offer(self, msg: P.DirectOffer) -> None:
        if self.is_direct(msg.peer):
            return  # the peer dialled us meanwhile and that link is up: never replace a working link
        with self._state_lock:
            conv = self.conversations.get(msg.peer)
            keys = conv.direct_keys() if conv is not None and conv.ready else None
            generation = conv.current if conv is not None else None
        if keys is None or self._links is None or not 1 <= msg.port <= 65535:
            self._emit(DirectFallback(msg.peer, "the conversation is not secured yet"))
            return
        channel = direct.DatagramChannel(conv.suite, *keys)
        with self._direct_lock:
            if self._links.is_up(msg.peer):
                return  # checked again under the lock: the peer's HELLO may have brought it up just now
            datagrams = self._links.start(
                msg.peer, (msg.host, msg.port), channel, generation or 0, msg.ticket, _now_ms()
            )
        self._sendto(datagrams)

    def _channel_for(self, initiator: str, conversation_id: int, generation: int):
        with self._state_lock:
            conv = self.conversations.get(initiator)
            if conv is None or conv.id != conversation_id:
                return None
            try:
                keys = conv.direct_keys(generation)
            except SecureIMError:
                return None
            return direct.DatagramChannel(conv.suite, *keys)

    def _sendto(self, datagrams) -> None:
        for data, addr in datagrams:
            try:
                if self._udp is not None:
                    self._udp.sendto(data, addr)
            except OSError:
                pass  # UDP is lossy anyway: retransmission or the hello timeout handles it

    def _udp_loop(self) -> None:
        while not (self.closed.is_set() and self.sock is None):
            udp = self._udp
            if udp is None:
                return
            try:
                data, addr = udp.recvfrom(2048)
            except TimeoutError:
                data, addr = None, None
            except OSError:
                return
            now = _now_ms()
            with self._direct_lock:
                if self._links is None:
                    continue
                out, events = self._links.receive(data, addr, now, self._channel_for) if data else ([], [])
                more, later = self._links.poll(now)
            self._sendto(out + more)
            for event in events + later:
                self._on_link_event(event)

    def _on_link_event(self, event) -> None:
        if isinstance(event, direct.LinkUp):
            self._emit(DirectReady(event.peer))
        elif isinstance(event, direct.LinkFailed):
            self._emit(DirectFallback(event.peer, event.reason))
        elif isinstance(event, direct.LinkUndelivered):
            with self._direct_lock:
                text = self._direct_sent.pop((event.peer, event.message_id), "")
            if text is not None:
                self._emit(MessageUndelivered(event.peer, text))
        elif isinstance(event, direct.LinkMessage):
            with self._state_lock:
                conv = self.conversations.get(event.peer)
                try:
                    opened = conv.open_message(event.payload) if conv else None
                except DecryptionFailed:
                    opened = None
            if opened is None:
                self._emit(MessageRejected(event.peer, f"A direct message from {event.peer} was discarded."))
            else:
                self.on_opened(event.peer, opened, direct=True, identity=conv.peer_identity)

    def change_password(self, old_password: str, new_password: str) -> None:
        """Change this account's password (docs/PROTOCOL.md section 13).

        The server checks the old password and ends every resumption ticket of the
        account; this session gets a new one.  The identity key on this machine is
        sealed again under the new password (it opens with the password at login).
        Raises :class:`InvalidCredentials`, :class:`InvalidPassword`, :class:`AccountLocked`...
        """
        old, new = old_password.encode("utf-8"), new_password.encode("utf-8")
        if len(new) > P.MAX_PASSWORD_BYTES or len(old) > P.MAX_PASSWORD_BYTES:
            raise InvalidPassword(f"Passwords must be at most {P.MAX_PASSWORD_BYTES} bytes.")
        while True:  # an earlier answer that nobody waited for is stale
            try:
                self._password_reply.get_nowait()
            except queue.Empty:
                break
        self.send_frame(P.ChangePassword(old_password=old, new_password=new))
        try:
            reply = self._password_reply.get(timeout=REPLY_TIMEOUT_S)
        except queue.Empty:
            raise ConnectionClosed(f"The server at {self.server_id} did not answer in time.") from None
        if isinstance(reply, P.PasswordChangeFailed):
            if reply.code == P.AuthCode.LOCKED:
                raise AccountLocked(reply.retry_after_s)
            raise AUTH_ERRORS.get(reply.code, AuthError)(sanitize(reply.reason, 512))
        self._ticket = reply.ticket or None
        if self.persist_identity and self.identity is not None and self.username is not None:
            self.identities.save(self.username, new_password, self.identity)
        if self.history is not None:
            self.history.change_password(new_password)
        self.mailbox.change_password(new_password)  # the private prekeys, sealed again

    def who(self) -> None:
        """Ask who is online; the answer comes as a WhoList event."""
        self._send_who()

    def delete_account(self, password: str, confirm: str) -> None:
        """Ask the server to delete this account; the answer comes as an AccountDeletion event."""
        raw = password.encode("utf-8")
        if len(raw) > P.MAX_PASSWORD_BYTES or len(confirm.encode("utf-8")) > P.MAX_USERNAME_BYTES:
            raise InvalidPassword("That is not your password or username.")
        if confirm == self.username and self.rooms.my_rooms():
            # The server cannot sign a change: this client leaves its rooms itself (closing the ones it
            # administers) before the account goes, once the password is known to be right.
            if self.identity is None or self.identities.load(self.username, password) is None:
                raise InvalidPassword("Wrong password; nothing was deleted and you are still in your rooms.")
            self.rooms.leave_all()
        self.send_frame(P.DeleteAccount(password=raw, confirm=confirm))

    def next_event(self, timeout: float | None = None):
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self, timeout_s: float = 5.0) -> None:
        """Say Goodbye, half-close, and wait (bounded) until the server has let go of us."""
        if self.mailbox.store is not None and self.username is not None and not self.closed.is_set():
            # A client that quits right after its first login has prekeys on their way: let them land
            # (bounded), or nobody can write to this user while they are away.
            self.mailbox.published.wait(min(timeout_s, PUBLISH_WAIT_S))
        self._stop.set()
        try:
            self.mailbox.save()
        except OSError as exc:
            log.warning("the prekey store could not be saved: %s", exc)
        try:
            self._close_connection(timeout_s)
        finally:
            if self.history is not None:
                self.history.close()
                self.history = None

    def _close_connection(self, timeout_s: float) -> None:
        sock = self.sock
        if sock is None:
            self.closed.set()
            return
        self.closed.set()
        try:
            if self.proto.state in (P.State.ESTABLISHED, P.State.AUTHENTICATED):
                with self._send_lock:
                    sock.sendall(self.proto.send(P.Goodbye(reason="client quit")))
            sock.shutdown(socket.SHUT_WR)
        except (OSError, SecureIMError):
            pass
        if self._receiver is not None and self._receiver is not threading.current_thread():
            self._receiver.join(timeout=timeout_s)
        try:  # the server closes its end once it has processed our Goodbye
            sock.settimeout(timeout_s)
            while sock.recv(65536):
                pass
        except OSError:
            pass
        sock.close()
        self.sock = None
        if self._udp is not None:
            if self._udp_thread is not None and self._udp_thread is not threading.current_thread():
                self._udp_thread.join(timeout=2)
            self._udp.close()
            self._udp = None
