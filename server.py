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
import asyncio
import signal
import socket
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import crypto_utils as cu
import diffiehellman
import direct
import protocol as P
from auth import DEFAULT_BCRYPT_COST, AuthService
from protocol import normalize_username
from puzzle import PuzzleGate
from metrics import MetricsEndpoint, ServerMetrics
from moderation import DEFAULT_AUDIT_RETENTION_DAYS, AddressBans, ModerationPoller, ban_message
from tickets import TicketIssuer, load_or_create_ticket_key
from cluster import SIGNED_IN_ELSEWHERE, Cluster, LocalCluster
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import database as D
import rooms as R
from room_service import RoomService
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


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    db_url: str | None = None  # default: sqlite under data_dir
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    cipher: str = cu.DEFAULT_SUITE
    bcrypt_cost: int = DEFAULT_BCRYPT_COST
    login_grace_s: float = 120.0  # OpenSSH LoginGraceTime; the terminal client says at once when it ends
    max_auth_tries: int = 6  # OpenSSH MaxAuthTries
    rekey_after_messages: int = 1000  # conversation key lifetime, in relayed messages
    rekey_after_s: float = 3600.0  # ... and in time
    min_rekey_interval_s: float = 1.0  # never faster: key shares count as relays too, so rekeys could cascade
    outbox_limit_bytes: int = 1 << 20  # a client that stops reading is dropped past this
    max_connections: int = 20000
    max_unauthenticated: int = 256  # OpenSSH MaxStartups-style cap on half-open sessions
    max_unauthenticated_per_source: int = 32
    connections_per_source_per_s: float = 20.0  # token bucket per source address...
    connection_burst_per_source: int = 60  # ...and its burst
    puzzle_mode: str = "auto"  # off | auto (under load) | always
    puzzle_bits: int = 16  # base difficulty; grows with load up to puzzle.MAX_DIFFICULTY
    puzzle_load_threshold: int = 64  # half-open connections before "auto" asks for work
    allowed_groups: frozenset[str] | None = None
    tdes_backend: str | None = None
    max_failures: int = 5
    lock_s: float = 60.0
    metrics_port: int | None = None  # Prometheus /metrics and /healthz on 127.0.0.1 (0 = any free port)
    audit_retention_days: float = DEFAULT_AUDIT_RETENTION_DAYS
    node_name: str = ""  # default: hostname:port (the admin `sessions` list shows it)
    worker_threads: int = 4  # threads for slow work: handshakes, logins, the database
    reuse_port: bool = False  # SO_REUSEPORT: worker processes share the port (--workers)
    cluster_url: str | None = None  # nats://HOST:PORT: several nodes, one service (cluster.py)
    cluster_prefix: str = "secureim"  # NATS subjects start with this (tests use one per run)
    identity_key_file: Path | None = None  # the service's identity (all nodes): else data_dir's
    # Store and forward (docs/PROTOCOL.md section 15): each recipient's queue is bounded.
    queue_max_messages: int = 1000
    queue_max_bytes: int = 10 << 20
    queue_max_age_s: float = 30 * 86400.0
    offline_opens_per_minute: int = (
        300  # each takes one of the peer's one-time prekeys (per session: a room's
    )
    #                                      sender key goes to every member, so a room of 256 is one burst)...
    offline_opens_per_recipient_per_minute: int = 300  # ...and per recipient, whoever asks (per node): every
    #                                      member of a new room opens one to each other (the signed prekey
    #                                      serves once the one-time prekeys run out, as in Signal)
    room_max_members: int = R.DEFAULT_MAX_MEMBERS  # docs/PROTOCOL.md section 16
    room_sends_per_s: float = 50.0  # room messages one session may send (a token bucket, burst x4):
    #                                      each one is a copy for every other member

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{Path(self.data_dir) / 'secureim.db'}"


# =============================================================================
# Sessions: one connection's protocol state and its outgoing bytes
# =============================================================================
QUEUE_WINDOW = 64  # stored messages in flight to one session (unacknowledged) at most
QUEUE_EXPIRY_EVERY_S = 3600.0
MAX_ONE_TIME_PREKEYS = 200  # kept per user on the server
MAX_DB_ID = 2**63 - 1  # row ids in SQLite and MySQL are signed 64-bit: a larger u64 names nothing
MAX_TRACKED_RECIPIENTS = 100_000  # recipients whose recent offline opens are counted (oldest forgotten)
LINGER_S = 1.0  # after a farewell: read (and drop) what still arrives, then close
MAX_INBOX_ITEMS = 256  # a session's unprocessed input past this: stop reading its socket
MAX_INBOX_BYTES = 256 * 1024  # ... or past this many raw bytes (before login a read is not yet framed)
INBOX_RESUME_ITEMS = 64


class Session:
    """One client connection: its protocol state machine and its outgoing bytes.

    ``send()`` may be called from any thread (the loop, a worker, the moderation
    poller): sealing and queueing happen under the session's lock, so the
    sequence numbers and the byte order on the wire agree.  The queued bytes are
    written by the event loop, once per loop turn however many messages were
    queued (``Link.flush``).
    """

    def __init__(self, proto: P.ServerProtocol, link: "Link | None", source: str) -> None:
        self.proto = proto
        self.link = link
        self.source = source
        self.username: str | None = None
        self.auth_attempts = 0
        self.identity_key: bytes | None = None  # the user's Ed25519 public key, handed to peers
        self.udp_port: int | None = None  # direct mode: where this client listens
        self.login_at = 0.0  # wall clock of the login: the newest login wins
        self.lock = threading.Lock()  # one lock: seal + enqueue keep the sequence order
        self.closed = threading.Event()
        # Loop-thread state: input not yet handled, and whether a worker has this session now.
        self.inbox: deque = deque()
        self.inbox_bytes = 0  # raw bytes waiting in the inbox (not yet opened)
        self.busy = False
        self.gone = False  # the service has been told this session ended
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_due = False
        # Stored messages handed to this session and not yet acknowledged (workers, under queue_lock).
        self.queue_lock = threading.Lock()
        self.queue_sent_upto = 0
        self.queue_in_flight = 0
        self.offline_opens: deque = deque()  # when this session last asked for prekey bundles
        self.room_ops: deque = deque()  # when this session last changed a room's members
        self.room_sends: SourceRateLimiter | None = None  # room messages (each fans out): set at login

    def send(self, msg: P.Message) -> bool:
        """Seal and queue ``msg``; False if this session is gone."""
        with self.lock:
            if self.closed.is_set() or not self.proto.established:
                return False
            try:
                data = self.proto.send(msg)
            except ProtocolError:
                self.closed.set()
                return False
            return self._queue_locked(data)

    def _queue_locked(self, data: bytes) -> bool:
        link = self.link
        if link is None:
            return True
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes + link.buffered > link.limit:  # the client stopped reading: drop it
            self.closed.set()
            link.abort("The client stopped reading; its queue is full.")
            return False
        if not self._flush_due:
            self._flush_due = True
            link.flush_soon()
        return True

    def take_output(self) -> bytes:
        with self.lock:
            out, self._out, self._out_bytes, self._flush_due = self._out, [], 0, False
        return b"".join(out)

    def receive(self, data: bytes) -> tuple[list, bytes]:
        with self.lock:
            events = self.proto.receive_data(data)
            return events, self.proto.data_to_send()

    def write_raw(self, data: bytes) -> None:
        if data:
            with self.lock:
                self._queue_locked(data)

    def close(self, reason: str | None = None) -> None:
        """Say ``reason`` (a sealed Goodbye) if the session is up, then close; any thread."""
        if reason and self.proto.established:
            self.send(P.Goodbye(reason=reason))
        self.closed.set()
        if self.link is not None:
            self.link.close_soon()


class Link(asyncio.Protocol):
    """The event-loop end of one TCP connection: bytes in to the server, queued bytes out."""

    def __init__(self, server: "Server") -> None:
        self.server = server
        self.loop = server.loop
        self.limit = server.config.outbox_limit_bytes
        self.buffered = 0  # bytes written but not yet taken by the kernel (the loop updates it)
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.lingering = False
        self.peer_eof = False
        self._closing = False

    # -- asyncio callbacks (loop thread) ----------------------------------------------
    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("?", 0)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small frames: no Nagle delay
            except OSError:
                pass
        self.session = self.server._admit(self, peer[0])

    def data_received(self, data: bytes) -> None:
        if self.lingering or self.session is None:
            return  # a farewell is on its way: what still arrives is read and dropped
        self.server._feed(self.session, data)

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.buffered = self.transport.get_write_buffer_size()

    def resume_writing(self) -> None:  # the kernel took most of it: the count is fresh again
        if self.transport is not None:
            self.buffered = self.transport.get_write_buffer_size()

    def eof_received(self) -> bool:
        """The peer has sent all it will: answer what it sent, then close (half-open until then)."""
        self.peer_eof = True
        if self.session is None or not self.lingering:
            self.server._pump(self.session) if self.session is not None else None
        if self.lingering and self.transport is not None:
            self.transport.close()
        return True

    def connection_lost(self, exc) -> None:
        if self.session is not None:
            self.server._lost(self.session)

    # -- called from any thread ---------------------------------------------------------
    def _call(self, fn, *args) -> None:
        if threading.get_ident() == self.server.loop_thread_id:
            self.loop.call_soon(fn, *args)
        else:
            try:
                self.loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the loop has stopped: the server is gone
                pass

    def flush_soon(self) -> None:
        self._call(self.flush)

    def close_soon(self) -> None:
        self._call(self._close_gracefully)

    def abort(self, why: str) -> None:
        log.info("closed %s: %s", self.session.source if self.session else "?", why)
        self._call(self._abort)

    # -- loop thread -------------------------------------------------------------------
    def flush(self) -> None:
        transport, session = self.transport, self.session
        if transport is None or session is None or transport.is_closing():
            return
        data = session.take_output()
        if data:
            transport.write(data)
        self.buffered = transport.get_write_buffer_size()  # what the kernel has not taken yet

    def _close_gracefully(self) -> None:
        """Write what is queued, half-close, read until the peer closes (bounded), then close.

        Closing at once with unread input makes the kernel send RST, which can destroy
        the farewell before the peer reads it."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        self.flush()
        self.lingering = True
        if self.session is not None:
            self.server._lost(self.session)  # others see the user gone at once, not after the linger
        transport = self.transport
        if transport.is_closing():
            return
        try:
            if transport.can_write_eof():
                transport.write_eof()
        except (OSError, RuntimeError):
            transport.close()
            return
        self.loop.call_later(LINGER_S, transport.abort)  # bounded: a peer that never reads cannot hold it

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


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
    rekey_pending: bool = False
    held: list | None = None  # while its new key is being made: relays wait here, then follow the key


@dataclass
class Registry:
    """Shared server state, one lock.  Methods copy before the caller iterates."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    online: dict[str, Session] = field(default_factory=dict)
    watchers: dict[str, set[str]] = field(default_factory=dict)  # offline user -> who waits
    conversations: dict[int, LiveConversation] = field(default_factory=dict)
    by_user: dict[str, set[int]] = field(default_factory=dict)  # user -> their live conversations' ids
    sessions: set[Session] = field(default_factory=set)
    unauthenticated: dict[str, int] = field(default_factory=dict)  # source -> count

    def unauthenticated_total(self) -> int:
        with self.lock:
            return sum(self.unauthenticated.values())

    def add_connection(
        self, session: Session, max_total: int, max_unauth: int, max_unauth_per_source: int
    ) -> str | None:
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
            if session.closed.is_set():  # it ended while a worker checked its password
                raise ConnectionClosed("The connection closed during the login.")
            old = self.online.get(username)
            session.login_at = time.time()  # with the entry, so its OFFLINE always names this login
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
        for cid in self.by_user.pop(username, ()):
            conv = self.conversations.pop(cid, None)
            if conv is None:
                continue
            peer = conv.members[0] if conv.members[1] == username else conv.members[1]
            peers.append(peer)
            ids = self.by_user.get(peer)
            if ids is not None:
                ids.discard(cid)
                if not ids:
                    del self.by_user[peer]
            if watch:  # the peer is told when this user is back
                self.watchers.setdefault(username, set()).add(peer)
        return peers

    def drop_conversations(self, username: str, *, watch: bool) -> list[str]:
        """End ``username``'s live conversations; returns their peers."""
        with self.lock:
            return self._drop_conversations_locked(username, watch=watch)

    def keyed(self, cid: int, members: tuple[str, str], generation: int) -> None:
        """A conversation got a key: a new one is live with counters from zero; a known one moves on."""
        with self.lock:
            conv = self.conversations.get(cid)
            if conv is None or conv.members != members:
                self.conversations[cid] = LiveConversation(cid, members, generation, time.monotonic())
                for user in members:
                    self.by_user.setdefault(user, set()).add(cid)
            else:  # a rekey: the counters restarted when it was decided (_maybe_rekey), not now
                conv.generation = max(conv.generation, generation)

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

    def watch_unless_online(self, watcher: str, target: str) -> Session | None:
        """``target``'s session if online, else remember that ``watcher`` waits: one step, so a
        login in between is either seen here or finds the watch (and tells the watcher)."""
        with self.lock:
            session = self.online.get(target)
            if session is None:
                self.watchers.setdefault(target, set()).add(watcher)
            return session

    def take_watchers(self, username: str) -> set[str]:
        """Who waits for ``username``; forgotten, since they are about to be told."""
        with self.lock:
            return self.watchers.pop(username, set())

    def conversation_between(self, first: str, second: str) -> LiveConversation | None:
        with self.lock:
            for cid in self.by_user.get(first, ()):
                conv = self.conversations.get(cid)
                if conv is not None and second in conv.members:
                    return conv
            return None

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
class ChatService(RoomService):
    """Login, presence, KDC and relay (rooms: room_service.py).  No sockets; tests drive it directly."""

    def __init__(
        self,
        storage: Storage,
        config: ServerConfig,
        announce: Callable[[str], None] = lambda line: None,
        *,
        ticket_key: bytes | None = None,
    ) -> None:
        self.storage = storage
        self.config = config
        self.suite = cu.get_suite(config.cipher, tdes_backend=config.tdes_backend)
        self.auth = AuthService(
            storage, bcrypt_cost=config.bcrypt_cost, max_failures=config.max_failures, lock_s=config.lock_s
        )
        self.registry = Registry()
        self.announce = announce
        ticket_key = ticket_key or load_or_create_ticket_key(Path(config.data_dir))
        self.tickets = TicketIssuer(ticket_key)
        self._kdc_lock = threading.Lock()
        self._opens_for: dict[str, deque] = {}  # recipient -> times of recent OfflineOpens for them
        self._opens_lock = threading.Lock()
        # The KDC keys of offline conversations wait in the database sealed under this (every node has it).
        self._offline_keys = AESGCM(
            cu.hkdf(ticket_key, salt=None, info=cu.label("offline kdc keys at rest"), length=32)
        )
        self._init_rooms(ticket_key)
        # Operating the server (moderation.py, metrics.py): bans, kicks, the audit log, counters.
        self.metrics = ServerMetrics()
        self.address_bans = AddressBans()
        self.node = config.node_name or socket.gethostname()
        self.relayed = 0  # messages relayed (the loop thread counts; the metric reads it)
        self.metrics.relayed_total = lambda: self.relayed
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread_id: int | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.cluster: Cluster = LocalCluster()
        if config.cluster_url:
            from cluster_nats import NatsCluster, bus_key

            self.cluster = NatsCluster(
                config.cluster_url,
                config.cluster_prefix,
                bus_key(ticket_key),
                config.node_name or socket.gethostname(),
            )

    def attach(
        self, loop: asyncio.AbstractEventLoop, loop_thread_id: int | None, pool: ThreadPoolExecutor
    ) -> None:
        """Serve from ``loop`` with slow work on ``pool`` (Server.start calls this)."""
        self.loop, self.loop_thread_id, self.pool = loop, loop_thread_id, pool
        self.cluster.start(self)
        self.on_loop(self._expire_queue_soon, 0.0)

    def _expire_queue_soon(self, delay_s: float) -> None:
        """Stored messages older than the queue's age bound go, now and every hour."""
        assert self.loop is not None
        self.loop.call_later(delay_s, self.run_slow, self._expire_queue)

    def _expire_queue(self) -> None:
        try:
            gone = self.storage.expire_queue(time.time() - self.config.queue_max_age_s)
            if gone:
                log.info("%d stored messages expired unread", gone)
        finally:
            self.on_loop(self._expire_queue_soon, QUEUE_EXPIRY_EVERY_S)

    def learn_conversation(self, cid: int, members: tuple[str, str], generation: int) -> None:
        """Another node's KDC keyed a conversation with one of our users: relay it from here too."""
        self.registry.keyed(cid, members, generation)

    def replaced_elsewhere(self, session: Session) -> None:
        """``session``'s user logged in on another node: end it here (the cluster announces the new one)."""
        session.gone = True  # this bookkeeping instead of disconnected(): the user is not offline
        self.registry.remove(session)
        self.run_slow(self._session_ended, session.username)
        session.close(SIGNED_IN_ELSEWHERE)

    def cluster_stop(self) -> None:
        self.cluster.stop()

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
        session.close(reason[: P.MAX_REASON_BYTES // 2] or "An administrator ended your session.")
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
                session.send(
                    P.AuthFailed(
                        code=P.AuthCode.UNAVAILABLE,
                        retry_after_s=5,
                        reason="The server cannot check logins right now; try again later.",
                    )
                )
            else:
                session.send(
                    P.Error(
                        code=P.ErrorCode.UNAVAILABLE,
                        reason="The server's database is unavailable; try again later.",
                    )
                )
        except DatabaseError:
            log.exception("database error")
            session.send(
                P.Error(code=P.ErrorCode.UNAVAILABLE, reason="Internal database error; try again later.")
            )
        except ValueError as exc:  # the storage refused out-of-bounds input a handler let through
            log.warning("a %s was refused by the storage: %s", type(msg).__name__, exc)
            session.send(
                P.Error(code=P.ErrorCode.BAD_REQUEST, reason="That request was malformed and was refused.")
            )

    # -- accounts ------------------------------------------------------------------
    def _auth(self, session: Session, msg: P.Login | P.Register) -> None:
        session.auth_attempts += 1
        register = isinstance(msg, P.Register)
        if self._refuse_if_banned(session, None):
            return
        try:
            cu.load_public_key(msg.identity_key)
        except SecureIMError:
            self._auth_failed(
                session, P.AuthCode.INVALID_IDENTITY, "The identity key is not a valid Ed25519 key."
            )
            return
        try:
            if register:
                username = self.auth.register(msg.username, msg.password, session.source, msg.identity_key)
            else:
                username = self.auth.login(msg.username, msg.password, session.source)
                if self.storage.get_identity_key(username) != msg.identity_key:
                    # A new device or reinstall: peers will see the change and must accept it.
                    self.storage.set_identity_key(username, msg.identity_key)
                    self.storage.clear_prekeys(username, signed=True)  # signed by the old key: useless now
                    log.info("a user registered a new identity key")
                    self.audit("identity_key_changed", username, session.source)
        except AccountLocked as exc:
            self._auth_failed(
                session,
                P.AuthCode.LOCKED,
                str(exc),
                exc.retry_after_s,
                _loggable(msg.username),
                username=msg.username,
            )
            return
        except InvalidCredentials as exc:
            self._auth_failed(
                session,
                P.AuthCode.INVALID_CREDENTIALS,
                str(exc),
                who=_loggable(msg.username),
                username=msg.username,
            )
            return
        except (InvalidUsername, InvalidPassword, UsernameTaken) as exc:
            code = {
                InvalidUsername: P.AuthCode.INVALID_USERNAME,
                InvalidPassword: P.AuthCode.INVALID_PASSWORD,
                UsernameTaken: P.AuthCode.USERNAME_TAKEN,
            }[type(exc)]
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
                raise InvalidCredentials(
                    "The session ticket is invalid or expired; log in with your password."
                )
        except InvalidCredentials as exc:
            self._auth_failed(session, P.AuthCode.INVALID_CREDENTIALS, str(exc), who="a session ticket")
            return
        session.identity_key = msg.identity_key
        self._logged_in(session, username, created=False, how="resume")

    def _auth_failed(
        self,
        session: Session,
        code: P.AuthCode,
        reason: str,
        retry_after_s: int = 0,
        who: str = "an invalid username",
        username: str = "",
    ) -> None:
        # Seen at the default level (an operator watches for guessing); never the password.
        if code == P.AuthCode.LOCKED:
            log.warning(
                "login refused from %s for %s: locked for %d s after repeated failures",
                session.source,
                who,
                retry_after_s,
            )
        elif code == P.AuthCode.INVALID_CREDENTIALS:
            log.warning("failed login from %s for %s", session.source, who)
        else:
            log.info("login failed from %s: %s", session.source, code.name)
        locked = code == P.AuthCode.LOCKED
        self.metrics.logins.labels("locked" if locked else "failed").inc()
        self.audit("lockout" if locked else "login_failed", username, session.source, code.name)
        if session.auth_attempts >= self.config.max_auth_tries:
            session.send(
                P.AuthFailed(
                    code=P.AuthCode.TOO_MANY_ATTEMPTS,
                    retry_after_s=retry_after_s,
                    reason=f"{reason} Too many attempts on this connection.",
                )
            )
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
        try:
            old, waiting = self.registry.login(session, username)
        except ConnectionClosed:
            return
        if old is not None and old is not session:
            # Decision: a new login replaces the old session (docs/PROTOCOL.md, section 7).
            old.close(SIGNED_IN_ELSEWHERE)
        assert session.identity_key is not None
        rate = self.config.room_sends_per_s
        session.room_sends = SourceRateLimiter(rate, max(1, int(rate * 4)))
        self.cluster.user_online(username, session.login_at, session.identity_key)  # other nodes drop theirs
        session.send(
            P.AuthOk(
                username=username,
                created=created,
                ticket=self.tickets.issue(username, session.identity_key, epoch),
            )
        )
        self.metrics.logins.labels("ok").inc()
        try:  # last login, the session row and the audit row, in one transaction
            self.storage.record_session_start(
                self.node, username, session.source, time.time(), "register" if created else how
            )
        except DatabaseError as exc:
            self.metrics.audit_failures.inc()
            log.warning("login bookkeeping failed: %s", exc)
        self.announce(
            f"[SERVER]: {username} connected from {session.source}. ({len(self.registry.online)} online)"
        )
        self.notify(username, waiting, online=True)
        self._send_prekey_status(session)
        self.push_queue(session)  # what was stored while they were away, in order, before anything new

    def disconnected(self, session: Session) -> None:
        was_online, peers = self.registry.remove(session)
        if not was_online or session.username is None:
            return
        username = session.username
        self.announce(f"[SERVER]: {username} disconnected. ({len(self.registry.online)} online)")
        self.cluster.user_offline(username, session.login_at)
        self.run_slow(self._session_ended, username)
        self.notify(username, peers, online=False)

    def notify(self, username: str, peers, *, online: bool) -> None:
        """Tell each of ``peers`` online here that ``username`` came or went (a notice: they re-open)."""
        for peer in peers:
            peer_session = self.registry.session_of(peer)
            if peer_session is not None:
                peer_session.send(P.PeerStatus(peer=username, online=online, known=True, notice=True))

    def _session_ended(self, username: str) -> None:
        try:
            self.storage.session_ended(self.node, username)
        except DatabaseError as exc:
            log.warning("session bookkeeping failed: %s", exc)

    # -- presence and the KDC ------------------------------------------------------
    @staticmethod
    def _peer_named(session: Session, raw: str, refusal: str) -> str | None:
        """``raw`` as a username, or None once the session has been told why not (invalid, or itself)."""
        try:
            peer = normalize_username(raw)
        except AuthError:
            session.send(P.PeerStatus(peer=raw, online=False, known=False))
            return None
        if peer == session.username:
            session.send(P.Error(code=P.ErrorCode.BAD_REQUEST, reason=refusal))
            return None
        return peer

    def _open(self, session: Session, msg: P.OpenConversation) -> None:
        me = session.username
        assert me is not None
        peer = self._peer_named(session, msg.peer, "You cannot open a conversation with yourself.")
        if peer is None:
            return
        peer_session = self.registry.session_of(peer)
        if peer_session is None and not self.cluster.is_remote(peer):
            known = self.storage.get_password_hash(peer) is not None
            if known:  # the peer may have logged in while the database answered
                peer_session = self.registry.watch_unless_online(me, peer)
            if peer_session is None and not self.cluster.is_remote(peer):
                session.send(P.PeerStatus(peer=peer, online=False, known=known))
                return
        session.send(P.PeerStatus(peer=peer, online=True, known=True))
        cid = self.storage.open_conversation(me, peer)
        self._distribute_key(cid, (me, peer) if me < peer else (peer, me))

    def _distribute_key(self, cid: int, members: tuple[str, str], *, rekey: bool = False) -> None:
        """KDC: a fresh key for the conversation, sent to both members, then forgotten.

        The generation comes from the database (a worker's job); the hand-out runs on the
        loop thread, in one go, so no relayed frame of this conversation can slip between
        the two members' keys (a peer's share must never arrive before the key it answers)."""
        with self._kdc_lock:
            generation = self.storage.record_key_generation(cid)
            key = self.suite.generate_key()
        self.on_loop(self._hand_out_key, cid, members, generation, key, rekey)
        del key  # never stored (design 000)

    def _hand_out_key(
        self, cid: int, members: tuple[str, str], generation: int, key: bytes, rekey: bool = False
    ) -> None:
        if rekey and cid not in self.registry.conversations:
            return  # a member left while the key was made: the conversation is over, not re-created
        self._send_keys(cid, members, generation, key)
        self._release_held(cid)

    def _send_keys(self, cid: int, members: tuple[str, str], generation: int, key: bytes) -> None:
        self.registry.keyed(cid, members, generation)
        sessions = {user: self.registry.session_of(user) for user in members}
        identities = {
            user: s.identity_key if s is not None else self.cluster.identity_of(user)
            for user, s in sessions.items()
        }
        for user in members:
            other = members[1] if user == members[0] else members[0]
            if identities[other] is None:
                continue
            msg = P.ConversationKey(
                conversation_id=cid,
                peer=other,
                suite=self.suite.suite_id,
                generation=generation,
                key=key,
                peer_identity=identities[other],
            )
            if sessions[user] is not None:
                sessions[user].send(msg)
            else:  # on another node: sealed for the cluster bus (cluster_nats.py)
                self.cluster.send_key(user, members, generation, msg)
            del msg

    def on_loop(self, fn, *args) -> None:
        """Run ``fn`` on the loop thread (now, if this is it): relays run there, so it runs between them."""
        if self.loop is None or threading.get_ident() == self.loop_thread_id:
            fn(*args)
            return
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop has stopped
            pass

    # -- relay -------------------------------------------------------------------------
    def _relay(self, session: Session, msg: P.Relay) -> None:
        """The hot path, on the loop thread only: no lock shared by all sessions, no database.

        The conversation table is written under the registry lock by workers; a dict
        read is atomic, and the counters below are touched by this thread alone."""
        sampled = not self.relayed & RELAY_SAMPLE_MASK  # time one relay in 16: the histogram stays cheap
        started = time.perf_counter() if sampled else 0.0
        me = session.username
        conv = self.registry.conversations.get(msg.conversation_id)
        if conv is None or me not in conv.members:
            self.metrics.undelivered.inc()
            session.send(
                P.Error(code=P.ErrorCode.NOT_A_MEMBER, reason="No such conversation; open it again.")
            )
            return
        if conv.held is not None:  # its new key is on its way: this frame goes right after it
            if len(conv.held) >= MAX_HELD_RELAYS:
                session.send(
                    P.Error(
                        code=P.ErrorCode.UNAVAILABLE,
                        reason="The conversation is being re-keyed; try again in a moment.",
                    )
                )
            else:
                conv.held.append((session, msg))
            return
        conv.messages += 1
        conv.bytes_relayed += len(msg.payload)
        peer = conv.members[0] if conv.members[1] == me else conv.members[1]
        deliver = P.Deliver(conversation_id=msg.conversation_id, sender=me, payload=msg.payload)
        peer_session = self.registry.online.get(peer)
        if peer_session is not None:
            delivered = peer_session.send(deliver)
        else:
            delivered = self.cluster.deliver(peer, deliver)
        if not delivered:
            self.metrics.undelivered.inc()
            if peer_session is None and self.cluster.is_remote(peer):
                reason = (
                    f"{peer} is temporarily unreachable (the cluster link is down); message not delivered."
                )
            else:
                reason = f"{peer} is offline; message not delivered."
            session.send(P.Error(code=P.ErrorCode.PEER_OFFLINE, reason=reason))
            return
        self.relayed += 1
        if sampled:
            self.metrics.relay_latency.observe(time.perf_counter() - started)
        if (
            conv.messages >= self.config.rekey_after_messages
            or conv.rekey_pending
            or conv.bytes_relayed >= self.suite.max_bytes_per_key // 2
            or time.monotonic() - conv.keyed_at >= self.config.rekey_after_s
        ):
            self._maybe_rekey(conv)

    def _maybe_rekey(self, conv: LiveConversation) -> None:
        age = time.monotonic() - conv.keyed_at
        if age < self.config.min_rekey_interval_s:
            conv.rekey_pending = True  # due, but not faster than the minimum interval
            return
        conv.rekey_pending = False
        conv.messages, conv.bytes_relayed, conv.keyed_at = 0, 0, time.monotonic()
        conv.held = []  # as in a one-thread server: nothing of this conversation overtakes the new key
        self.run_slow(self._rekey, conv.id, conv.members)

    def _rekey(self, cid: int, members: tuple[str, str]) -> None:
        try:
            self._distribute_key(cid, members, rekey=True)
        except Exception:
            self.on_loop(self._release_held, cid)  # no new key after all: the held frames go now
            raise

    def _release_held(self, cid: int) -> None:
        conv = self.registry.conversations.get(cid)
        if conv is None or conv.held is None:
            return
        held, conv.held = conv.held, None
        for sender, msg in held:
            if not sender.closed.is_set():
                self._relay(sender, msg)

    def run_slow(self, fn, *args) -> None:
        """Run ``fn`` on a worker thread (database, KDC); at once when no pool is attached (tests)."""
        if self.pool is None:
            fn(*args)
            return
        try:
            self.pool.submit(self._guarded, fn, *args)
        except RuntimeError:  # shutting down
            pass

    @staticmethod
    def _guarded(fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001
            log.exception("background task failed")

    # -- direct mode: endpoints and tickets (docs/PROTOCOL.md section 12.2) ----------
    def _register_endpoint(self, session: Session, msg: P.RegisterEndpoint) -> None:
        if not 1 <= msg.port <= 65535:
            session.send(P.Error(code=P.ErrorCode.BAD_REQUEST, reason="A UDP port is between 1 and 65535."))
            return
        session.udp_port = msg.port

    def _direct_request(self, session: Session, msg: P.DirectRequest) -> None:
        """Hand the initiator the peer's endpoint and a ticket only the peer can open."""
        me, peer = session.username, msg.peer
        assert me is not None
        conv = self.registry.conversation_between(me, peer)
        if conv is None:
            answer = (
                f"{peer} is offline."
                if self.registry.session_of(peer) is None and not self.cluster.is_remote(peer)
                else f"Open a conversation with {peer} first."
            )
        elif session.udp_port is None:
            answer = "Register a UDP port first."
        elif self.registry.session_of(peer) is None and self.cluster.is_remote(peer):
            answer = self.cluster.direct_offer(peer, me, session.source, session.udp_port, conv.id)
        else:
            answer = self.direct_offer_for(peer, me, session.source, session.udp_port, conv.id)
        if isinstance(answer, str):
            answer = P.DirectUnavailable(peer=peer, reason=answer)
        session.send(answer)

    def direct_offer_for(
        self, peer: str, initiator: str, host: str, port: int, conversation_id: int
    ) -> P.DirectOffer | str:
        """The offer for ``initiator`` to reach ``peer`` (online here), or why not.

        The ticket is sealed with the key only ``peer``'s session shares with this node,
        so another node asks this one for it (cluster_nats.py, DIRECT)."""
        peer_session = self.registry.session_of(peer)
        if peer_session is None:
            return f"{peer} is offline."
        if peer_session.udp_port is None:
            peer_session.send(P.DirectAsked(peer=initiator))  # the peer has not opted in: tell them who asks
            return f"{peer} does not accept direct connections."
        key = peer_session.proto.direct_ticket_key
        assert key is not None
        ticket = direct.seal_ticket(
            key, initiator=initiator, host=host, port=port, conversation_id=conversation_id, now_s=time.time()
        )
        return P.DirectOffer(peer=peer, host=peer_session.source, port=peer_session.udp_port, ticket=ticket)

    # -- password change (docs/PROTOCOL.md section 13) ------------------------------------
    def _change_password(self, session: Session, msg: P.ChangePassword) -> None:
        me = session.username
        assert me is not None and session.identity_key is not None
        try:
            epoch = self.auth.change_password(me, msg.old_password, msg.new_password, session.source)
        except AccountLocked as exc:
            log.warning(
                "password change refused from %s for %r: locked for %d s",
                session.source,
                me,
                exc.retry_after_s,
            )
            session.send(
                P.PasswordChangeFailed(
                    code=P.AuthCode.LOCKED, retry_after_s=exc.retry_after_s, reason=str(exc)
                )
            )
            return
        except InvalidCredentials:
            log.warning("failed password change from %s for %r: wrong old password", session.source, me)
            session.send(
                P.PasswordChangeFailed(
                    code=P.AuthCode.INVALID_CREDENTIALS,
                    retry_after_s=0,
                    reason="The old password is wrong; the password was not changed.",
                )
            )
            return
        except InvalidPassword as exc:
            session.send(
                P.PasswordChangeFailed(code=P.AuthCode.INVALID_PASSWORD, retry_after_s=0, reason=str(exc))
            )
            return
        except ServiceUnavailable as exc:
            log.warning("service unavailable: %s", exc)
            session.send(
                P.PasswordChangeFailed(
                    code=P.AuthCode.UNAVAILABLE,
                    retry_after_s=5,
                    reason="The server's database is unavailable; try again later.",
                )
            )
            return
        log.info(
            "%r changed their password from %s; their earlier session tickets have ended", me, session.source
        )
        self.audit("password_change", me, session.source)
        session.send(P.PasswordChanged(ticket=self.tickets.issue(me, session.identity_key, epoch)))

    def _who(self, session: Session, msg: P.WhoRequest) -> None:
        users = sorted(set(self.registry.online_users()) | set(self.cluster.remote_users()))
        session.send(P.WhoResponse(users=tuple(users[: P.MAX_WHO_USERS]), total=len(users)))

    # -- store and forward (docs/PROTOCOL.md section 15) --------------------------------
    def _wrap_aad(self, recipient: str, cid: int, generation: int) -> bytes:
        return (
            b"secureim/v1 offline kdc key"
            + recipient.encode()
            + b"\x00"
            + cid.to_bytes(8, "big")
            + generation.to_bytes(4, "big")
        )

    def _send_prekey_status(self, session: Session) -> None:
        assert session.username is not None
        status = self.storage.prekey_status(session.username)
        age = int(max(0.0, time.time() - status.signed_at)) if status.signed_at is not None else 0
        session.send(
            P.PrekeyStatus(
                one_time_left=status.one_time_left,
                signed_prekey_id=status.signed_id or 0,
                signed_prekey_age_s=min(age, 0xFFFFFFFF),
            )
        )

    def _publish_prekeys(self, session: Session, msg: P.PublishPrekeys) -> None:
        me = session.username
        assert me is not None
        entry = P.ONE_TIME_PREKEY_BYTES
        if (msg.signed_prekey and len(msg.signed_prekey) != P.SIGNED_PREKEY_BYTES) or len(
            msg.one_time
        ) % entry:
            session.send(P.Error(code=P.ErrorCode.BAD_REQUEST, reason="Malformed prekeys were refused."))
            return
        one_time = [
            (int.from_bytes(msg.one_time[i : i + 4], "big"), msg.one_time[i : i + entry])
            for i in range(0, len(msg.one_time), entry)
        ]
        signed_id = int.from_bytes(msg.signed_prekey[:4], "big") if msg.signed_prekey else None
        if signed_id == 0 or any(key_id == 0 for key_id, _e in one_time):
            session.send(P.Error(code=P.ErrorCode.BAD_REQUEST, reason="Prekey id 0 is reserved."))
            return
        if msg.replace:
            self.storage.clear_prekeys(me, signed=False)
        if signed_id is not None:
            self.storage.set_signed_prekey(me, signed_id, msg.signed_prekey, time.time())
        if one_time:
            self.storage.add_one_time_prekeys(me, one_time, MAX_ONE_TIME_PREKEYS)
        self._send_prekey_status(session)

    def _offline_open(self, session: Session, msg: P.OfflineOpen) -> None:
        """The peer's prekey bundle (one one-time prekey taken) and a fresh KDC key for an offline
        conversation; the key also waits, sealed, for the peer (docs/PROTOCOL.md section 15)."""
        me = session.username
        assert me is not None
        peer = self._peer_named(session, msg.peer, "You cannot write to yourself.")
        if peer is None:
            return
        refusal = self._offline_open_refused(session, peer)
        if refusal is not None:
            session.send(P.Error(code=P.ErrorCode.RATE_LIMITED, reason=refusal))
            return
        identity = self.storage.get_identity_key(peer)
        if identity is None:
            session.send(P.PeerStatus(peer=peer, online=False, known=False))
            return
        signed, one_time = self.storage.take_prekey_bundle(peer)
        if signed is None:
            session.send(
                P.Error(
                    code=P.ErrorCode.PEER_OFFLINE,
                    reason=f"{peer} is offline and has no keys for offline messages yet (their client "
                    f"publishes them when it logs in); the message was not sent.",
                )
            )
            return
        cid = self.storage.open_conversation(me, peer)
        with self._kdc_lock:
            generation = self.storage.record_key_generation(cid)
            key = self.suite.generate_key()
        nonce = cu.random_bytes(12)
        wrapped = nonce + self._offline_keys.encrypt(nonce, key, self._wrap_aad(peer, cid, generation))
        self.storage.put_offline_key(peer, cid, generation, me, wrapped, time.time())
        session.send(
            P.OfflineKey(
                conversation_id=cid,
                peer=peer,
                suite=self.suite.suite_id,
                generation=generation,
                key=key,
                peer_identity=identity,
                signed_prekey=signed,
                one_time_prekey=one_time or b"",
            )
        )
        del key

    def _offline_open_refused(self, session: Session, peer: str) -> str | None:
        """Each OfflineOpen takes one of the peer's one-time prekeys: at most so many a minute per
        session, and per recipient whoever asks (on this node); None when this one may go."""
        now = time.monotonic()
        with self._opens_lock:
            mine = session.offline_opens
            theirs = self._opens_for.setdefault(peer, deque())
            for times in (mine, theirs):
                while times and now - times[0] > 60.0:
                    times.popleft()
            if len(mine) >= self.config.offline_opens_per_minute:
                return "Too many offline conversations opened in a minute; try again shortly."
            if len(theirs) >= self.config.offline_opens_per_recipient_per_minute:
                return (
                    f"Too many offline conversations with {peer} were opened in a minute; try again shortly."
                )
            mine.append(now)
            theirs.append(now)
            while len(self._opens_for) > MAX_TRACKED_RECIPIENTS:
                self._opens_for.pop(next(iter(self._opens_for)))
        return None

    def _store(self, session: Session, msg: P.Store) -> None:
        me = session.username
        assert me is not None and session.identity_key is not None
        known = (
            self.storage.get_conversation(msg.conversation_id) if msg.conversation_id <= MAX_DB_ID else None
        )
        if known is None or me not in known.members:
            session.send(
                P.StoreResult(
                    conversation_id=msg.conversation_id,
                    msg_ref=msg.msg_ref,
                    status=P.StoreStatus.REFUSED,
                    reason="No such conversation.",
                )
            )
            return
        recipient = known.members[1] if known.members[0] == me else known.members[0]
        status, _qid = self.storage.enqueue(
            D.QueuedMessage(
                0,
                recipient,
                me,
                msg.conversation_id,
                msg.generation,
                msg.msg_ref,
                session.identity_key,
                msg.payload,
                time.time(),
                None,
            ),
            self.config.queue_max_messages,
            self.config.queue_max_bytes,
        )
        if status == D.NO_KEY:
            result, reason = (
                P.StoreStatus.NO_KEY,
                "That offline conversation key has expired; open a new one.",
            )
        elif status in (D.FULL_MESSAGES, D.FULL_BYTES):
            limit = (
                f"{self.config.queue_max_messages} messages"
                if status == D.FULL_MESSAGES
                else f"{self.config.queue_max_bytes // (1 << 20)} MiB"
            )
            result = P.StoreStatus.REFUSED
            reason = (
                f"{recipient}'s mailbox is full ({limit} waiting); this message was not stored. Nothing "
                f"already stored for {recipient} was lost; try again once {recipient} has read them."
            )
            log.info("a stored message was refused: the recipient's queue is full (%s)", status)
        else:
            handed = self._nudge_queue(recipient)
            result, reason = (P.StoreStatus.HANDED_OVER if handed else P.StoreStatus.STORED), ""
        session.send(
            P.StoreResult(
                conversation_id=msg.conversation_id, msg_ref=msg.msg_ref, status=result, reason=reason
            )
        )

    def _nudge_queue(self, recipient: str) -> bool:
        """The recipient is online (here or on another node): hand them what waits now."""
        local = self.registry.session_of(recipient)
        if local is not None:
            self.push_queue(local)
            return True
        if self.cluster.is_remote(recipient):
            nudge = P.StoredMessage(
                queue_id=0,
                conversation_id=0,
                sender=recipient,
                suite=0,
                generation=0,
                key=b"",
                sender_identity=bytes(32),
                stored_at_ms=0,
                payload=b"",
            )
            self.on_loop(self.cluster.deliver, recipient, nudge)  # that node reads the queue
            return True
        return False

    def push_queue(self, session: Session) -> None:
        """Send the session's stored messages, in order, at most QUEUE_WINDOW unacknowledged (a worker)."""
        me = session.username
        if me is None or session.closed.is_set():
            return
        with session.queue_lock:
            room = QUEUE_WINDOW - session.queue_in_flight
            if room < QUEUE_WINDOW // 2:
                return  # enough in flight: acknowledgements bring the rest
            for row in self.storage.queued_for(me, session.queue_sent_upto, room):
                sent = session.send(
                    self.room_row_message(me, row) if row.kind else self._stored_message(me, row)
                )
                if not sent:
                    return
                session.queue_sent_upto = row.id
                session.queue_in_flight += 1

    def _stored_message(self, me: str, row: D.QueuedMessage) -> P.StoredMessage:
        key = b""
        if row.wrapped_key is not None and len(row.wrapped_key) > 12:
            try:
                key = self._offline_keys.decrypt(
                    row.wrapped_key[:12],
                    row.wrapped_key[12:],
                    self._wrap_aad(me, row.conversation_id, row.generation),
                )
            except Exception:  # noqa: BLE001 - InvalidTag: another service's key; the client says so
                key = b""
        return P.StoredMessage(
            queue_id=row.id,
            conversation_id=row.conversation_id,
            sender=row.sender,
            suite=self.suite.suite_id,
            generation=row.generation,
            key=key,
            sender_identity=row.sender_identity,
            stored_at_ms=int(row.stored_at * 1000),
            payload=row.payload,
        )

    def _defer(self, session: Session, msg: P.Defer) -> None:
        """The client keeps the message for later (a changed identity awaiting /accept): it stays
        stored, comes again at the next login, and no longer holds up the messages behind it."""
        with session.queue_lock:
            if 0 < msg.queue_id <= session.queue_sent_upto:
                session.queue_in_flight = max(0, session.queue_in_flight - 1)
        self.push_queue(session)

    def _ack(self, session: Session, msg: P.Ack) -> None:
        me = session.username
        assert me is not None
        if msg.queue_id <= MAX_DB_ID and self.storage.ack_queued(me, msg.queue_id):
            with session.queue_lock:
                session.queue_in_flight = max(0, session.queue_in_flight - 1)
            self.push_queue(session)

    # -- account self-service (docs/PROTOCOL.md section 14.1) -------------------------
    def _delete_account(self, session: Session, msg: P.DeleteAccount) -> None:
        """The password again (bcrypt, with the login lockout) and the username typed; then it is all gone."""
        me = session.username
        assert me is not None
        if msg.confirm != me:
            session.send(
                P.AccountDeleted(
                    deleted=False, reason="The confirmation is not your username; nothing was deleted."
                )
            )
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
        session.send(
            P.AccountDeleted(
                deleted=True, reason="Your account and everything the server kept for it were deleted."
            )
        )
        session.close("Your account was deleted.")

    _HANDLERS = {
        P.Login: _auth,
        P.Register: _auth,
        P.Resume: _resume,
        P.OpenConversation: _open,
        P.Relay: _relay,
        P.WhoRequest: _who,
        P.RegisterEndpoint: _register_endpoint,
        P.DirectRequest: _direct_request,
        P.ChangePassword: _change_password,
    }
    _HANDLERS[P.DeleteAccount] = _delete_account
    _HANDLERS.update(
        {
            P.PublishPrekeys: _publish_prekeys,
            P.OfflineOpen: _offline_open,
            P.Store: _store,
            P.Ack: _ack,
            P.Defer: _defer,
        }
    )
    _HANDLERS.update(
        {
            P.RoomCreate: RoomService._room_create,
            P.RoomChange: RoomService._room_change,
            P.RoomSend: RoomService._room_send,
        }
    )


# =============================================================================
# The socket server
# =============================================================================
class Server:
    """A loop thread for every socket, a pool of worker threads for slow work.

    One event loop (uvloop where it is installed, else asyncio's) owns the
    listening socket and every connection.  Relayed messages are opened, checked
    and re-sealed on the loop thread: that is the hot path, and it takes no lock
    shared by all sessions.  Everything slow runs on ``workers`` threads: the
    handshake's key agreement and signature, logins (bcrypt has its own pool,
    auth.py), and every database call, so a login burst never stalls the relay.
    A session's input is handled in order: while a worker has it, what arrives
    next waits in its inbox (bounded; past that the socket is not read).

    The constructor loads keys and opens the database but does not listen;
    ``start()`` binds (port 0 picks a free port) and starts the loop thread,
    ``serve_forever()`` accepts until ``shutdown()``, which stops everything and
    closes the database.
    """

    def __init__(
        self,
        config: ServerConfig,
        announce: Callable[[str], None] = lambda line: None,
        storage: Storage | None = None,
    ) -> None:
        self.config = config
        self.announce = announce
        data_dir = Path(config.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ticket_key = None
        if config.identity_key_file is not None:  # one identity for every node of a cluster
            self.identity = cu.load_identity(Path(config.identity_key_file))
            ticket_key = cu.hkdf(
                self.identity.private_bytes_raw(),
                salt=None,
                info=cu.label("ticket key from the identity"),
                length=32,
            )
        else:
            self.identity = cu.load_or_create_identity(data_dir / IDENTITY_FILE)
        self.fingerprint = cu.fingerprint(self.identity.public_key())
        self.storage = storage or open_storage(config.database_url)
        if config.cluster_url and self.storage.backend.lower().startswith("sqlite"):
            self.storage.close()
            raise ConfigError(
                "--cluster needs a database every node shares: use --db mysql://... "
                "(SQLite is one file on one machine)."
            )
        self.service = ChatService(self.storage, config, announce, ticket_key=ticket_key)
        self.rate_limiter = SourceRateLimiter(
            config.connections_per_source_per_s, config.connection_burst_per_source
        )
        self.puzzle = PuzzleGate(
            config.puzzle_mode,
            base_difficulty=config.puzzle_bits,
            load_threshold=config.puzzle_load_threshold,
            load=self.service.registry.unauthenticated_total,
        )
        self.loop = new_event_loop()
        self.loop_thread_id: int | None = None
        self.pool = ThreadPoolExecutor(max_workers=config.worker_threads, thread_name_prefix="worker")
        # Password work (a thread waits for bcrypt, about 240 ms at cost 12) has threads of its own:
        # a burst of logins must not queue the KDC, opens or resumes behind it.
        self.password_pool = ThreadPoolExecutor(
            max_workers=config.worker_threads, thread_name_prefix="password"
        )
        self.modexp = diffiehellman.ModexpOffload()
        self._aserver: asyncio.AbstractServer | None = None
        self._listener: socket.socket | None = None
        self._loop_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self.moderation = ModerationPoller(
            self.storage,
            self.service.address_bans,
            kick=self.service.kick,
            kick_banned_sources=self.service.kick_banned_sources,
            audit_retention_s=config.audit_retention_days * 86400,
        )
        self.metrics_endpoint: MetricsEndpoint | None = None

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> tuple[str, int]:
        listener = socket.create_server(
            (self.config.host, self.config.port), backlog=1024, reuse_port=self.config.reuse_port
        )
        listener.setblocking(False)
        self._listener = listener
        self._loop_thread = threading.Thread(target=self._run_loop, name="loop", daemon=True)
        self._loop_thread.start()
        self._aserver = asyncio.run_coroutine_threadsafe(
            self.loop.create_server(lambda: Link(self), sock=listener, start_serving=False), self.loop
        ).result()
        host, port = self.server_address
        if not self.config.node_name:
            self.service.node = f"{socket.gethostname()}:{port}"[:64]
        try:
            self.storage.clear_sessions(self.service.node)  # rows a crashed run of this node left
        except DatabaseError as exc:
            log.warning("cannot clear old session rows: %s", exc)
        self.service.attach(self.loop, self.loop_thread_id, self.pool)
        diffiehellman.offload_modexp(self.modexp)  # finite-field groups: pow() off the GIL
        self.moderation.start()
        if self.config.metrics_port is not None:
            self._start_metrics()
        return host, port

    def _run_loop(self) -> None:
        self.loop_thread_id = threading.get_ident()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self._stopped.set()

    def _start_metrics(self) -> None:
        registry, auth = self.service.registry, self.service.auth
        self.service.metrics.watch(
            open_connections=lambda: len(registry.all_sessions()),
            online_users=lambda: len(registry.online_users()),
            outbox_bytes=lambda: sum(s.link.buffered for s in registry.all_sessions() if s.link is not None),
            bcrypt_queue=lambda: auth._bcrypt._work_queue.qsize(),  # noqa: SLF001 - a gauge only reads it
            puzzle_difficulty=self.puzzle.difficulty,
        )
        self.metrics_endpoint = MetricsEndpoint(
            self.service.metrics, self.health, self.config.metrics_port or 0
        )
        self.metrics_endpoint.start()

    def health(self) -> str | None:
        """None when healthy (accepting, database answering), else the reason: the /healthz answer."""
        if self._stopping.is_set() or self._listener is None:
            return "shutting down"
        try:
            self.storage.count_users()
        except DatabaseError:
            return "database"
        return self.service.cluster.health()

    @property
    def server_address(self) -> tuple[str, int]:
        assert self._listener is not None, "call start() first"
        host, port = self._listener.getsockname()[:2]
        return host, port

    def serve_forever(self) -> None:
        """Accept connections until ``shutdown()`` (from another thread or a signal handler)."""
        assert self._aserver is not None, "call start() first"
        if not self._stopping.is_set():
            asyncio.run_coroutine_threadsafe(self._aserver.start_serving(), self.loop).result()
        while not self._stopping.wait(0.5):  # a timed wait: signals reach the main thread
            pass
        self._stopped.wait()

    def shutdown(self, reason: str = "The server is shutting down.") -> None:
        if self._stopping.is_set() and self._stopped.is_set():
            return
        self._stopping.set()
        self.moderation.stop()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
        if self._loop_thread is not None and self.loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._close_all(reason), self.loop).result(timeout=10)
            except Exception:  # noqa: BLE001 - stopping goes on whatever one step did
                log.exception("error while closing connections")
            self.service.cluster_stop()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._loop_thread.join(timeout=10)
        self._stopped.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.password_pool.shutdown(wait=True, cancel_futures=True)
        try:  # what the cancelled bookkeeping would have removed: nobody is connected here any more
            self.storage.clear_sessions(self.service.node)
        except DatabaseError as exc:
            log.warning("cannot clear session rows: %s", exc)
        if diffiehellman._modexp_hook is self.modexp:  # noqa: SLF001 - ours to take back
            diffiehellman.offload_modexp(None)
        self.modexp.shutdown()
        if not self.loop.is_running():
            self.loop.close()
        self.storage.close()

    async def _close_all(self, reason: str) -> None:
        if self._aserver is not None:
            self._aserver.close()
        sessions = self.service.registry.all_sessions()
        for session in sessions:
            session.close(reason)
        deadline = time.monotonic() + LINGER_S + 0.5
        while time.monotonic() < deadline and any(
            s.link is not None
            and s.link.transport is not None
            and not s.link.transport.is_closing()
            and s.link.transport.get_write_buffer_size()
            for s in sessions
        ):
            await asyncio.sleep(0.02)  # the farewells drain (bounded)
        for session in sessions:
            if session.link is not None and session.link.transport is not None:
                session.link.transport.close()

    # -- connections (loop thread) ----------------------------------------------------------
    def _admit(self, link: Link, source: str) -> Session | None:
        """Rate and connection limits, checked at accept: refused junk costs no work."""
        refusal = None
        if self._stopping.is_set():
            refusal = "shutting down"
        elif not self.rate_limiter.allow(source):
            refusal = "too many new connections from this address"
        proto = P.ServerProtocol(
            self.identity,
            suite=self.config.cipher,
            allowed_groups=self.config.allowed_groups,
            tdes_backend=self.config.tdes_backend,
            puzzle=self.puzzle,
            source=source,
        )
        session = Session(proto, link, source)
        if refusal is None:
            refusal = self.service.registry.add_connection(
                session,
                self.config.max_connections,
                self.config.max_unauthenticated,
                self.config.max_unauthenticated_per_source,
            )
        if refusal is None:
            self.service.metrics.connections.inc()
            self.loop.call_later(self.config.login_grace_s, self._login_deadline, session)
            return session
        self.service.metrics.connections_refused.inc()
        log.warning("refused a connection from %s: %s", source, refusal)
        assert link.transport is not None
        link.transport.write(P.encode_frame(P.HandshakeError(code=P.HandshakeErrorCode.BUSY).encode()))
        link.transport.close()
        return None

    def _login_deadline(self, session: Session) -> None:
        if session.username is None and not session.closed.is_set():
            log.info("closed %s: no login within %.0f s", session.source, self.config.login_grace_s)
            session.closed.set()
            if session.link is not None:
                session.link._abort()

    def _feed(self, session: Session, data: bytes) -> None:
        if session.inbox or session.busy or not session.proto.established:
            session.inbox.append(data)
            session.inbox_bytes += len(data)
            self._pump(session)
            return
        # The common case, without the inbox: an idle, established session sent relays.
        events = self._open_records(session, data)
        for i, event in enumerate(events or ()):
            if session.closed.is_set():
                return
            if not self._fast(session, event):
                session.inbox.extend(events[i:])  # the rest in order, behind the slow one
                self._pump(session)
                return
            self._handle(session, event)

    def _pump(self, session: Session) -> None:
        """Handle what waits in the session's inbox, in order: fast work here, slow work on a worker."""
        inbox = session.inbox
        while inbox and not session.busy:
            if session.closed.is_set():
                inbox.clear()
                return
            item = inbox.popleft()
            if isinstance(item, bytes):
                session.inbox_bytes -= len(item)
                if not session.proto.established:  # the handshake's DH and signature: a worker's job
                    self._to_worker(session, self._work_handshake, item)
                    break
                events = self._open_records(session, item)
                if events is None:
                    return
                inbox.extendleft(reversed(events))
            elif self._fast(session, item):
                self._handle(session, item)
            elif isinstance(item, P.Message):
                self._to_worker(session, self._work_message, item)
        link = session.link
        if link is not None and link.transport is not None:
            if link.peer_eof and not inbox and not session.busy:
                link._close_gracefully()  # all the peer sent is answered
            elif len(inbox) > MAX_INBOX_ITEMS or session.inbox_bytes > MAX_INBOX_BYTES:
                link.transport.pause_reading()
            elif (
                len(inbox) < INBOX_RESUME_ITEMS
                and session.inbox_bytes <= MAX_INBOX_BYTES
                and not link.transport.is_closing()
            ):
                link.transport.resume_reading()

    def _fast(self, session: Session, msg) -> bool:
        """Handled on the loop thread (no database, no slow crypto): relays, /who, and a room message
        whose room and members are known here (room_service.room_send_is_fast)."""
        kind = type(msg)
        return kind in FAST_MESSAGES or (kind is P.RoomSend and self.service.room_send_is_fast(session, msg))

    def _open_records(self, session: Session, data: bytes) -> list | None:
        """The messages in ``data`` (an established session's records), or None after a protocol error."""
        try:
            return session.receive(data)[0]
        except ProtocolError as exc:
            self._protocol_failed(session, exc)
            return None

    def _handle(self, session: Session, msg: P.Message) -> None:
        try:
            self.service.handle(session, msg)
        except Exception:  # noqa: BLE001 - one broken request must never take the server down
            log.exception("unexpected error on a connection from %s", session.source)
            session.close()

    def _to_worker(self, session: Session, job, item) -> None:
        session.busy = True
        try:
            pool = self.password_pool if type(item) in PASSWORD_MESSAGES else self.pool
            pool.submit(self._run_job, session, job, item)
        except RuntimeError:  # the pool is shut down: the server is stopping
            session.busy = False

    def _run_job(self, session: Session, job, item) -> None:
        events: list = []
        try:
            events = job(session, item) or []
        except Exception:  # noqa: BLE001
            log.exception("unexpected error on a connection from %s", session.source)
            session.close()
        try:
            self.loop.call_soon_threadsafe(self._job_done, session, events)
        except RuntimeError:
            pass

    def _job_done(self, session: Session, events: list) -> None:
        session.busy = False
        session.inbox.extendleft(reversed(events))
        self._pump(session)

    # -- worker threads ------------------------------------------------------------------------
    def _work_handshake(self, session: Session, data: bytes) -> list:
        try:
            events, handshake_bytes = session.receive(data)
        except ProtocolError as exc:
            self._protocol_failed(session, exc)
            return []
        session.write_raw(handshake_bytes)
        return [e for e in events if isinstance(e, P.Message)]

    def _work_message(self, session: Session, msg: P.Message) -> None:
        self.service.handle(session, msg)

    def _protocol_failed(self, session: Session, exc: ProtocolError) -> None:
        """A sealed Goodbye with the reason (or the plaintext HandshakeError), then close."""
        log.info("closed %s: %s", session.source, exc)
        with session.lock:
            farewell = session.proto.farewell(str(exc)) or session.proto.data_to_send()
            session._queue_locked(farewell)
        session.closed.set()
        if session.link is not None:
            session.link.close_soon()

    def _lost(self, session: Session) -> None:
        """The session is over: others see the user gone at once (bookkeeping on a worker).  Once."""
        session.closed.set()
        session.inbox.clear()
        session.inbox_bytes = 0
        if not session.gone:
            session.gone = True
            self.service.disconnected(session)


MAX_HELD_RELAYS = 1024  # frames of one conversation waiting for its new key (a database write away)
RELAY_SAMPLE_MASK = 15  # the relay latency histogram times one relayed message in 16
# Checked with bcrypt: handled on the password threads.  Resume (a ticket, no bcrypt) is not.
PASSWORD_MESSAGES = frozenset({P.Login, P.Register, P.ChangePassword, P.DeleteAccount})
FAST_MESSAGES = frozenset({P.Relay, P.WhoRequest})  # handled on the loop thread: no database, no slow crypto


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop where it is installed (Linux, macOS), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


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
    p = argparse.ArgumentParser(
        description="secureim server: login, key distribution and relay.", formatter_class=_HelpWithDefaults
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (0 = any free port)")
    p.add_argument(
        "--db",
        dest="db_url",
        default=None,
        help="sqlite:///PATH or mysql://USER[:PASS]@HOST[:PORT]/DB. sqlite:///data/x.db is "
        "relative to the current folder, sqlite:////srv/x.db (four slashes) is absolute; "
        "the folder must exist. MySQL: the database is created if the account may "
        "(default: SQLite file secureim.db in the data dir)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("SECUREIM_DATA_DIR", DEFAULT_DATA_DIR)),
        help="where the identity key, ticket key and SQLite database live ($SECUREIM_DATA_DIR)",
    )
    p.add_argument(
        "--cipher",
        choices=cu.SUITE_NAMES,
        default=cu.DEFAULT_SUITE,
        help="cipher suite for sessions and conversations",
    )
    p.add_argument(
        "--bcrypt-cost", type=int, default=DEFAULT_BCRYPT_COST, help="bcrypt cost for new passwords (4-31)"
    )
    p.add_argument("--rekey-messages", type=int, default=1000, help="new conversation key after N messages")
    p.add_argument("--rekey-minutes", type=float, default=60.0, help="new conversation key after N minutes")
    p.add_argument("--login-grace", type=float, default=120.0, help="seconds from connect to logged in")
    p.add_argument(
        "--puzzle",
        choices=["off", "auto", "always"],
        default="auto",
        help="client puzzle before any DH work: auto = only under load",
    )
    p.add_argument("--puzzle-bits", type=int, default=16, help="base puzzle difficulty in bits (0-22)")
    p.add_argument(
        "--max-unauthenticated", type=int, default=256, help="half-open connections allowed at once"
    )
    p.add_argument(
        "--max-unauthenticated-per-source",
        type=int,
        default=32,
        help="half-open connections allowed per address",
    )
    p.add_argument(
        "--connections-per-second",
        type=float,
        default=20.0,
        help="new connections per second per address (burst: three times this)",
    )
    p.add_argument(
        "--log-level",
        type=_log_level,
        default="WARNING",
        metavar="LEVEL",
        help="log detail on stderr: DEBUG, INFO, WARNING or ERROR, in any case; WARNING shows "
        "failed logins and lockouts (never passwords)",
    )
    # Operating the server (admin.py, console.py, metrics.py); `python server.py admin --help` for the rest.
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics and /healthz on 127.0.0.1:PORT (0 = any free port)",
    )
    p.add_argument(
        "--audit-retention-days",
        type=float,
        default=DEFAULT_AUDIT_RETENTION_DAYS,
        help=f"keep audit rows this long (default {DEFAULT_AUDIT_RETENTION_DAYS:g})",
    )
    p.add_argument(
        "--console",
        choices=["auto", "on", "off"],
        default="auto",
        help="operator commands on stdin (/help): auto = only when stdin is a terminal",
    )
    # Scaling (docs/SCALING.md): worker processes on one machine, nodes on NATS.
    p.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="server processes sharing the port (SO_REUSEPORT); 'auto' = one per core. "
        "More than 1 needs --cluster: the workers talk over NATS",
    )
    p.add_argument(
        "--worker-threads",
        type=int,
        default=4,
        help="threads per process for slow work (handshakes, logins, the database)",
    )
    p.add_argument(
        "--cluster",
        dest="cluster_url",
        default=None,
        metavar="nats://HOST:PORT",
        help="join a cluster on this NATS server: several processes or machines, one service "
        "(needs a shared MySQL/MariaDB --db)",
    )
    p.add_argument("--cluster-prefix", default="secureim", help="NATS subject prefix of the cluster")
    p.add_argument(
        "--identity-key",
        type=Path,
        default=None,
        metavar="FILE",
        help="the service's Ed25519 identity (PEM, mode 0600), the same on every node; "
        "tickets and the cluster key derive from it (default: the data dir's own)",
    )
    p.add_argument(
        "--node-name",
        default="",
        help="this node's name in logs and `admin sessions` (default: hostname:port)",
    )
    p.add_argument(
        "--queue-max-messages",
        type=int,
        default=1000,
        metavar="N",
        help="stored messages kept for one offline user at most (then senders are told)",
    )
    p.add_argument(
        "--queue-max-mib",
        type=float,
        default=10.0,
        metavar="MIB",
        help="bytes of stored messages kept for one offline user at most, in MiB",
    )
    p.add_argument(
        "--queue-max-days",
        type=float,
        default=30.0,
        metavar="DAYS",
        help="stored messages unread this long are deleted",
    )
    p.add_argument(
        "--room-max-members",
        type=int,
        default=R.DEFAULT_MAX_MEMBERS,
        metavar="N",
        help=f"members one room may have (1-{R.HARD_MAX_MEMBERS})",
    )
    p.add_argument(
        "--room-sends-per-second",
        type=float,
        default=50.0,
        metavar="N",
        help="room messages one session may send a second (bursts of 4x); each is copied to every "
        "other member",
    )
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # set for each worker
    return p


def _workers(text: str) -> int:
    if text == "auto":
        return os.cpu_count() or 1
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a number of processes (1-256) or 'auto'") from None
    if not 1 <= n <= 256:
        raise argparse.ArgumentTypeError("a number of processes (1-256) or 'auto'")
    return n


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
    if not 1 <= args.worker_threads <= 256:
        raise ConfigError("--worker-threads must be between 1 and 256.")
    if (
        not 1 <= args.queue_max_messages <= 1_000_000
        or not 0 < args.queue_max_mib <= 4096
        or not 0 < args.queue_max_days <= 3650
    ):
        raise ConfigError(
            "--queue-max-messages is 1-1000000, --queue-max-mib 0-4096, --queue-max-days 0-3650."
        )
    if not 1 <= args.room_max_members <= R.HARD_MAX_MEMBERS:
        raise ConfigError(f"--room-max-members is 1-{R.HARD_MAX_MEMBERS}.")
    if not 0 < args.room_sends_per_second <= 100_000:
        raise ConfigError("--room-sends-per-second is more than 0 and at most 100000.")
    if args.cluster_url is not None:
        if not args.cluster_url.startswith(("nats://", "tls://")):
            raise ConfigError("--cluster takes a NATS URL: nats://HOST:PORT")
        from cluster_nats import check_prefix

        check_prefix(args.cluster_prefix)
        if not (args.db_url or "").startswith(("mysql://", "mariadb://")):
            raise ConfigError(
                "--cluster needs a database every node shares: --db mysql://USER@HOST/DB "
                "(SQLite is one file on one machine)."
            )
    return ServerConfig(
        host=args.host,
        port=args.port,
        db_url=args.db_url,
        data_dir=args.data_dir,
        cipher=args.cipher,
        bcrypt_cost=args.bcrypt_cost,
        rekey_after_messages=args.rekey_messages,
        rekey_after_s=args.rekey_minutes * 60,
        login_grace_s=args.login_grace,
        puzzle_mode=args.puzzle,
        puzzle_bits=args.puzzle_bits,
        max_unauthenticated=args.max_unauthenticated,
        max_unauthenticated_per_source=args.max_unauthenticated_per_source,
        connections_per_source_per_s=args.connections_per_second,
        connection_burst_per_source=max(1, int(args.connections_per_second * 3)),
        metrics_port=args.metrics_port,
        audit_retention_days=args.audit_retention_days,
        worker_threads=args.worker_threads,
        reuse_port=args.reuse_port,
        cluster_url=args.cluster_url,
        cluster_prefix=args.cluster_prefix,
        identity_key_file=args.identity_key,
        node_name=args.node_name[:64],
        queue_max_messages=args.queue_max_messages,
        queue_max_bytes=int(args.queue_max_mib * (1 << 20)),
        queue_max_age_s=args.queue_max_days * 86400.0,
        room_max_members=args.room_max_members,
        room_sends_per_s=args.room_sends_per_second,
    )


class LinePrinter:
    """Console lines from the loop and the workers, printed by a thread of their own, so a slow
    terminal or a pipe nobody reads never stalls the server.  Bounded: past MAX_LINES waiting, a
    line is dropped and counted (the count is printed with the next line that fits)."""

    MAX_LINES = 10_000

    def __init__(self) -> None:
        import queue

        self._lines: "queue.Queue[str]" = queue.Queue(maxsize=self.MAX_LINES)
        self._dropped = 0
        threading.Thread(target=self._run, name="console-out", daemon=True).start()

    def put(self, line: str) -> None:
        import queue

        try:
            self._lines.put_nowait(f"{time.strftime(TIME_FORMAT)} {line}")
        except queue.Full:
            self._dropped += 1

    def _run(self) -> None:
        while True:
            line = self._lines.get()
            if self._dropped:
                dropped, self._dropped = self._dropped, 0
                print(
                    f"{time.strftime(TIME_FORMAT)} [SERVER]: ({dropped} console lines dropped: the "
                    "console was not read)",
                    flush=True,
                )
            print(line, flush=True)
            self._lines.task_done()

    def drain(self, timeout_s: float = 5.0) -> None:
        """Wait (bounded) until every waiting line is printed."""
        deadline = time.monotonic() + timeout_s
        while self._lines.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)


def _raise_fd_limit() -> None:
    """One descriptor per connection: lift the soft limit (often 1,024) to the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, OSError, ValueError):  # not POSIX, or not allowed: keep what we have
        pass


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):  # noqa: ARG001 - signal handler signature
    raise _Stop()


def _stdin_is_our_terminal() -> bool:
    """A terminal, and we are in its foreground (``server.py &`` must not stop on reading it)."""
    try:
        return (
            sys.stdin is not None and sys.stdin.isatty() and os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
        )
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["admin"]:  # the operator's command line (admin.py)
        import admin

        return admin.main(argv[1:])
    args = build_arg_parser().parse_args(argv)
    if args.workers > 1:
        import workers

        return workers.supervise(args, argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt=TIME_FORMAT
    )

    def say(line: str) -> None:
        print(f"{time.strftime(TIME_FORMAT)} {line}", flush=True)

    say("[SERVER]: Initializing...")
    _raise_fd_limit()
    try:
        config = config_from_args(args)
        printer = LinePrinter()
        server = Server(config, announce=printer.put)
        host, port = server.start()
    except (SecureIMError, OSError) as exc:
        print(f"{time.strftime(TIME_FORMAT)} [SERVER]: Cannot start: {exc}", file=sys.stderr, flush=True)
        return 1
    say("[SERVER]: Initialization complete.")
    say(f"[SERVER]: Listening on {host}:{port} ({config.cipher}, database: {server.storage.backend}).")
    say(f"[SERVER]: Server identity fingerprint: {server.fingerprint}")
    if server.metrics_endpoint is not None:
        say(
            f"[SERVER]: Metrics on http://127.0.0.1:{server.metrics_endpoint.port}/metrics"
            f" (health: /healthz)."
        )
    if args.console == "on" or (args.console == "auto" and _stdin_is_our_terminal()):
        from admin import AdminOps
        from console import ServerConsole

        if hasattr(
            signal, "SIGTTIN"
        ):  # sent to the background later: a read fails (the console ends), no stop
            signal.signal(signal.SIGTTIN, signal.SIG_IGN)
        ServerConsole(
            AdminOps(server.storage, "console", bcrypt_cost=config.bcrypt_cost), sys.stdin, say
        ).start()
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
        printer.drain()
        say("[SERVER]: Stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
