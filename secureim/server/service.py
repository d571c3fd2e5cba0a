"""The chat service: the composition root of the domain handlers, the router, and the façade the
network shell, the operator's tools, the cluster (as its ``cluster.host.ClusterHost``) and tests use.

It never touches a socket.  Which thread runs each message, and the lock order: router.py."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import crypto_utils as cu
from secureim import proto as P
from secureim import storage as D
from secureim.errors import DatabaseError, ServiceUnavailable
from secureim.server.accounts import AuthService
from secureim.server.cluster.local import Cluster, LocalCluster
from secureim.server.cluster.nats_bus import NatsCluster, bus_key
from secureim.server.config import ServerConfig
from secureim.server.direct import DirectMode
from secureim.server.kdc import Conversations
from secureim.server.logins import AccountHandlers
from secureim.server.metrics import ServerMetrics
from secureim.server.moderation import AddressBans, Moderation
from secureim.server.presence import Presence
from secureim.server.registry import Registry, Session
from secureim.server.rooms import RoomHandlers, RoomKeyring
from secureim.server.router import Router, build_routes
from secureim.server.runtime import Runtime
from secureim.server.store_forward import Mailbox
from secureim.server.tickets import TicketIssuer, load_or_create_ticket_key
from secureim.storage import Storage

log = logging.getLogger("secureim.server")


class ChatService:
    """Login, presence, KDC, relay, queue, rooms, direct mode.  No sockets; tests drive it directly."""

    def __init__(
        self,
        storage: Storage,
        config: ServerConfig,
        announce: Callable[[str], None] = lambda _line: None,
        *,
        ticket_key: bytes | None = None,
    ) -> None:
        self.storage = storage
        self.config = config
        self.announce = announce
        ticket_key = ticket_key or load_or_create_ticket_key(Path(config.data_dir))
        cluster: Cluster = LocalCluster()
        if config.cluster_url:
            cluster = NatsCluster(
                config.cluster_url,
                config.cluster_prefix,
                bus_key(ticket_key),
                config.node_name or socket.gethostname(),
            )
        # First: suite, cluster, node, loop... are properties that read and write it.
        self.runtime = Runtime(
            cluster,
            config.node_name or socket.gethostname(),
            cu.get_suite(config.cipher, tdes_backend=config.tdes_backend),
        )
        self.auth = AuthService(
            storage, bcrypt_cost=config.bcrypt_cost, max_failures=config.max_failures, lock_s=config.lock_s
        )
        self.registry = Registry()
        self.tickets = TicketIssuer(ticket_key)
        # The KDC keys of offline conversations wait in the database sealed under this (every node has it).
        self._offline_keys = cu.SealedBox(
            cu.hkdf(ticket_key, salt=None, info=cu.label("offline kdc keys at rest"), length=32),
            "offline kdc key",
        )
        # Operating the server (moderation.py, metrics.py): bans, kicks, the audit log, counters.
        self.metrics = ServerMetrics()
        self.address_bans = AddressBans()
        runtime, registry = self.runtime, self.registry
        self.moderation = Moderation(storage, self.address_bans, self.metrics, registry)
        self.presence = Presence(registry, storage, runtime, announce)
        self.conversations = Conversations(registry, storage, runtime, self.metrics, config)
        self.metrics.relayed_total = lambda: self.conversations.relayed
        self.direct = DirectMode(registry, runtime)
        self.room_keyring = RoomKeyring(storage, registry, runtime, ticket_key)
        self.mailbox = Mailbox(
            storage, registry, runtime, self.conversations, self.room_keyring, self._offline_keys, config
        )
        self.rooms = RoomHandlers(
            storage,
            self.room_keyring,
            registry,
            self.mailbox,
            self.moderation,
            runtime,
            self.metrics,
            config,
        )
        self.accounts = AccountHandlers(
            storage,
            self.auth,
            self.tickets,
            self.moderation,
            registry,
            self.presence,
            self.mailbox,
            runtime,
            self.metrics,
            config,
            announce,
        )
        self.router = Router(
            build_routes(
                self.accounts,
                self.conversations,
                self.presence,
                self.direct,
                self.mailbox,
                self.rooms,
                self.room_keyring,
            )
        )

    # -- the late-bound values (Server.start, tests): kept in the runtime, read per call ---------
    @property
    def suite(self) -> cu.Suite:
        return self.runtime.suite

    @suite.setter
    def suite(self, value: cu.Suite) -> None:
        self.runtime.suite = value

    @property
    def cluster(self) -> Cluster:
        return self.runtime.cluster

    @cluster.setter
    def cluster(self, value: Cluster) -> None:
        self.runtime.cluster = value

    @property
    def node(self) -> str:
        return self.runtime.node

    @node.setter
    def node(self, value: str) -> None:
        self.runtime.node = value

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self.runtime.loop

    @property
    def loop_thread_id(self) -> int | None:
        return self.runtime.loop_thread_id

    @loop_thread_id.setter
    def loop_thread_id(self, value: int | None) -> None:
        self.runtime.loop_thread_id = value

    @property
    def pool(self) -> ThreadPoolExecutor | None:
        return self.runtime.pool

    @property
    def relayed(self) -> int:
        return self.conversations.relayed

    # -- life cycle ----------------------------------------------------------------------------
    def attach(
        self, loop: asyncio.AbstractEventLoop, loop_thread_id: int | None, pool: ThreadPoolExecutor
    ) -> None:
        """Serve from ``loop`` with slow work on ``pool`` (Server.start calls this)."""
        self.runtime.attach(loop, loop_thread_id, pool)
        self.cluster.start(self)
        self.runtime.on_loop(self.mailbox.expire_soon, 0.0)

    def cluster_stop(self) -> None:
        self.cluster.stop()

    # -- dispatch ------------------------------------------------------------------------------
    def handle(self, session: Session, msg: P.Message) -> None:
        handler = self.router.handlers.get(type(msg))
        if handler is None:
            return  # Goodbye: the protocol already closed the session
        try:
            handler(session, msg)
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

    # -- the façade: operators (admin, console, ModerationPoller), the net shell, tests ------------
    def audit(self, event: str, username: str = "", source: str = "", detail: str = "") -> None:
        self.moderation.audit(event, username, source, detail)

    def kick(self, username: str, reason: str) -> bool:
        return self.moderation.kick(username, reason)

    def kick_banned_sources(self) -> int:
        return self.moderation.kick_banned_sources()

    def password_changed(self, username: str, source: str) -> int:
        return self.accounts.password_changed(username, source)

    def disconnected(self, session: Session) -> None:
        self.presence.disconnected(session)

    def room_send_is_fast(self, session: Session, msg: P.RoomSend) -> bool:
        return self.room_keyring.send_is_fast(session, msg)

    def room_row_message(self, me: str, row: D.QueuedMessage) -> P.Message:
        return self.room_keyring.row_message(me, row)

    # -- ClusterHost (cluster/host.py): what the cluster bus needs of this node ----------------------------
    def on_loop(self, fn: Callable[..., object], *args: object) -> None:
        self.runtime.on_loop(fn, *args)

    def run_slow(self, fn: Callable[..., object], *args: object) -> None:
        self.runtime.run_slow(fn, *args)

    def bus_gauge(self, read: Callable[[], float]) -> None:
        self.metrics.nats_connected.set_function(read)

    def session_of(self, username: str) -> Session | None:
        return self.registry.session_of(username)

    def online_snapshot(self) -> list[tuple[str, float, bytes]]:
        return self.registry.online_snapshot()

    def take_watchers(self, username: str) -> set[str]:
        return self.registry.take_watchers(username)

    def drop_conversations(self, username: str, *, watch: bool) -> list[str]:
        return self.registry.drop_conversations(username, watch=watch)

    def notify(self, username: str, peers: Iterable[str], *, online: bool) -> None:
        self.presence.notify(username, peers, online=online)

    def replaced_elsewhere(self, session: Session) -> None:
        self.presence.replaced_elsewhere(session)

    def learn_conversation(self, cid: int, members: tuple[str, str], generation: int) -> None:
        self.presence.learn_conversation(cid, members, generation)

    def push_queue(self, session: Session) -> None:
        self.mailbox.push_queue(session)

    def room_copy_to_queue(self, member: str, msg: P.RoomMessage, sender_identity: bytes | None) -> None:
        self.rooms.copy_to_queue(member, msg, sender_identity)

    def direct_offer_for(
        self, peer: str, initiator: str, host: str, port: int, conversation_id: int
    ) -> P.DirectOffer | str:
        return self.direct.direct_offer_for(peer, initiator, host, port, conversation_id)
