"""The secureim server: handshake, database-backed login, Key Distribution Center, relay.

Layers, top to bottom:
- ``ChatService``: what the server does with each typed message (login, presence,
  KDC, relay).  It never touches a socket.
- ``Registry``: the shared state (who is online, who waits for whom, live
  conversations), one object with one lock.
- ``Server`` / ``Session``: thin socket glue.  One reader thread per connection
  feeds bytes to the sans-IO ``protocol.ServerProtocol``; writes never block a
  thread on a slow reader (``Outbox`` + one flusher thread); a client that stops
  reading is dropped when its queue is full.

The relay opens only the outer (session) layer: the payload inside a Relay is
sealed end to end by the clients, and is forwarded as opaque bytes.

Run ``python server.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import crypto_utils as cu
import direct
import protocol as P
from auth import DEFAULT_BCRYPT_COST, AuthService
from protocol import normalize_username
from puzzle import PuzzleGate
from metrics import MetricsEndpoint, ServerMetrics
from moderation import DEFAULT_AUDIT_RETENTION_DAYS, AddressBans, ModerationPoller, ban_message
from tickets import TicketIssuer, load_or_create_ticket_key
from database import Storage, open_storage
from errors import (
    AccountLocked,
    AuthError,
    ConfigError,
    ConnectionClosed,
    DatabaseError,
    InvalidCredentials,
    InvalidPassword,
    InvalidUsername,
    ProtocolError,
    SecureIMError,
    ServiceUnavailable,
    UsernameTaken,
)

log = logging.getLogger("secureim.server")

DEFAULT_PORT = P.DEFAULT_PORT
DEFAULT_DATA_DIR = "secureim-data"
IDENTITY_FILE = "server_identity.key"
RECV_BYTES = 64 * 1024


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    db_url: str | None = None            # default: sqlite under data_dir
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    cipher: str = cu.DEFAULT_SUITE
    bcrypt_cost: int = DEFAULT_BCRYPT_COST
    login_grace_s: float = 30.0          # OpenSSH LoginGraceTime is 120 s; a chat login is quicker
    max_auth_tries: int = 6              # OpenSSH MaxAuthTries
    rekey_after_messages: int = 1000     # conversation key lifetime, in relayed messages
    rekey_after_s: float = 3600.0        # ... and in time
    min_rekey_interval_s: float = 1.0    # never faster: key shares count as relays too, so rekeys could cascade
    outbox_limit_bytes: int = 1 << 20    # a client that stops reading is dropped past this
    max_connections: int = 20000
    max_unauthenticated: int = 256       # OpenSSH MaxStartups-style cap on half-open sessions
    max_unauthenticated_per_source: int = 32
    connections_per_source_per_s: float = 20.0   # token bucket per source address...
    connection_burst_per_source: int = 60        # ...and its burst
    puzzle_mode: str = "auto"            # off | auto (under load) | always
    puzzle_bits: int = 16                # base difficulty; grows with load up to puzzle.MAX_DIFFICULTY
    puzzle_load_threshold: int = 64      # half-open connections before "auto" asks for work
    allowed_groups: frozenset[str] | None = None
    tdes_backend: str | None = None
    max_failures: int = 5
    lock_s: float = 60.0
    metrics_port: int | None = None      # Prometheus /metrics and /healthz on 127.0.0.1 (0 = any free port)
    audit_retention_days: float = DEFAULT_AUDIT_RETENTION_DAYS
    node_name: str = ""                  # default: hostname:port (the admin `sessions` list shows it)

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{Path(self.data_dir) / 'secureim.db'}"


# =============================================================================
# Outgoing bytes: never block a thread on a slow reader
# =============================================================================
LINGER_S = 1.0
LINGER_MAX_BYTES = 1 << 20


def _linger_close(sock: socket.socket) -> None:
    """Half-close after a farewell and read what is still arriving (bounded), so the close
    sends FIN, not RST: an RST can destroy the farewell before the peer reads it."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(LINGER_S)
        deadline, drained = time.monotonic() + LINGER_S, 0
        while drained < LINGER_MAX_BYTES and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass


class Flusher:
    """One thread that finishes writes the kernel could not take at once."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="flusher", daemon=True)
        self._thread.start()

    def watch(self, outbox: "Outbox") -> None:
        with self._lock:
            try:
                self._selector.register(outbox.sock, selectors.EVENT_WRITE, outbox)
            except (KeyError, ValueError, OSError):
                return
        self._wake()

    def unwatch(self, outbox: "Outbox") -> None:
        with self._lock:
            try:
                self._selector.unregister(outbox.sock)
            except (KeyError, ValueError, OSError):
                pass

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0", socket.MSG_DONTWAIT)
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stopped:
            events = self._selector.select(timeout=1.0)
            for key, _mask in events:
                if key.data is None:
                    try:
                        self._wake_r.recv(4096)
                    except OSError:
                        pass
                    continue
                key.data.flush_pending()

    def stop(self) -> None:
        self._stopped = True
        self._wake()
        self._thread.join(timeout=5)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


class Outbox:
    """A connection's outgoing bytes: sent at once when possible, else queued (bounded)."""

    def __init__(self, sock: socket.socket, flusher: Flusher, limit: int) -> None:
        self.sock = sock
        self._flusher = flusher
        self._limit = limit
        self._pending = bytearray()
        self._watched = False
        self._lock = threading.Lock()
        self.closed = False

    def write(self, data: bytes) -> None:
        with self._lock:
            if self.closed:
                raise ConnectionClosed()
            if len(self._pending) + len(data) > self._limit:
                self._close_locked()
                raise ConnectionClosed("The client stopped reading; its queue is full.")
            self._pending += data
            if not self._watched:
                self._flush_locked()

    def _flush_locked(self) -> None:
        if self._pending:
            try:
                sent = self._send_locked(bytes(self._pending))
            except ConnectionClosed:
                return
            del self._pending[:sent]
        if self._pending and not self._watched:
            self._watched = True
            self._flusher.watch(self)
        elif not self._pending and self._watched:
            self._watched = False
            self._flusher.unwatch(self)

    def _send_locked(self, data: bytes) -> int:
        try:
            return self.sock.send(data, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            self._close_locked()
            raise ConnectionClosed() from None

    @property
    def pending_bytes(self) -> int:
        return len(self._pending)

    def flush_pending(self) -> None:
        """Called by the flusher when the socket is writable again."""
        with self._lock:
            if self.closed:
                self._flusher.unwatch(self)
                return
            self._flush_locked()

    def _close_locked(self) -> None:
        self.closed = True
        self._watched = False
        self._flusher.unwatch(self)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader thread
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            if not self.closed and self._pending and not self._watched:
                try:  # a last try for what is queued (a Goodbye, say); never blocks
                    self._send_locked(bytes(self._pending))
                except ConnectionClosed:
                    pass
            self._close_locked()


# =============================================================================
# Sessions and the registry
# =============================================================================
class Session:
    """One client connection: its protocol state machine and its outbox."""

    def __init__(self, proto: P.ServerProtocol, outbox: Outbox | None, source: str) -> None:
        self.proto = proto
        self.outbox = outbox
        self.source = source
        self.username: str | None = None
        self.auth_attempts = 0
        self.identity_key: bytes | None = None  # the user's Ed25519 public key, handed to peers
        self.udp_port: int | None = None          # direct mode: where this client listens
        self.lock = threading.Lock()     # one lock: seal + enqueue keep the sequence order
        self.closed = threading.Event()

    def send(self, msg: P.Message) -> bool:
        """Seal and queue ``msg``; False if this session is gone."""
        with self.lock:
            if self.closed.is_set() or not self.proto.established:
                return False
            try:
                data = self.proto.send(msg)
                if self.outbox is not None:
                    self.outbox.write(data)
            except (ConnectionClosed, ProtocolError):
                self.closed.set()
                return False
        return True

    def receive(self, data: bytes) -> tuple[list, bytes]:
        with self.lock:
            events = self.proto.receive_data(data)
            return events, self.proto.data_to_send()

    def write_raw(self, data: bytes) -> None:
        if data and self.outbox is not None:
            self.outbox.write(data)

    def close(self, reason: str | None = None) -> None:
        if reason and self.proto.established:
            self.send(P.Goodbye(reason=reason))
        self.closed.set()
        if self.outbox is not None:
            self.outbox.close()


class SourceRateLimiter:
    """A token bucket per source address (bounded memory: the stalest entries go first)."""

    MAX_SOURCES = 100_000

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate_per_s, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, source: str) -> bool:
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(source, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            allowed = tokens >= 1.0
            self._buckets[source] = (tokens - 1.0 if allowed else tokens, now)  # re-insert: newest last
            while len(self._buckets) > self.MAX_SOURCES:
                del self._buckets[next(iter(self._buckets))]
            return allowed


@dataclass
class LiveConversation:
    id: int
    members: tuple[str, str]
    generation: int
    keyed_at: float
    messages: int = 0
    bytes_relayed: int = 0


@dataclass
class Registry:
    """Shared server state, one lock.  Methods copy before the caller iterates."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    online: dict[str, Session] = field(default_factory=dict)
    watchers: dict[str, set[str]] = field(default_factory=dict)   # offline user -> who waits
    conversations: dict[int, LiveConversation] = field(default_factory=dict)
    sessions: set[Session] = field(default_factory=set)
    unauthenticated: dict[str, int] = field(default_factory=dict)  # source -> count

    def unauthenticated_total(self) -> int:
        with self.lock:
            return sum(self.unauthenticated.values())

    def add_connection(self, session: Session, max_total: int, max_unauth: int, max_unauth_per_source: int) -> str | None:
        """Admit a new connection, or return why not."""
        with self.lock:
            if len(self.sessions) >= max_total:
                return "too many connections"
            if sum(self.unauthenticated.values()) >= max_unauth:
                return "too many unauthenticated connections"
            if self.unauthenticated.get(session.source, 0) >= max_unauth_per_source:
                return "too many unauthenticated connections from this address"
            self.sessions.add(session)
            self.unauthenticated[session.source] = self.unauthenticated.get(session.source, 0) + 1
            return None

    def _unauth_done(self, source: str) -> None:
        n = self.unauthenticated.get(source, 0) - 1
        if n > 0:
            self.unauthenticated[source] = n
        else:
            self.unauthenticated.pop(source, None)

    def login(self, session: Session, username: str) -> tuple[Session | None, set[str]]:
        """Mark ``username`` online; returns the replaced session and who should be told."""
        with self.lock:
            old = self.online.get(username)
            self.online[username] = session
            if session.username is None:
                self._unauth_done(session.source)
            session.username = username
            waiting = self.watchers.pop(username, set())
            if old is not None and old is not session:
                # The new session has no conversation keys: its peers re-open (and re-key).
                waiting |= set(self._drop_conversations_locked(username, watch=False))
        return old, waiting

    def _drop_conversations_locked(self, username: str, *, watch: bool) -> list[str]:
        peers = []
        for cid, conv in list(self.conversations.items()):
            if username in conv.members:
                peer = conv.members[0] if conv.members[1] == username else conv.members[1]
                peers.append(peer)
                del self.conversations[cid]
                if watch:  # the peer is told when this user is back
                    self.watchers.setdefault(username, set()).add(peer)
        return peers

    def remove(self, session: Session) -> tuple[bool, list[str]]:
        """Forget a closed session; returns (was online, peers of its live conversations)."""
        with self.lock:
            self.sessions.discard(session)
            if session.username is None:
                self._unauth_done(session.source)
                return False, []
            if self.online.get(session.username) is not session:
                return False, []  # replaced by a newer login
            del self.online[session.username]
            return True, self._drop_conversations_locked(session.username, watch=True)

    def session_of(self, username: str) -> Session | None:
        with self.lock:
            return self.online.get(username)

    def watch(self, watcher: str, target: str) -> None:
        with self.lock:
            self.watchers.setdefault(target, set()).add(watcher)

    def online_users(self) -> list[str]:
        with self.lock:
            return sorted(self.online)

    def all_sessions(self) -> list[Session]:
        with self.lock:
            return list(self.sessions)


def _loggable(raw: str) -> str:
    """A username as it may appear in a log line: normalised and quoted, or "an invalid username"."""
    try:
        return repr(normalize_username(raw))
    except AuthError:
        return "an invalid username"


# =============================================================================
# The service: what each message means
# =============================================================================
class ChatService:
    """Login, presence, KDC and relay.  No sockets; tests drive it directly."""

    def __init__(self, storage: Storage, config: ServerConfig,
                 announce: Callable[[str], None] = lambda line: None) -> None:
        self.storage = storage
        self.config = config
        self.suite = cu.get_suite(config.cipher, tdes_backend=config.tdes_backend)
        self.auth = AuthService(storage, bcrypt_cost=config.bcrypt_cost,
                                max_failures=config.max_failures, lock_s=config.lock_s)
        self.registry = Registry()
        self.announce = announce
        self.tickets = TicketIssuer(load_or_create_ticket_key(Path(config.data_dir)))
        self._kdc_lock = threading.Lock()
        # Operating the server (moderation.py, metrics.py): bans, kicks, the audit log, counters.
        self.metrics = ServerMetrics()
        self.address_bans = AddressBans()
        self.node = config.node_name or socket.gethostname()

    # -- operating the server: audit, bans, kicks --------------------------------------
    def audit(self, event: str, username: str = "", source: str = "", detail: str = "") -> None:
        """One audit row; never a password, key or message.  A failed write is logged, never fatal."""
        try:
            self.storage.audit(event, username, source, detail)
        except DatabaseError as exc:
            self.metrics.audit_failures.inc()
            log.warning("audit %s not recorded: %s", event, exc)

    def _refuse_if_banned(self, session: Session, username: str | None) -> bool:
        """Network bans before any password work; account bans after it.  True if refused."""
        ban = self.address_bans.match(session.source)
        if ban is not None:  # the cache says banned: re-read, so a lifted ban counts at once
            self.address_bans.load(self.storage.active_bans(time.time(), kind="address"))
            ban = self.address_bans.match(session.source)
        if ban is None and username is not None:
            ban = self.storage.user_ban(username, time.time())
        if ban is None:
            return False
        self.metrics.logins.labels("banned").inc()
        self.audit("login_banned", username or "", session.source, ban.kind)
        session.send(P.AuthFailed(code=P.AuthCode.BANNED, retry_after_s=0, reason=ban_message(ban)))
        session.close()
        return True

    def password_changed(self, username: str, source: str) -> int:
        """The hook for a password change (/passwd): call it once the new hash is stored.

        Raises the account's ticket epoch, so every resumption ticket issued before is
        void (docs/PROTOCOL.md section 7.1), and writes the audit row (never the
        password).  Returns the new epoch, to issue the changing session a fresh ticket:
        ``self.tickets.issue(username, session.identity_key, epoch)``."""
        self.storage.bump_ticket_epoch(username)
        self.audit("password_change", username, source)
        return self.storage.get_ticket_epoch(username) or 0

    def kick(self, username: str, reason: str) -> bool:
        """End ``username``'s session here, telling them why; False if not online here."""
        session = self.registry.session_of(username)
        if session is None:
            return False
        self.metrics.kicks.inc()
        session.close(reason[:P.MAX_REASON_BYTES // 2] or "An administrator ended your session.")
        return True

    def kick_banned_sources(self) -> int:
        """End every session whose address a network ban now covers."""
        ended = 0
        for session in self.registry.all_sessions():
            ban = self.address_bans.match(session.source)
            if ban is not None:
                self.metrics.kicks.inc()
                session.close(ban_message(ban))
                ended += 1
        return ended

    # -- dispatch ----------------------------------------------------------------
    def handle(self, session: Session, msg: P.Message) -> None:
        handler = self._HANDLERS.get(type(msg))
        if handler is None:
            return  # Goodbye: the protocol already closed the session
        try:
            handler(self, session, msg)
        except ServiceUnavailable as exc:
            log.warning("service unavailable: %s", exc)
            if session.username is None:
                session.send(P.AuthFailed(code=P.AuthCode.UNAVAILABLE, retry_after_s=5,
                                          reason="The server cannot check logins right now; try again later."))
            else:
                session.send(P.Error(code=P.ErrorCode.UNAVAILABLE,
                                     reason="The server's database is unavailable; try again later."))
        except DatabaseError:
            log.exception("database error")
            session.send(P.Error(code=P.ErrorCode.UNAVAILABLE, reason="Internal database error; try again later."))

    # -- accounts ------------------------------------------------------------------
    def _auth(self, session: Session, msg: P.Login | P.Register) -> None:
        session.auth_attempts += 1
        register = isinstance(msg, P.Register)
        if self._refuse_if_banned(session, None):
            return
        try:
            cu.load_public_key(msg.identity_key)
        except SecureIMError:
            self._auth_failed(session, P.AuthCode.INVALID_IDENTITY, "The identity key is not a valid Ed25519 key.")
            return
        try:
            if register:
                username = self.auth.register(msg.username, msg.password, session.source, msg.identity_key)
            else:
                username = self.auth.login(msg.username, msg.password, session.source)
                if self.storage.get_identity_key(username) != msg.identity_key:
                    # A new device or reinstall: peers will see the change and must accept it.
                    self.storage.set_identity_key(username, msg.identity_key)
                    log.info("a user registered a new identity key")
                    self.audit("identity_key_changed", username, session.source)
        except AccountLocked as exc:
            self._auth_failed(session, P.AuthCode.LOCKED, str(exc), exc.retry_after_s, _loggable(msg.username),
                              username=msg.username)
            return
        except InvalidCredentials as exc:
            self._auth_failed(session, P.AuthCode.INVALID_CREDENTIALS, str(exc), who=_loggable(msg.username),
                              username=msg.username)
            return
        except (InvalidUsername, InvalidPassword, UsernameTaken) as exc:
            code = {InvalidUsername: P.AuthCode.INVALID_USERNAME, InvalidPassword: P.AuthCode.INVALID_PASSWORD,
                    UsernameTaken: P.AuthCode.USERNAME_TAKEN}[type(exc)]
            self._auth_failed(session, code, str(exc), username=msg.username)
            return
        session.identity_key = msg.identity_key
        self._logged_in(session, username, created=register)

    def _resume(self, session: Session, msg: P.Resume) -> None:
        """A resumption ticket instead of the password: no bcrypt; one database read (the epoch)."""
        session.auth_attempts += 1
        if self._refuse_if_banned(session, None):
            return
        try:  # the account's ticket epoch: a reset, changed or deleted account's tickets are void
            username, epoch = self.tickets.redeem_with_epoch(msg.ticket, msg.identity_key)
            if epoch != self.storage.get_ticket_epoch(username):  # password changed since (or no such user)
                raise InvalidCredentials("The session ticket is invalid or expired; log in with your password.")
        except InvalidCredentials as exc:
            self._auth_failed(session, P.AuthCode.INVALID_CREDENTIALS, str(exc), who="a session ticket")
            return
        session.identity_key = msg.identity_key
        self._logged_in(session, username, created=False, how="resume")

    def _auth_failed(self, session: Session, code: P.AuthCode, reason: str, retry_after_s: int = 0,
                     who: str = "an invalid username", username: str = "") -> None:
        # Seen at the default level (an operator watches for guessing); never the password.
        if code == P.AuthCode.LOCKED:
            log.warning("login refused from %s for %s: locked for %d s after repeated failures",
                        session.source, who, retry_after_s)
        elif code == P.AuthCode.INVALID_CREDENTIALS:
            log.warning("failed login from %s for %s", session.source, who)
        else:
            log.info("login failed from %s: %s", session.source, code.name)
        locked = code == P.AuthCode.LOCKED
        self.metrics.logins.labels("locked" if locked else "failed").inc()
        self.audit("lockout" if locked else "login_failed", username, session.source, code.name)
        if session.auth_attempts >= self.config.max_auth_tries:
            session.send(P.AuthFailed(code=P.AuthCode.TOO_MANY_ATTEMPTS, retry_after_s=retry_after_s,
                                      reason=f"{reason} Too many attempts on this connection."))
            session.close()
            return
        session.send(P.AuthFailed(code=code, retry_after_s=retry_after_s, reason=reason))

    def _logged_in(self, session: Session, username: str, created: bool, how: str = "login") -> None:
        if self._refuse_if_banned(session, username):
            return
        epoch = self.storage.get_ticket_epoch(username)  # read once: the ticket below carries it
        if epoch is None:  # deleted a moment ago
            self._auth_failed(session, P.AuthCode.INVALID_CREDENTIALS, "Unknown user or wrong password.")
            return
        old, waiting = self.registry.login(session, username)
        if old is not None and old is not session:
            # Decision: a new login replaces the old session (docs/PROTOCOL.md, section 7).
            old.close("You signed in from another place; this session was closed.")
        assert session.identity_key is not None
        session.send(P.AuthOk(username=username, created=created,
                              ticket=self.tickets.issue(username, session.identity_key, epoch)))
        self.metrics.logins.labels("ok").inc()
        try:  # last login, the session row and the audit row, in one transaction
            self.storage.record_session_start(self.node, username, session.source, time.time(),
                                              "register" if created else how)
        except DatabaseError as exc:
            self.metrics.audit_failures.inc()
            log.warning("login bookkeeping failed: %s", exc)
        self.announce(f"[SERVER]: {username} connected from {session.source}."
                      f" ({len(self.registry.online)} online)")
        for watcher in waiting:
            peer_session = self.registry.session_of(watcher)
            if peer_session is not None:
                peer_session.send(P.PeerStatus(peer=username, online=True, known=True, notice=True))

    def disconnected(self, session: Session) -> None:
        was_online, peers = self.registry.remove(session)
        if not was_online or session.username is None:
            return
        self.announce(f"[SERVER]: {session.username} disconnected. ({len(self.registry.online)} online)")
        try:
            self.storage.session_ended(self.node, session.username)
        except DatabaseError as exc:
            log.warning("session bookkeeping failed: %s", exc)
        for peer in peers:
            peer_session = self.registry.session_of(peer)
            if peer_session is not None:
                peer_session.send(P.PeerStatus(peer=session.username, online=False, known=True, notice=True))

    # -- presence and the KDC ------------------------------------------------------
    def _open(self, session: Session, msg: P.OpenConversation) -> None:
        me = session.username
        assert me is not None
        try:
            peer = normalize_username(msg.peer)
        except AuthError:
            session.send(P.PeerStatus(peer=msg.peer, online=False, known=False))
            return
        if peer == me:
            session.send(P.Error(code=P.ErrorCode.BAD_REQUEST,
                                 reason="You cannot open a conversation with yourself."))
            return
        peer_session = self.registry.session_of(peer)
        if peer_session is None:
            known = self.storage.get_password_hash(peer) is not None
            if known:
                self.registry.watch(me, peer)
            session.send(P.PeerStatus(peer=peer, online=False, known=known))
            return
        session.send(P.PeerStatus(peer=peer, online=True, known=True))
        cid = self.storage.open_conversation(me, peer)
        self._distribute_key(cid, (me, peer) if me < peer else (peer, me))

    def _distribute_key(self, cid: int, members: tuple[str, str]) -> None:
        """KDC: a fresh key for the conversation, sent to both members, then forgotten."""
        with self._kdc_lock:
            generation = self.storage.record_key_generation(cid)
            key = self.suite.generate_key()
            with self.registry.lock:
                self.registry.conversations[cid] = LiveConversation(cid, members, generation, time.monotonic())
            sessions = {user: self.registry.session_of(user) for user in members}
            for user in members:
                other = members[1] if user == members[0] else members[0]
                mine, theirs = sessions[user], sessions[other]
                if mine is not None and theirs is not None and theirs.identity_key is not None:
                    mine.send(P.ConversationKey(conversation_id=cid, peer=other, suite=self.suite.suite_id,
                                                generation=generation, key=key, peer_identity=theirs.identity_key))
            del key  # never stored (design 000)

    # -- relay -------------------------------------------------------------------------
    def _relay(self, session: Session, msg: P.Relay) -> None:
        started = time.perf_counter()
        me = session.username
        with self.registry.lock:
            conv = self.registry.conversations.get(msg.conversation_id)
            if conv is not None and me in conv.members:
                conv.messages += 1
                conv.bytes_relayed += len(msg.payload)
                age = time.monotonic() - conv.keyed_at
                due = age >= self.config.min_rekey_interval_s and (
                    conv.messages >= self.config.rekey_after_messages
                    or conv.bytes_relayed >= self.suite.max_bytes_per_key // 2
                    or age >= self.config.rekey_after_s)
                peer = conv.members[0] if conv.members[1] == me else conv.members[1]
                peer_session = self.registry.online.get(peer)
            else:
                conv = None
        if conv is None:
            self.metrics.undelivered.inc()
            session.send(P.Error(code=P.ErrorCode.NOT_A_MEMBER,
                                 reason="No such conversation; open it again."))
            return
        if peer_session is None or not peer_session.send(
                P.Deliver(conversation_id=msg.conversation_id, sender=me, payload=msg.payload)):
            self.metrics.undelivered.inc()
            session.send(P.Error(code=P.ErrorCode.PEER_OFFLINE, reason=f"{peer} is offline; message not delivered."))
            return
        self.metrics.relayed.inc()
        self.metrics.relay_latency.observe(time.perf_counter() - started)
        if due:
            self._distribute_key(conv.id, conv.members)

    # -- direct mode: endpoints and tickets (docs/PROTOCOL.md section 12.2) ----------
    def _register_endpoint(self, session: Session, msg: P.RegisterEndpoint) -> None:
        if not 1 <= msg.port <= 65535:
            session.send(P.Error(code=P.ErrorCode.BAD_REQUEST, reason="A UDP port is between 1 and 65535."))
            return
        session.udp_port = msg.port

    def _direct_request(self, session: Session, msg: P.DirectRequest) -> None:
        """Hand the initiator the peer's endpoint and a ticket only the peer can open."""
        me, peer = session.username, msg.peer
        peer_session = self.registry.session_of(peer)
        with self.registry.lock:
            conv = next((c for c in self.registry.conversations.values() if set(c.members) == {me, peer}), None)
        why = None
        if peer_session is None:
            why = f"{peer} is offline."
        elif conv is None:
            why = f"Open a conversation with {peer} first."
        elif peer_session.udp_port is None or session.udp_port is None:
            why = f"{peer} does not accept direct connections." if session.udp_port else "Register a UDP port first."
        if why is not None:
            session.send(P.DirectUnavailable(peer=peer, reason=why))
            if peer_session is not None and conv is not None and peer_session.udp_port is None \
                    and session.udp_port is not None and me is not None:
                peer_session.send(P.DirectAsked(peer=me))  # the peer has not opted in: tell them who asks
            return
        key = peer_session.proto.direct_ticket_key
        assert key is not None and conv is not None and me is not None
        ticket = direct.seal_ticket(key, initiator=me, host=session.source, port=session.udp_port,
                                    conversation_id=conv.id, now_s=time.time())
        session.send(P.DirectOffer(peer=peer, host=peer_session.source, port=peer_session.udp_port, ticket=ticket))

    # -- password change (docs/PROTOCOL.md section 13) ------------------------------------
    def _change_password(self, session: Session, msg: P.ChangePassword) -> None:
        me = session.username
        assert me is not None and session.identity_key is not None
        try:
            epoch = self.auth.change_password(me, msg.old_password, msg.new_password, session.source)
        except AccountLocked as exc:
            log.warning("password change refused from %s for %r: locked for %d s", session.source, me,
                        exc.retry_after_s)
            session.send(P.PasswordChangeFailed(code=P.AuthCode.LOCKED, retry_after_s=exc.retry_after_s,
                                                reason=str(exc)))
            return
        except InvalidCredentials:
            log.warning("failed password change from %s for %r: wrong old password", session.source, me)
            session.send(P.PasswordChangeFailed(code=P.AuthCode.INVALID_CREDENTIALS, retry_after_s=0,
                                                reason="The old password is wrong; the password was not changed."))
            return
        except InvalidPassword as exc:
            session.send(P.PasswordChangeFailed(code=P.AuthCode.INVALID_PASSWORD, retry_after_s=0, reason=str(exc)))
            return
        except ServiceUnavailable as exc:
            log.warning("service unavailable: %s", exc)
            session.send(P.PasswordChangeFailed(code=P.AuthCode.UNAVAILABLE, retry_after_s=5,
                                                reason="The server's database is unavailable; try again later."))
            return
        log.info("%r changed their password from %s; their earlier session tickets have ended", me, session.source)
        self.audit("password_change", me, session.source)
        session.send(P.PasswordChanged(ticket=self.tickets.issue(me, session.identity_key, epoch)))

    def _who(self, session: Session, msg: P.WhoRequest) -> None:
        users = self.registry.online_users()
        session.send(P.WhoResponse(users=tuple(users[:P.MAX_WHO_USERS]), total=len(users)))

    # -- account self-service (docs/PROTOCOL.md section 14.1) -------------------------
    def _delete_account(self, session: Session, msg: P.DeleteAccount) -> None:
        """The password again (bcrypt, with the login lockout) and the username typed; then it is all gone."""
        me = session.username
        assert me is not None
        if msg.confirm != me:
            session.send(P.AccountDeleted(deleted=False, reason="The confirmation is not your username; "
                                                                "nothing was deleted."))
            return
        try:
            self.auth.login(me, msg.password, session.source)
        except AccountLocked as exc:
            self.audit("lockout", me, session.source, "DeleteAccount")
            session.send(P.AccountDeleted(deleted=False, reason=str(exc)))
            return
        except InvalidCredentials:
            self.audit("delete_account_failed", me, session.source, "wrong password")
            session.send(P.AccountDeleted(deleted=False, reason="Wrong password; nothing was deleted."))
            return
        self.storage.delete_user(me)
        self.audit("delete_account", me, session.source)
        session.send(P.AccountDeleted(deleted=True, reason="Your account and everything the server kept for it "
                                                           "were deleted."))
        session.close("Your account was deleted.")

    _HANDLERS = {P.Login: _auth, P.Register: _auth, P.Resume: _resume, P.OpenConversation: _open,
                 P.Relay: _relay, P.WhoRequest: _who, P.RegisterEndpoint: _register_endpoint,
                 P.DirectRequest: _direct_request, P.ChangePassword: _change_password}
    _HANDLERS[P.DeleteAccount] = _delete_account


# =============================================================================
# The socket server
# =============================================================================
class Server:
    """Binds, accepts, and runs one reader thread per connection.

    The constructor loads keys and opens the database but does not listen;
    ``start()`` binds (port 0 picks a free port), ``serve_forever()`` accepts,
    ``shutdown()`` stops everything and closes the database.
    """

    def __init__(self, config: ServerConfig, announce: Callable[[str], None] = lambda line: None,
                 storage: Storage | None = None) -> None:
        self.config = config
        self.announce = announce
        data_dir = Path(config.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.identity = cu.load_or_create_identity(data_dir / IDENTITY_FILE)
        self.fingerprint = cu.fingerprint(self.identity.public_key())
        self.storage = storage or open_storage(config.database_url)
        self.service = ChatService(self.storage, config, announce)
        self.rate_limiter = SourceRateLimiter(config.connections_per_source_per_s, config.connection_burst_per_source)
        self.puzzle = PuzzleGate(config.puzzle_mode, base_difficulty=config.puzzle_bits,
                                 load_threshold=config.puzzle_load_threshold,
                                 load=self.service.registry.unauthenticated_total)
        self._listener: socket.socket | None = None
        self._flusher: Flusher | None = None
        self._stopping = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()
        self.moderation = ModerationPoller(self.storage, self.service.address_bans, kick=self.service.kick,
                                           kick_banned_sources=self.service.kick_banned_sources,
                                           audit_retention_s=config.audit_retention_days * 86400)
        self.metrics_endpoint: MetricsEndpoint | None = None

    def start(self) -> tuple[str, int]:
        listener = socket.create_server((self.config.host, self.config.port), backlog=1024, reuse_port=False)
        self._listener = listener
        self._flusher = Flusher()
        host, port = self.server_address
        if not self.config.node_name:
            self.service.node = f"{socket.gethostname()}:{port}"[:64]
        try:
            self.storage.clear_sessions(self.service.node)  # rows a crashed run of this node left
        except DatabaseError as exc:
            log.warning("cannot clear old session rows: %s", exc)
        self.moderation.start()
        if self.config.metrics_port is not None:
            self._start_metrics()
        return host, port

    def _start_metrics(self) -> None:
        registry, auth = self.service.registry, self.service.auth
        self.service.metrics.watch(
            open_connections=lambda: len(registry.all_sessions()),
            online_users=lambda: len(registry.online_users()),
            outbox_bytes=lambda: sum(s.outbox.pending_bytes for s in registry.all_sessions() if s.outbox),
            bcrypt_queue=lambda: auth._bcrypt._work_queue.qsize(),  # noqa: SLF001 - a gauge only reads it
            puzzle_difficulty=self.puzzle.difficulty)
        self.metrics_endpoint = MetricsEndpoint(self.service.metrics, self.health, self.config.metrics_port or 0)
        self.metrics_endpoint.start()

    def health(self) -> str | None:
        """None when healthy (accepting, database answering), else the reason: the /healthz answer."""
        if self._stopping.is_set() or self._listener is None:
            return "shutting down"
        try:
            self.storage.count_users()
        except DatabaseError:
            return "database"
        return None

    @property
    def server_address(self) -> tuple[str, int]:
        assert self._listener is not None, "call start() first"
        host, port = self._listener.getsockname()[:2]
        return host, port

    def serve_forever(self) -> None:
        assert self._listener is not None, "call start() first"
        self._listener.settimeout(0.5)
        while not self._stopping.is_set():
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    break
                log.exception("accept failed")
                continue
            session = self._admit(sock, addr[0])
            if session is None:
                continue
            t = threading.Thread(target=self._serve_connection, args=(sock, session),
                                 name=f"conn-{addr[0]}:{addr[1]}", daemon=True)
            with self._threads_lock:
                self._threads.add(t)
            t.start()

    def _admit(self, sock: socket.socket, source: str) -> Session | None:
        """Rate and connection limits, checked in the accept loop: refused junk costs no thread."""
        assert self._flusher is not None
        refusal = None if self.rate_limiter.allow(source) else "too many new connections from this address"
        proto = P.ServerProtocol(self.identity, suite=self.config.cipher, allowed_groups=self.config.allowed_groups,
                                 tdes_backend=self.config.tdes_backend, puzzle=self.puzzle, source=source)
        session = Session(proto, Outbox(sock, self._flusher, self.config.outbox_limit_bytes), source)
        if refusal is None:
            refusal = self.service.registry.add_connection(
                session, self.config.max_connections, self.config.max_unauthenticated,
                self.config.max_unauthenticated_per_source)
        if refusal is None:
            self.service.metrics.connections.inc()
            return session
        self.service.metrics.connections_refused.inc()
        log.warning("refused a connection from %s: %s", source, refusal)
        try:
            sock.send(P.encode_frame(P.HandshakeError(code=P.HandshakeErrorCode.BUSY).encode()), socket.MSG_DONTWAIT)
        except OSError:
            pass
        sock.close()
        return None

    def _serve_connection(self, sock: socket.socket, session: Session) -> None:
        source = session.source
        linger = False
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small frames: no Nagle delay
            self._read_loop(sock, session)
        except TimeoutError:
            log.info("closed %s: no login within %.0f s", source, self.config.login_grace_s)
        except ProtocolError as exc:
            log.info("closed %s: %s", source, exc)
            try:  # a sealed Goodbye with the reason, or the plaintext HandshakeError
                with session.lock:
                    farewell = session.proto.farewell(str(exc)) or session.proto.data_to_send()
                session.write_raw(farewell)
                linger = True
            except ConnectionClosed:
                pass
        except (ConnectionClosed, OSError) as exc:
            log.debug("connection from %s ended: %s", source, exc)
        except Exception:  # noqa: BLE001 - one broken connection must never take the server down
            log.exception("unexpected error on a connection from %s", source)
        finally:
            session.closed.set()
            self.service.disconnected(session)  # others see the user gone at once
            if linger:
                _linger_close(sock)  # then let the farewell reach the peer
            if session.outbox is not None:
                session.outbox.close()
            try:
                sock.close()
            except OSError:
                pass
            with self._threads_lock:
                self._threads.discard(threading.current_thread())

    def _read_loop(self, sock: socket.socket, session: Session) -> None:
        deadline = time.monotonic() + self.config.login_grace_s
        while not session.closed.is_set():
            if session.username is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError()
                sock.settimeout(remaining)
            else:
                sock.settimeout(None)
            data = sock.recv(RECV_BYTES)
            if not data:
                return
            events, handshake_bytes = session.receive(data)
            session.write_raw(handshake_bytes)
            for event in events:
                if isinstance(event, P.Message):
                    self.service.handle(session, event)

    def shutdown(self, reason: str = "The server is shutting down.") -> None:
        self._stopping.set()
        self.moderation.stop()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
        for session in self.service.registry.all_sessions():
            session.close(reason)
        with self._threads_lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=5)
        if self._flusher is not None:
            self._flusher.stop()
        self.storage.close()


# =============================================================================
# Command line
# =============================================================================
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"choose one of {', '.join(LOG_LEVELS)} (any case)")
    return level


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help; an option that states its own keeps its wording."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if "default:" in (action.help or "") else super()._get_help_string(action)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="secureim server: login, key distribution and relay.",
                                formatter_class=_HelpWithDefaults)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (0 = any free port)")
    p.add_argument("--db", dest="db_url", default=None,
                   help="sqlite:///PATH or mysql://USER[:PASS]@HOST[:PORT]/DB. sqlite:///data/x.db is "
                        "relative to the current folder, sqlite:////srv/x.db (four slashes) is absolute; "
                        "the folder must exist. MySQL: the database is created if the account may "
                        "(default: SQLite file secureim.db in the data dir)")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("SECUREIM_DATA_DIR", DEFAULT_DATA_DIR)),
                   help="where the identity key, ticket key and SQLite database live ($SECUREIM_DATA_DIR)")
    p.add_argument("--cipher", choices=cu.SUITE_NAMES, default=cu.DEFAULT_SUITE,
                   help="cipher suite for sessions and conversations")
    p.add_argument("--bcrypt-cost", type=int, default=DEFAULT_BCRYPT_COST, help="bcrypt cost for new passwords (4-31)")
    p.add_argument("--rekey-messages", type=int, default=1000, help="new conversation key after N messages")
    p.add_argument("--rekey-minutes", type=float, default=60.0, help="new conversation key after N minutes")
    p.add_argument("--login-grace", type=float, default=30.0, help="seconds from connect to logged in")
    p.add_argument("--puzzle", choices=["off", "auto", "always"], default="auto",
                   help="client puzzle before any DH work: auto = only under load")
    p.add_argument("--puzzle-bits", type=int, default=16, help="base puzzle difficulty in bits (0-22)")
    p.add_argument("--max-unauthenticated", type=int, default=256, help="half-open connections allowed at once")
    p.add_argument("--max-unauthenticated-per-source", type=int, default=32,
                   help="half-open connections allowed per address")
    p.add_argument("--connections-per-second", type=float, default=20.0,
                   help="new connections per second per address (burst: three times this)")
    p.add_argument("--log-level", type=_log_level, default="WARNING", metavar="LEVEL",
                   help="log detail on stderr: DEBUG, INFO, WARNING or ERROR, in any case; WARNING shows "
                        "failed logins and lockouts (never passwords)")
    # Operating the server (admin.py, console.py, metrics.py); `python server.py admin --help` for the rest.
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics and /healthz on 127.0.0.1:PORT (0 = any free port)")
    p.add_argument("--audit-retention-days", type=float, default=DEFAULT_AUDIT_RETENTION_DAYS,
                   help=f"keep audit rows this long (default {DEFAULT_AUDIT_RETENTION_DAYS:g})")
    p.add_argument("--console", choices=["auto", "on", "off"], default="auto",
                   help="operator commands on stdin (/help): auto = only when stdin is a terminal")
    return p


def check_data_dir(path: Path) -> None:
    """The data directory must be (or become) a writable folder: one clear line otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--data-dir {path} is not a folder.")
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), Path("."))
        if not parent.is_dir():
            raise ConfigError(f"--data-dir {path} cannot be created: {parent} is not a folder.")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"--data-dir {path} cannot be created: {parent} is not writable.")
        return
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--data-dir {path} is not writable.")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    if not 4 <= args.bcrypt_cost <= 31:
        raise ConfigError("--bcrypt-cost must be between 4 and 31.")
    if not 0 <= args.port <= 65535:
        raise ConfigError("--port must be between 0 and 65535.")
    if args.rekey_messages < 1 or args.rekey_minutes <= 0 or args.login_grace <= 0:
        raise ConfigError("--rekey-messages, --rekey-minutes and --login-grace must be positive.")
    if not 0 <= args.puzzle_bits <= 22:
        raise ConfigError("--puzzle-bits must be between 0 and 22.")
    check_data_dir(args.data_dir)
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise ConfigError("--metrics-port must be between 0 and 65535.")
    if not 0 < args.audit_retention_days <= 36500:
        raise ConfigError("--audit-retention-days must be between 0 and 36500.")
    return ServerConfig(host=args.host, port=args.port, db_url=args.db_url, data_dir=args.data_dir,
                        cipher=args.cipher, bcrypt_cost=args.bcrypt_cost, rekey_after_messages=args.rekey_messages,
                        rekey_after_s=args.rekey_minutes * 60, login_grace_s=args.login_grace,
                        puzzle_mode=args.puzzle, puzzle_bits=args.puzzle_bits,
                        max_unauthenticated=args.max_unauthenticated,
                        max_unauthenticated_per_source=args.max_unauthenticated_per_source,
                        connections_per_source_per_s=args.connections_per_second,
                        connection_burst_per_source=max(1, int(args.connections_per_second * 3)),
                        metrics_port=args.metrics_port, audit_retention_days=args.audit_retention_days)


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):  # noqa: ARG001 - signal handler signature
    raise _Stop()


def _stdin_is_our_terminal() -> bool:
    """A terminal, and we are in its foreground (``server.py &`` must not stop on reading it)."""
    try:
        return sys.stdin is not None and sys.stdin.isatty() and os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["admin"]:  # the operator's command line (admin.py)
        import admin

        return admin.main(argv[1:])
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt=TIME_FORMAT)

    def say(line: str) -> None:
        print(f"{time.strftime(TIME_FORMAT)} {line}", flush=True)

    say("[SERVER]: Initializing...")
    try:
        config = config_from_args(args)
        server = Server(config, announce=say)
        host, port = server.start()
    except (SecureIMError, OSError) as exc:
        print(f"{time.strftime(TIME_FORMAT)} [SERVER]: Cannot start: {exc}", file=sys.stderr, flush=True)
        return 1
    say("[SERVER]: Initialization complete.")
    say(f"[SERVER]: Listening on {host}:{port} ({config.cipher}, database: {server.storage.backend}).")
    say(f"[SERVER]: Server identity fingerprint: {server.fingerprint}")
    if server.metrics_endpoint is not None:
        say(f"[SERVER]: Metrics on http://127.0.0.1:{server.metrics_endpoint.port}/metrics"
            f" (health: /healthz).")
    if args.console == "on" or (args.console == "auto" and _stdin_is_our_terminal()):
        from admin import AdminOps
        from console import ServerConsole

        if hasattr(signal, "SIGTTIN"):  # sent to the background later: a read fails (the console ends), no stop
            signal.signal(signal.SIGTTIN, signal.SIG_IGN)
        ServerConsole(AdminOps(server.storage, "console", bcrypt_cost=config.bcrypt_cost), sys.stdin, say).start()
        say("[SERVER]: Console ready; type /help.")
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:  # "Ready" inside the try: a SIGTERM right after it still stops cleanly
        say("[SERVER]: Ready to accept connections.")
        server.serve_forever()
    except _Stop:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        say("[SERVER]: Shutting down...")
        server.shutdown()
        say("[SERVER]: Stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
