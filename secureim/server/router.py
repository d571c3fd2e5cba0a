"""Where each client message runs and which handler takes it: the one table of the server.

Threads
-------
- **loop** (one, ``net.Server._run_loop``): every asyncio callback, ``Link``, ``Server.feed/pump``,
  the LOOP routes below (no database, no slow crypto), ``_job_done``, the KDC's key hand-out and the
  release of held frames (``kdc.Conversations``), the cluster bus's frame handlers and publisher.
- **worker-N** (``Server.pool``): handshakes, the WORKER routes, everything ``Runtime.run_slow``
  submits (session bookkeeping, re-keys, queue expiry, room copies queued for members away).
- **password-N** (``Server.password_pool``): the PASSWORD routes; each waits for a **bcrypt-N**
  thread (``accounts.AuthService``).
- **modexp** process (finite-field DH, a worker waits), **moderation** (``ModerationPoller``: kicks),
  **metrics** (gauges read the registry under its lock), **console**, **main**.
Loop-thread-only state, no lock: ``Session.inbox/inbox_bytes/busy/gone``, a ``LiveConversation``'s
counters and ``held`` frames, ``Conversations.relayed``, the cluster's remote table, ``Link``.
One session's input runs in order: while a WORKER/PASSWORD job has it (``busy``), what follows
waits in its inbox, LOOP messages included.

Lock order (all ``threading.Lock``, none re-entrant; nothing else nests)
-----------------------------------------------------------------------
1. ``Session.queue_lock`` -> {storage pool lock, ``RoomKeyring._room_cache_lock``, ``Session.lock``}
   (``Mailbox.push_queue``: queued rows read, room rows rendered, sent).
2. ``Conversations._kdc_lock`` -> storage pool lock (``fresh_key``); never held while sending.
3. ``Session.lock``, ``Registry.lock``, ``Mailbox._opens_lock``, ``_room_cache_lock``, the rate
   limiter's, ``AddressBans``', ``PuzzleGate``'s, the modexp offload's: leaves.
Forbidden: ``Session.send`` under ``Registry.lock``; ``queue_lock`` under ``Session.lock``; handing
out a key off the loop thread; a LOOP route that touches storage.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from secureim import proto as P

if TYPE_CHECKING:
    from secureim.server.registry import Session

# A handler takes the session and one message of its route's type (Any: each takes its own type).
Handler = Callable[["Session", Any], None]
LoopIf = Callable[["Session", Any], bool]


class Placement(enum.Enum):
    LOOP = "loop"  # the event-loop thread, in the session's order
    WORKER = "worker"  # Server.pool
    PASSWORD = "password"  # Server.password_pool: waits for bcrypt


@dataclass(frozen=True)
class Route:
    placement: Placement
    handler: Handler | None = None
    loop_if: LoopIf | None = None  # LOOP when this says so (asked on the loop thread), else `placement`


NO_ROUTE = Route(Placement.WORKER)  # a message without a handler: a no-op on a worker


# --- the router's view of each domain (bound methods) ---------------------------------------------
class AccountRoutes(Protocol):
    def login_or_register(self, session: Session, msg: P.Login | P.Register) -> None: ...
    def resume(self, session: Session, msg: P.Resume) -> None: ...
    def change_password(self, session: Session, msg: P.ChangePassword) -> None: ...
    def delete_account(self, session: Session, msg: P.DeleteAccount) -> None: ...


class ConversationRoutes(Protocol):
    def relay(self, session: Session, msg: P.Relay) -> None: ...
    def open(self, session: Session, msg: P.OpenConversation) -> None: ...


class PresenceRoutes(Protocol):
    def who(self, session: Session, msg: P.WhoRequest) -> None: ...


class DirectRoutes(Protocol):
    def register_endpoint(self, session: Session, msg: P.RegisterEndpoint) -> None: ...
    def direct_request(self, session: Session, msg: P.DirectRequest) -> None: ...


class MailboxRoutes(Protocol):
    def publish_prekeys(self, session: Session, msg: P.PublishPrekeys) -> None: ...
    def offline_open(self, session: Session, msg: P.OfflineOpen) -> None: ...
    def store(self, session: Session, msg: P.Store) -> None: ...
    def ack(self, session: Session, msg: P.Ack) -> None: ...
    def defer(self, session: Session, msg: P.Defer) -> None: ...


class RoomRoutes(Protocol):
    def create(self, session: Session, msg: P.RoomCreate) -> None: ...
    def change(self, session: Session, msg: P.RoomChange) -> None: ...
    def send(self, session: Session, msg: P.RoomSend) -> None: ...


class RoomFastPath(Protocol):
    def send_is_fast(self, session: Session, msg: P.RoomSend) -> bool: ...


def build_routes(
    accounts: AccountRoutes,
    conversations: ConversationRoutes,
    presence: PresenceRoutes,
    direct: DirectRoutes,
    mailbox: MailboxRoutes,
    rooms: RoomRoutes,
    room_fast: RoomFastPath,
) -> dict[type[P.Message], Route]:
    """The table.  Any other message type (Goodbye, a server-to-client type) is NO_ROUTE."""
    loop, worker, password = Placement.LOOP, Placement.WORKER, Placement.PASSWORD
    return {
        P.Relay: Route(loop, conversations.relay),
        P.WhoRequest: Route(loop, presence.who),
        # On the loop when its room is cached for its epoch and every member is online (no database).
        P.RoomSend: Route(worker, rooms.send, loop_if=room_fast.send_is_fast),
        P.Login: Route(password, accounts.login_or_register),
        P.Register: Route(password, accounts.login_or_register),
        P.ChangePassword: Route(password, accounts.change_password),
        P.DeleteAccount: Route(password, accounts.delete_account),
        P.Resume: Route(worker, accounts.resume),  # a ticket, no bcrypt: not PASSWORD
        P.OpenConversation: Route(worker, conversations.open),
        P.RegisterEndpoint: Route(worker, direct.register_endpoint),
        P.DirectRequest: Route(worker, direct.direct_request),
        P.PublishPrekeys: Route(worker, mailbox.publish_prekeys),
        P.OfflineOpen: Route(worker, mailbox.offline_open),
        P.Store: Route(worker, mailbox.store),
        P.Ack: Route(worker, mailbox.ack),
        P.Defer: Route(worker, mailbox.defer),
        P.RoomCreate: Route(worker, rooms.create),
        P.RoomChange: Route(worker, rooms.change),
    }


# The static placements, for readers and tests (RoomSend's predicate is not a static fact).
FAST_MESSAGES = frozenset({P.Relay, P.WhoRequest})
PASSWORD_MESSAGES = frozenset({P.Login, P.Register, P.ChangePassword, P.DeleteAccount})


class Router:
    """The table, and what the hot path asks of it (each a set or dict lookup: no object per message)."""

    def __init__(self, routes: dict[type[P.Message], Route]) -> None:
        self._routes: dict[type, Route] = dict(routes)
        self._index()

    def _index(self) -> None:
        routes = self._routes.items()
        self.handlers: dict[type, Handler] = {k: r.handler for k, r in routes if r.handler is not None}
        self._loop_kinds = frozenset(k for k, r in routes if r.placement is Placement.LOOP)
        self._loop_if = {k: r.loop_if for k, r in routes if r.loop_if is not None}
        self._password_kinds = frozenset(k for k, r in routes if r.placement is Placement.PASSWORD)

    def route(self, kind: type) -> Route:
        return self._routes.get(kind, NO_ROUTE)

    def placement(self, session: Session, msg: object) -> Placement:
        """Loop thread only (the RoomSend predicate reads the room cache and the online table)."""
        return Placement.LOOP if self.runs_on_loop(session, msg) else self.route(type(msg)).placement

    def runs_on_loop(self, session: Session, msg: object) -> bool:
        """``placement(session, msg) is Placement.LOOP``, for the hot path (loop thread only)."""
        kind = type(msg)
        if kind in self._loop_kinds:
            return True
        loop_if = self._loop_if.get(kind)
        return loop_if is not None and loop_if(session, msg)

    def is_password_work(self, item: object) -> bool:
        """Whether ``item`` goes to the password pool (its route's static placement)."""
        return type(item) in self._password_kinds

    def handler(self, kind: type) -> Handler | None:
        return self.handlers.get(kind)

    def override(self, kind: type, handler: Handler) -> Handler | None:
        """Replace the handler of ``kind``, keeping its placement (tests spy on a handler this way);
        returns the handler it replaces."""
        previous = self.route(kind)
        self._routes[kind] = dataclasses.replace(previous, handler=handler)
        self._index()
        return previous.handler
