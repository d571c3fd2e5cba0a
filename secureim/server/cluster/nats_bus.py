"""The cluster bus on NATS: several server nodes, one service (docs/SCALING.md).

Each node keeps its own connections and, in memory, a table of who is online on
the other nodes.  What crosses nodes goes over NATS core subjects under one
prefix (``--cluster-prefix``, default ``secureim``):

- ``PREFIX.presence``: every node publishes and subscribes.  ONLINE / OFFLINE
  of a user (with the login time: the newest login wins, an older session
  elsewhere is closed), a HEARTBEAT every second, and SYNC, a request that every
  node answer with a SNAPSHOT of its users (sent when a node joins or its link
  comes back).
- ``PREFIX.node.<id>``: one node's inbox.  DELIVER (a Deliver, PeerStatus or
  DirectAsked for one of its users), KEY (a KDC ConversationKey, and the
  conversation it opens), SNAPSHOT, and DIRECT (a request for a direct-mode
  offer, answered on the NATS reply subject).

Every bus frame is sealed with AES-256-GCM under a key every node derives from
the shared ticket key, with the subject as associated data: a NATS user without
the data directory can neither read a frame (it carries conversation keys and
who talks to whom) nor forge one.  Each frame carries the sender's incarnation
and a sequence number per subject; a frame that is not newer than the last one
seen from that sender on that subject (a replay, a duplicate) is dropped, as is
one more than ``MAX_FRAME_AGE_S`` old.

Durable state stays in the shared database; the bus carries only what is live.
When the link to NATS is down, users on this node keep chatting, a send to a
user on another node is refused at once ("temporarily unreachable"), nothing is
buffered to be delivered late, and nats-py reconnects by itself; then SYNC
brings the tables back in line.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import crypto_utils as cu
from secureim import proto as P
from secureim.errors import ConfigError, DecryptionFailed, SecureIMError
from secureim.server.cluster.local import Cluster

if TYPE_CHECKING:
    from nats.aio.client import Client

    from secureim.server.cluster.host import ClusterHost

log = logging.getLogger("secureim.cluster")

FRAME_VERSION = 1
HEARTBEAT_S = 1.0
NODE_TIMEOUT_S = 4.0  # a node not heard for this long is gone: its users are offline
CONNECT_TIMEOUT_S = 5.0  # at start: NATS must answer within this, else the server refuses to start
DIRECT_TIMEOUT_S = 3.0
MAX_FRAME_AGE_S = 60.0
PING_INTERVAL_S = 2  # nats-py's default is 120 s: a dead link would look alive for minutes
LINK_STUCK_S = 3.0  # down this long although NATS may be back: a fresh connection
SNAPSHOT_CHUNK = 2000  # users per SNAPSHOT frame (each ~80 bytes: well under NATS' 1 MiB)
MAX_PREFIX_CHARS = 64
MAX_REMOTE_USERS = 2_000_000
MAX_SEEN_STREAMS = 10_000  # (sender, subject) pairs whose sequence numbers are remembered
DROP_LOG_EVERY_S = 1.0  # at most one "dropped a frame" warning a second (the rest counted)
BUS_KEY_LABEL = "cluster bus"

# Frame types
ONLINE, OFFLINE, HEARTBEAT, SYNC, SNAPSHOT, DELIVER, KEY, DIRECT = range(1, 9)
_HEAD = struct.Struct(">B16sQd")  # type, sender incarnation, sequence, sent at (wall clock)
_FIELD = struct.Struct(">I")


def bus_key(ticket_key: bytes) -> bytes:
    return cu.hkdf(ticket_key, salt=None, info=cu.label(BUS_KEY_LABEL), length=32)


def pack_fields(*fields: bytes) -> bytes:
    return b"".join(_FIELD.pack(len(f)) + f for f in fields)


def unpack_fields(data: bytes, count: int | None = None) -> list[bytes]:
    """Length-prefixed fields; raises SecureIMError on anything malformed."""
    fields, offset = [], 0
    while offset < len(data):
        if offset + _FIELD.size > len(data):
            raise SecureIMError("truncated bus frame")
        (n,) = _FIELD.unpack_from(data, offset)
        offset += _FIELD.size
        if offset + n > len(data):
            raise SecureIMError("truncated bus frame")
        fields.append(data[offset : offset + n])
        offset += n
    if count is not None and len(fields) != count:
        raise SecureIMError("wrong number of fields in a bus frame")
    return fields


def check_prefix(prefix: str) -> str:
    ok = (
        prefix
        and len(prefix) <= MAX_PREFIX_CHARS
        and all(part and all(c.isalnum() or c in "-_" for c in part) for part in prefix.split("."))
    )
    if not ok:
        raise ConfigError(
            f"--cluster-prefix {prefix!r}: use letters, digits, '-', '_' and dots "
            f"(at most {MAX_PREFIX_CHARS} characters)."
        )
    return prefix


def _aad(subject: str) -> bytes:
    """A frame is bound to its subject: one sent to node A does not open when replayed to node B."""
    return b"secureim/v1 bus " + subject.encode()


@dataclass
class RemoteUser:
    node: bytes  # the incarnation id of the node they are on
    login_at: float
    identity_key: bytes


class BusCodec:
    """Seals and opens bus frames; tracks sequence numbers (one sender and subject at a time)."""

    def __init__(self, key: bytes, incarnation: bytes) -> None:
        self._aead = cu.get_suite("aes256").cipher(key)
        self.incarnation = incarnation
        self._sent: dict[str, int] = {}
        self._seen: OrderedDict[tuple[bytes, str], int] = OrderedDict()

    def seal(self, subject: str, kind: int, body: bytes, *, tracked: bool = True) -> bytes:
        """``tracked=False``: a reply on a one-time inbox subject (no sequence state is kept for it)."""
        seq = self._sent.get(subject, 0) + 1 if tracked else 0
        if tracked:
            self._sent[subject] = seq
        plain = _HEAD.pack(kind, self.incarnation, seq, time.time()) + body
        return bytes([FRAME_VERSION]) + self._aead.seal(plain, _aad(subject))

    def open(self, subject: str, data: bytes, *, tracked: bool = True) -> tuple[int, bytes, bytes]:
        """(type, sender incarnation, body); raises SecureIMError for a forged, stale or replayed frame."""
        if not data or data[0] != FRAME_VERSION:
            raise SecureIMError("unknown bus frame version")
        try:
            plain = self._aead.open(data[1:], _aad(subject))
        except DecryptionFailed:
            raise SecureIMError("a bus frame failed authentication (wrong cluster key, or forged)") from None
        if len(plain) < _HEAD.size:
            raise SecureIMError("short bus frame")
        kind, sender, seq, sent_at = _HEAD.unpack_from(plain)
        if abs(time.time() - sent_at) > MAX_FRAME_AGE_S:
            raise SecureIMError("a stale bus frame (replayed, or a clock far off)")
        if not tracked:  # a reply: its subject is a one-time inbox, bound as associated data
            return kind, sender, plain[_HEAD.size :]
        key = (sender, subject)
        if seq <= self._seen.get(key, 0):
            raise SecureIMError("a replayed or duplicate bus frame")
        self._seen[key] = seq
        self._seen.move_to_end(key)
        if len(self._seen) > MAX_SEEN_STREAMS:  # bounded: forget the least recently heard sender
            self._seen.popitem(last=False)
        return kind, sender, plain[_HEAD.size :]


class Frame(Protocol):
    """A received NATS message (nats-py's Msg; the tests' stand-ins)."""

    subject: str
    data: bytes
    reply: str


class NatsCluster(Cluster):
    """A node of a cluster: NATS for what is live, the shared database for what lasts."""

    def __init__(self, url: str, prefix: str, key: bytes, node_name: str) -> None:
        self.url = url
        self.prefix = check_prefix(prefix)
        self.incarnation = uuid.uuid4().bytes
        self.node_id = self.incarnation.hex()[:16]
        self.node_name = node_name
        self.codec = BusCodec(key, self.incarnation)
        self.presence_subject = f"{self.prefix}.presence"
        self.receiver = BusReceiver(self, self.incarnation)
        self.remote = self.receiver.remote  # the receiver's tables (loop thread only), never re-bound
        self.nodes = self.receiver.nodes
        self._out: deque = deque()
        self._out_ready: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self.nc: Client | None = None
        self.host: ClusterHost | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.connected_since: float | None = None
        self.lost_at: float | None = None
        self.frames_dropped = 0
        self._last_drop_log = -DROP_LOG_EVERY_S
        self._link_gen = 0  # which connection the nats-py callbacks belong to (the watchdog replaces it)
        receiver = self.receiver
        self._frame_handlers: dict[int, Callable[[bytes, bytes, Frame], Awaitable[None]]] = {
            ONLINE: receiver.on_online,
            OFFLINE: receiver.on_offline,
            HEARTBEAT: receiver.on_heartbeat,
            SYNC: receiver.on_sync,
            SNAPSHOT: receiver.on_snapshot,
            DELIVER: receiver.on_deliver,
            KEY: receiver.on_key,
            DIRECT: receiver.on_direct,
        }

    @property
    def _host(self) -> ClusterHost:
        assert self.host is not None, "bind() first"
        return self.host

    def node_subject(self, incarnation: bytes) -> str:
        return f"{self.prefix}.node.{incarnation.hex()[:16]}"

    def direct_subject(self, incarnation: bytes) -> str:
        """DIRECT requests: a subject of their own, so their sequence numbers never interleave with
        the node inbox's (a request sealed after a queued frame must not overtake it)."""
        return f"{self.prefix}.node.{incarnation.hex()[:16]}.direct"

    # -- life cycle ----------------------------------------------------------------------
    def bind(self, host: ClusterHost) -> None:
        """Serve ``host`` (its loop is attached); no connection yet (``start`` connects)."""
        self.host, self.loop = host, host.loop
        self.receiver.host = host
        host.bus_gauge(lambda: 1 if self.connected else 0)

    def start(self, host: ClusterHost) -> None:
        self.bind(host)
        assert self.loop is not None
        future = asyncio.run_coroutine_threadsafe(self._connect(), self.loop)
        try:
            future.result(timeout=CONNECT_TIMEOUT_S + 2)
        except Exception as exc:  # noqa: BLE001 - one clear line, whatever nats-py raised
            reason = str(exc) or exc.__class__.__name__
            raise ConfigError(f"Cannot reach the cluster bus at {self.url}: {reason}") from None

    async def _connect(self) -> None:
        self._out_ready = asyncio.Event()
        try:
            await asyncio.wait_for(self._open_link(), CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise ConfigError(
                f"Cannot reach the cluster bus at {self.url}: no answer within {CONNECT_TIMEOUT_S:.0f} s"
            ) from None
        self._tasks = [asyncio.ensure_future(self._publisher()), asyncio.ensure_future(self._heartbeats())]
        log.info("joined the cluster at %s as node %s", self.url, self.node_id)

    async def _open_link(self) -> None:
        """Connect, subscribe, and ask every node who is online (at start, and by the watchdog)."""
        try:
            import nats
        except ImportError:
            raise ConfigError("--cluster needs nats-py: pip install -r requirements.txt") from None
        self._link_gen += 1
        gen = self._link_gen

        async def disconnected() -> None:  # a replaced connection's news is not ours any more
            if gen == self._link_gen:
                await self._on_disconnected()

        async def reconnected() -> None:
            if gen == self._link_gen:
                await self._on_reconnected()

        nc = await nats.connect(
            servers=[self.url],
            name=f"secureim {self.node_name}",
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=2,
            ping_interval=PING_INTERVAL_S,
            max_outstanding_pings=3,  # a silently dead link in seconds
            pending_size=0,  # never buffer while disconnected: a late delivery is a surprise
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=self._on_error,
        )
        try:
            await nc.subscribe(self.presence_subject, cb=self._on_frame)
            await nc.subscribe(self.node_subject(self.incarnation), cb=self._on_frame)
            await nc.subscribe(self.direct_subject(self.incarnation), cb=self._on_frame)
            await nc.flush(timeout=2)
        except BaseException:
            await nc.close()  # never leave a half-set-up connection reconnecting on its own
            raise
        self.nc = nc
        self.connected_since = time.monotonic()
        self.lost_at = None
        self._publish(self.presence_subject, SYNC, b"")

    async def _watchdog(self) -> None:
        """nats-py reconnects by itself; if its link stays down past LINK_STUCK_S anyway (seen when
        NATS restarts during traffic), start a fresh connection."""
        if self.lost_at is None or self.connected or time.monotonic() - self.lost_at < LINK_STUCK_S:
            return
        old, self.lost_at = self.nc, time.monotonic()
        try:
            assert old is not None  # lost_at is set only once a link was up
            await asyncio.wait_for(old.close(), 1)
        except Exception:  # noqa: BLE001 - the old link is being thrown away
            pass
        try:
            await asyncio.wait_for(self._open_link(), CONNECT_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - try again on the next tick
            log.info("cluster bus at %s still unreachable: %s", self.url, exc)
            return
        await self._link_back()

    def stop(self) -> None:
        if self.loop is None or self.nc is None or not self.loop.is_running():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(timeout=5)
        except Exception:  # noqa: BLE001
            log.warning("leaving the cluster did not finish cleanly")

    async def _stop(self) -> None:
        nc = self.nc
        assert nc is not None  # stop() checked
        await self._drain_out()
        for task in self._tasks:
            task.cancel()
        try:
            await asyncio.wait_for(nc.drain(), 2)
        except Exception:  # noqa: BLE001
            await nc.close()

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    def health(self) -> str | None:
        return None if self.connected else "cluster bus unreachable"

    async def _on_disconnected(self) -> None:
        if self.connected_since is None:
            return  # already said
        self.connected_since = None
        self.lost_at = time.monotonic()
        log.warning(
            "lost the cluster bus at %s; reconnecting (users on other nodes are unreachable)", self.url
        )

    async def _on_reconnected(self) -> None:
        self.connected_since = time.monotonic()
        self.lost_at = None
        await self._link_back()

    async def _link_back(self) -> None:
        log.warning("the cluster bus at %s is back", self.url)
        now = time.monotonic()
        for node in self.nodes:  # nobody was heard while we were away: count from now
            self.nodes[node] = now
        self._publish(self.presence_subject, SYNC, b"")
        self.receiver.send_snapshot(self.presence_subject)

    async def _on_error(self, exc) -> None:
        log.info("cluster bus: %s", exc)

    # -- publishing (any thread) ----------------------------------------------------------------
    def publish(self, subject: str, kind: int, body: bytes) -> bool:
        """The receiver's way out (through ``_publish``, which tests replace)."""
        return self._publish(subject, kind, body)

    async def reply(self, subject: str, body: bytes) -> None:
        """Answer a DIRECT request (loop thread)."""
        assert self.nc is not None
        await self.nc.publish(subject, self.codec.seal(subject, DIRECT, body, tracked=False))

    def _publish(self, subject: str, kind: int, body: bytes) -> bool:
        """Queue one frame for the publisher task; False (nothing queued) while the link is down."""
        if not self.connected:
            return False
        self._call(self._enqueue, subject, kind, body)
        return True

    def _enqueue(self, subject: str, kind: int, body: bytes) -> None:
        self._out.append((subject, self.codec.seal(subject, kind, body)))
        assert self._out_ready is not None  # made before the link is up (_connect)
        self._out_ready.set()

    async def _publisher(self) -> None:
        ready = self._out_ready
        assert ready is not None  # _connect made it before starting this task
        while True:
            await ready.wait()
            ready.clear()
            await self._drain_out()

    async def _drain_out(self) -> None:
        while self._out:
            subject, data = self._out.popleft()
            nc = self.nc
            if nc is None or not self.connected:
                self.frames_dropped += 1  # queued in the instant the link went down: never sent late
                continue
            try:
                await nc.publish(subject, data)
            except Exception as exc:  # noqa: BLE001 - a lost link must not end the publisher
                self.frames_dropped += 1
                log.info("a cluster frame was not sent: %s", exc)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                self._publish(self.presence_subject, HEARTBEAT, self.node_name.encode()[:64])
                self._expire_nodes()
                await self._watchdog()
            except Exception:
                log.exception("cluster heartbeat")

    # -- the service's calls ------------------------------------------------------------------
    def user_online(self, username: str, login_at: float, identity_key: bytes) -> None:
        self._call(self._logged_in_here, username, login_at, identity_key)

    def _logged_in_here(self, username: str, login_at: float, identity_key: bytes | None) -> None:
        """On the loop thread, so it is ordered with the session's end (user_offline)."""
        self.receiver.forget_remote(username)
        self.receiver.announce_online(username, login_at, identity_key)

    def user_offline(self, username: str, login_at: float) -> None:
        self._publish(
            self.presence_subject, OFFLINE, pack_fields(username.encode(), struct.pack(">d", login_at))
        )

    def is_remote(self, username: str) -> bool:
        return username in self.remote

    def identity_of(self, username: str) -> bytes | None:
        entry = self.remote.get(username)
        return entry.identity_key if entry is not None else None

    def remote_users(self) -> list[str]:
        return list(self.remote)

    def deliver(self, username: str, msg: P.Message) -> bool:
        entry = self.remote.get(username)
        if entry is None:
            return False
        return self._publish(
            self.node_subject(entry.node), DELIVER, pack_fields(username.encode(), msg.encode())
        )

    def send_key(
        self, username: str, members: tuple[str, str], generation: int, msg: P.ConversationKey
    ) -> bool:
        entry = self.remote.get(username)
        if entry is None:
            return False
        return self._publish(
            self.node_subject(entry.node),
            KEY,
            pack_fields(username.encode(), members[0].encode(), members[1].encode(), msg.encode()),
        )

    def direct_offer(self, peer: str, initiator: str, host: str, port: int, conversation_id: int):
        entry = self.remote.get(peer)
        if entry is None or not self.connected:
            return f"{peer} is offline." if entry is None else f"{peer} is temporarily unreachable."
        subject = self.direct_subject(entry.node)
        body = pack_fields(
            peer.encode(),
            initiator.encode(),
            host.encode(),
            str(port).encode(),
            str(conversation_id).encode(),
        )

        async def ask():  # on the loop thread: the codec's state is the loop's alone
            nc = self.nc
            assert nc is not None
            reply = await nc.request(
                subject, self.codec.seal(subject, DIRECT, body), timeout=DIRECT_TIMEOUT_S
            )
            return self.codec.open(reply.subject, reply.data, tracked=False)[2]

        try:
            loop = self.loop
            assert loop is not None
            answer = asyncio.run_coroutine_threadsafe(ask(), loop).result(timeout=DIRECT_TIMEOUT_S + 1)
            offer = P.decode_message(answer)
        except Exception:  # noqa: BLE001 - a timeout, a node gone, a bad answer: all "not now"
            return f"{peer}'s server node did not answer; try again."
        if isinstance(offer, P.DirectUnavailable):
            return offer.reason
        if not isinstance(offer, P.DirectOffer):
            return f"{peer}'s server node gave no offer."
        return offer

    # -- receiving (loop thread) --------------------------------------------------------------
    def _expire_nodes(self) -> None:
        """Nodes silent for NODE_TIMEOUT_S are gone (SIGKILL, a crash): their users are offline.

        Only while our own link has been up that long: when we were cut off, silence says nothing."""
        if self.connected_since is None or time.monotonic() - self.connected_since < NODE_TIMEOUT_S:
            return
        self.receiver.expire_nodes()

    def _call(self, fn, *args) -> None:
        """Run ``fn`` on the loop thread: now if this is it, else as soon as it can."""
        self._host.on_loop(fn, *args)

    async def _on_frame(self, msg) -> None:
        try:
            kind, sender, body = self.codec.open(msg.subject, msg.data)
            if sender == self.incarnation:
                return  # our own broadcast
            self.nodes[sender] = time.monotonic()
            handler = self._frame_handlers.get(kind)
            if handler is None:
                raise SecureIMError(f"unknown bus frame type {kind}")
            await handler(sender, body, msg)
        except (SecureIMError, ValueError, struct.error, UnicodeDecodeError) as exc:
            self.frames_dropped += 1
            now = time.monotonic()
            if now - self._last_drop_log >= DROP_LOG_EVERY_S:  # a flood of junk must not flood the log
                self._last_drop_log = now
                log.warning(
                    "dropped a cluster frame on %s: %s (%d dropped so far)",
                    msg.subject,
                    exc,
                    self.frames_dropped,
                )
        except Exception:
            log.exception("error handling a cluster frame")


class BusOut(Protocol):
    """What the receiver needs of the bus (NatsCluster)."""

    presence_subject: str

    def publish(self, subject: str, kind: int, body: bytes) -> bool: ...
    def node_subject(self, incarnation: bytes) -> str: ...
    async def reply(self, subject: str, body: bytes) -> None: ...


class BusReceiver:
    """The frames other nodes send (loop thread only): who is online there (ONLINE, OFFLINE,
    HEARTBEAT, SYNC, SNAPSHOT: the remote table; this node's users announced out; silent nodes'
    users expired), and what comes for this node's users (DELIVER, KEY, DIRECT)."""

    def __init__(self, bus: BusOut, incarnation: bytes) -> None:
        self._bus = bus
        self.incarnation = incarnation
        self.host: ClusterHost | None = None
        self.remote: dict[str, RemoteUser] = {}
        self.nodes: dict[bytes, float] = {}  # incarnation -> last heard (monotonic)
        self._snapshots: dict[tuple[bytes, bytes], set[str]] = {}  # (node, snapshot id) -> names so far
        self._known_nodes: set[bytes] = set()

    @property
    def _host(self) -> ClusterHost:
        assert self.host is not None, "bind() first"
        return self.host

    def announce_online(self, username: str, login_at: float, identity_key: bytes | None) -> None:
        session = self._host.session_of(username)
        if session is None or session.login_at != login_at or identity_key is None:
            return  # it ended before this ran: its OFFLINE (or nothing) is what others must hear
        self._bus.publish(
            self._bus.presence_subject,
            ONLINE,
            pack_fields(username.encode(), struct.pack(">d", login_at), identity_key),
        )

    async def on_online(self, sender: bytes, body: bytes, _msg: object) -> None:
        name, when, key = unpack_fields(body, 3)
        self._remote_online(sender, name.decode(), struct.unpack(">d", when)[0], key)

    def _remote_online(self, sender: bytes, username: str, login_at: float, key: bytes) -> None:
        username = P.normalize_username(username)
        host = self._host
        previous = self.remote.get(username)
        if previous is not None and previous.node == sender and previous.login_at == login_at:
            return  # nothing new (a snapshot repeats what we know): conversations go on
        local = host.session_of(username)
        if local is not None:
            if (local.login_at, self.incarnation) > (login_at, sender):
                # Ours is newer.  Say so again: that node closes its session when it hears it (it may
                # have forgotten ours when its user logged in there).
                self.announce_online(username, local.login_at, local.identity_key)
                return
            host.replaced_elsewhere(local)  # its conversations end; its peers hear of the new one below
        if previous is not None and (previous.login_at, previous.node) > (login_at, sender):
            return
        if len(self.remote) >= MAX_REMOTE_USERS and previous is None:
            raise SecureIMError("remote presence table full")
        self.remote[username] = RemoteUser(sender, login_at, key)
        # As for a local login: whoever waits for this user, and whoever had a conversation with
        # the session it replaces, is told (and re-opens: the new session has no keys).
        waiting = host.take_watchers(username)
        waiting |= set(host.drop_conversations(username, watch=False))
        host.notify(username, waiting, online=True)

    async def on_offline(self, sender: bytes, body: bytes, _msg: object) -> None:
        name, when = unpack_fields(body, 2)
        self._remote_offline(name.decode(), sender, struct.unpack(">d", when)[0])

    def _remote_offline(self, username: str, sender: bytes, login_at: float | None) -> None:
        entry = self.remote.get(username)
        if entry is None or entry.node != sender or (login_at is not None and entry.login_at != login_at):
            return  # an older session's end: the user is on elsewhere now
        del self.remote[username]
        self._dropped(username)

    def _dropped(self, username: str) -> None:
        host = self._host
        host.notify(username, host.drop_conversations(username, watch=True), online=False)

    def forget_remote(self, username: str) -> None:
        """``username`` logged in here: an entry for them elsewhere is older (that node closes it).

        Conversations with the session there end, and their peers here re-open with this one."""
        if self.remote.pop(username, None) is None:
            return
        self._host.notify(username, self._host.drop_conversations(username, watch=False), online=True)

    async def on_heartbeat(self, sender: bytes, body: bytes, _msg: object) -> None:
        if sender not in self._known_nodes:
            self._known_nodes.add(sender)
            # A node we have not seen (it started, we missed its SYNC, or we expired it while it was
            # stalled): tell it who is here, and ask it who is there.
            self.send_snapshot(self._bus.node_subject(sender))
            self._bus.publish(self._bus.node_subject(sender), SYNC, b"")

    async def on_sync(self, sender: bytes, body: bytes, _msg: object) -> None:
        self._known_nodes.add(sender)
        self.send_snapshot(self._bus.node_subject(sender))

    def send_snapshot(self, subject: str) -> None:
        users = self._host.online_snapshot()
        chunks = [users[i : i + SNAPSHOT_CHUNK] for i in range(0, len(users), SNAPSHOT_CHUNK)] or [[]]
        snapshot_id = cu.random_bytes(8)  # two snapshots from one node never mix
        for index, chunk in enumerate(chunks):
            last = b"1" if index == len(chunks) - 1 else b"0"
            fields = [snapshot_id, last]
            for name, when, key in chunk:
                fields += [name.encode(), struct.pack(">d", when), key]
            self._bus.publish(subject, SNAPSHOT, pack_fields(*fields))

    async def on_snapshot(self, sender: bytes, body: bytes, _msg: object) -> None:
        fields = unpack_fields(body)
        if len(fields) < 2 or (len(fields) - 2) % 3:
            raise SecureIMError("malformed snapshot")
        stream = (sender, fields[0])
        if stream not in self._snapshots and len(self._snapshots) >= MAX_SEEN_STREAMS:
            self._snapshots.pop(next(iter(self._snapshots)))  # bounded: an unfinished one is forgotten
        seen = self._snapshots.setdefault(stream, set())
        for i in range(2, len(fields), 3):
            name = fields[i].decode()
            seen.add(name)
            self._remote_online(sender, name, struct.unpack(">d", fields[i + 1])[0], fields[i + 2])
        if fields[1] == b"1":  # complete: whoever we list on that node and it does not is gone
            del self._snapshots[stream]
            for name in [n for n, e in self.remote.items() if e.node == sender and n not in seen]:
                self._remote_offline(name, sender, None)

    def identity_of(self, username: str) -> bytes | None:
        entry = self.remote.get(username)
        return entry.identity_key if entry is not None else None

    # -- frames for this node's users --------------------------------------------------------
    async def on_deliver(self, sender: bytes, body: bytes, _msg: object) -> None:
        name, inner = unpack_fields(body, 2)
        msg = P.decode_message(inner)
        if not isinstance(
            msg, (P.Deliver, P.PeerStatus, P.DirectAsked, P.Error, P.StoredMessage, P.RoomMessage)
        ):
            raise SecureIMError(f"a {type(msg).__name__} is not delivered across nodes")
        session = self._host.session_of(name.decode())
        if isinstance(
            msg, P.StoredMessage
        ):  # a nudge: messages were stored for them; the queue is in the database
            if session is not None:
                self._host.run_slow(self._host.push_queue, session)
            return
        if session is not None and session.send(msg):
            return
        if isinstance(msg, P.RoomMessage):  # they left this node meanwhile: the copy waits in their queue
            self._host.run_slow(
                self._host.room_copy_to_queue, name.decode(), msg, self.identity_of(msg.sender)
            )
            return
        if isinstance(
            msg, P.Deliver
        ):  # gone from here in the meantime: the sender hears it was not delivered
            bounce = P.Error(
                code=P.ErrorCode.PEER_OFFLINE, reason=f"{name.decode()} is offline; message not delivered."
            )
            self._bus.publish(
                self._bus.node_subject(sender), DELIVER, pack_fields(msg.sender.encode(), bounce.encode())
            )

    async def on_key(self, sender: bytes, body: bytes, _msg: object) -> None:
        name, first, second, inner = unpack_fields(body, 4)
        msg = P.decode_message(inner)
        if not isinstance(msg, P.ConversationKey):
            raise SecureIMError("a KEY frame without a conversation key")
        username, members = name.decode(), (first.decode(), second.decode())
        if username not in members or msg.peer not in members:
            raise SecureIMError("a KEY frame for someone outside its conversation")
        session = self._host.session_of(username)
        if session is None:
            return
        self._host.learn_conversation(msg.conversation_id, members, msg.generation)
        session.send(msg)

    async def on_direct(self, sender: bytes, body: bytes, msg: Frame) -> None:
        peer, initiator, host, port, cid = (f.decode() for f in unpack_fields(body, 5))
        answer: P.Message | str = self._host.direct_offer_for(peer, initiator, host, int(port), int(cid))
        if isinstance(answer, str):
            answer = P.DirectUnavailable(peer=peer, reason=answer)
        if msg.reply:
            await self._bus.reply(msg.reply, answer.encode())

    def expire_nodes(self) -> None:
        """Nodes silent for NODE_TIMEOUT_S are gone (SIGKILL, a crash): their users are offline."""
        now = time.monotonic()
        for node, heard in list(self.nodes.items()):
            if now - heard > NODE_TIMEOUT_S:
                del self.nodes[node]
                self._known_nodes.discard(node)
                gone = [name for name, e in self.remote.items() if e.node == node]
                if gone:
                    log.warning(
                        "cluster node %s went silent; %d of its users are offline", node.hex()[:16], len(gone)
                    )
                for name in gone:
                    self._remote_offline(name, node, None)
