"""Who is online: sessions, live conversations, rate limits, under one lock."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from secureim import proto as P
from secureim.errors import (
    AuthError,
    ConnectionClosed,
    ProtocolError,
)
from secureim.proto import normalize_username

log = logging.getLogger("secureim.server")


# =============================================================================
# Sessions: one connection's protocol state and its outgoing bytes
# =============================================================================
LINGER_S = 1.0  # after a farewell: read (and drop) what still arrives, then close
MAX_INBOX_ITEMS = 256  # a session's unprocessed input past this: stop reading its socket
MAX_INBOX_BYTES = 256 * 1024  # ... or past this many raw bytes (before login a read is not yet framed)
INBOX_RESUME_ITEMS = 64


class SessionLink(Protocol):
    """What a Session needs of its connection (net.Link is the one implementation)."""

    buffered: int  # bytes written but not yet taken by the kernel
    limit: int  # past buffered + queued > limit the client is too slow and is dropped

    def flush_soon(self) -> None: ...
    def close_soon(self) -> None: ...
    def abort(self, why: str) -> None: ...


class Session:
    """One client connection: its protocol state machine and its outgoing bytes.

    ``send()`` may be called from any thread (the loop, a worker, the moderation
    poller): sealing and queueing happen under the session's lock, so the
    sequence numbers and the byte order on the wire agree.  The queued bytes are
    written by the event loop, once per loop turn however many messages were
    queued (``Link.flush``).
    """

    def __init__(self, proto: P.ServerProtocol, link: SessionLink | None, source: str) -> None:
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

    def say_farewell(self, reason: str) -> None:
        """Queue the sealed Goodbye (or the plaintext HandshakeError) for a protocol failure."""
        with self.lock:
            farewell = self.proto.farewell(reason) or self.proto.data_to_send()
            self._queue_locked(farewell)

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

    def online_count(self) -> int:
        """How many users are online here (no lock: a len() for a log line)."""
        return len(self.online)

    def online_snapshot(self) -> list[tuple[str, float, bytes]]:
        """(username, login time, identity key) of each user online here, for the cluster's snapshot."""
        return [
            (name, s.login_at, s.identity_key)
            for name, s in list(self.online.items())
            if s.identity_key is not None
        ]

    def online_users(self) -> list[str]:
        with self.lock:
            return sorted(self.online)

    def all_sessions(self) -> list[Session]:
        with self.lock:
            return list(self.sessions)


def loggable(raw: str) -> str:
    """A username as it may appear in a log line: normalised and quoted, or "an invalid username"."""
    try:
        return repr(normalize_username(raw))
    except AuthError:
        return "an invalid username"
