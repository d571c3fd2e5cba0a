"""``ChatClient``: connect, pin the server, log in, open conversations, chat.

``ChatClient`` is a facade: it builds the parts below, hands each the narrow Protocol it needs
(``ports.py``; the facade implements the host ones), routes the frames the server sends to them
(one dispatch table) and keeps the public surface the terminal, scripts, tests and benchmarks use.

- ``connection.Connection``: the socket, the handshake, the server pin, frames and barriers;
- ``session.Session``: the receiver thread, resume with the ticket, auto-reconnect, close;
- ``account.Account``: login/register, the ticket, the identity key, password change, deletion;
- ``trust.PeerTrustKeeper``: peers' identity keys (pinned; a changed key refused until accepted);
- ``conversations.Conversations``: presence, KDC keys, key shares, sealing in a live session;
- ``sending.Sender`` and ``offline.Mailbox``: every outgoing message (live, stored, confirmed)
  in ONE outbox (the mailbox's worker: ``courier.Courier``), and ``waiting.WaitingLines``: the
  lines typed while they cannot leave yet; ``inbox.Inbox``: stored messages coming in;
- ``direct.DirectMode``: the UDP links; ``rooms.RoomsClient``: group rooms;
- ``history.History``: the optional encrypted local history; events go to one queue (``events``).

Threads
-------
- the caller's thread (the terminal's main thread, a script, a test): every public method;
- "receiver" (``Session.receive_loop``, one per connection): reads frames and runs the dispatch
  table, so every ``on_*`` handler of every part; on a lost connection it runs the reconnect
  (``Session.reconnect``) itself, backoff included, then dies; the new connection has a new one;
- "offline-mail" (``Mailbox``'s worker): receipts and resends that must not block the receiver;
- "direct" (``DirectMode.udp_loop``): UDP datagrams of direct links;
- the terminal has its own threads (the event pump, the login-window watcher): they only call
  public methods of this facade.

Lock order (a lock is only ever taken while holding those to its left; none is held while an
event is emitted, except the event queue's own):
``Session._resume_lock`` -> ``Mailbox.lock`` -> ``RoomsClient.lock`` -> ``Conversations.lock``
-> ``DirectMode.lock`` -> ``Connection.send_lock``.  ``WaitingLines.order`` -> ``WaitingLines.lock``
is taken by the consumer of events only and never with a library lock held.
"""

from __future__ import annotations

import logging
import os
import queue
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crypto_utils as cu
from secureim import proto as P
from secureim.client import history as H
from secureim.client import offline as offline
from secureim.client import rooms as room_client
from secureim.client.account import Account
from secureim.client.connection import (
    CONNECT_TIMEOUT_S,
    NODE_CONNECT_TIMEOUT_S,
    REPLY_TIMEOUT_S,
    Barrier,
    Connection,
)
from secureim.client.conversations import (
    KEY_EXCHANGE_WAIT_S,
    PRESENCE_OFFLINE,
    PRESENCE_ONLINE,
    PRESENCE_REFUSED,
    PRESENCE_UNKNOWN,
    Conversations,
)
from secureim.client.direct import DirectMode
from secureim.client.display import sanitize
from secureim.client.events import (
    AccountDeletion,
    HistoryUnavailable,
    MessageRejected,
    SecurityWarning,
    ServerNotice,
    WhoList,
)
from secureim.client.incoming import Incoming
from secureim.client.sending import Sender
from secureim.client.session import (
    NODE_SHUTDOWN_REASONS,
    RECONNECT_ATTEMPTS,
    RECONNECT_BASE_DELAY_S,
    RECONNECT_MAX_DELAY_S,
    RECONNECT_MAX_S,
    Session,
)
from secureim.client.trust import PeerTrustKeeper
from secureim.client.waiting import MAX_QUEUED_LINES, LineOutcome, Say, WaitingLines
from secureim.e2e import sessions as e2e
from secureim.errors import ConfigError, HistoryError

log = logging.getLogger("secureim.client")

__all__ = [
    "CONNECT_TIMEOUT_S",
    "EVENT_QUEUE_MAX",
    "KEY_EXCHANGE_WAIT_S",
    "NODE_CONNECT_TIMEOUT_S",
    "NODE_SHUTDOWN_REASONS",
    "PRESENCE_OFFLINE",
    "PRESENCE_ONLINE",
    "PRESENCE_REFUSED",
    "PRESENCE_UNKNOWN",
    "PUBLISH_WAIT_S",
    "RECONNECT_ATTEMPTS",
    "RECONNECT_BASE_DELAY_S",
    "RECONNECT_MAX_DELAY_S",
    "RECONNECT_MAX_S",
    "REPLY_TIMEOUT_S",
    "Barrier",
    "ChatClient",
    "default_home",
]

EVENT_QUEUE_MAX = 10000
PUBLISH_WAIT_S = 3.0  # close() waits this long at most for prekeys still being published


def default_home() -> Path:
    env = os.environ.get("SECUREIM_HOME")
    return Path(env) if env else Path.home() / ".secureim"


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
        self.home = Path(home) if home is not None else default_home()
        self.connection = Connection(
            servers,
            self.home,
            group=group,
            suites=suites,
            server_fingerprint=server_fingerprint,
            timeout_s=timeout_s,
            reply_timeout_s=reply_timeout_s,
            on_key_mismatch=self.close,
        )
        self.history_enabled = history
        self._history_limits = (history_max_messages, history_max_age_days)
        self.history: H.History | None = None
        self.events: queue.Queue = queue.Queue(maxsize=EVENT_QUEUE_MAX)
        self.account = Account(
            self,
            self.connection,
            e2e.IdentityStore(self.home, self.server_id),
            persist_identity=persist_identity,
        )
        self.chats = Conversations(self)
        self.trust = PeerTrustKeeper(self, self.chats)
        self.direct = DirectMode(self, self.chats)
        self.session = Session(
            self,
            self.connection,
            self.account,
            self.chats,
            auto_reconnect=auto_reconnect,
            reconnect_attempts=reconnect_attempts,
            reconnect_max_s=reconnect_max_s,
        )
        # Store and forward (offline.py, docs/PROTOCOL.md section 15).
        self.mailbox = offline.Mailbox(self)
        self.rooms = room_client.RoomsClient(self)
        self.incoming = Incoming(self, self.mailbox, self.rooms, receipts=receipts)
        self.sender = Sender(self, self.connection, self.chats, self.direct, self.mailbox)
        self.waiting = WaitingLines(self, limit=MAX_QUEUED_LINES)
        # Looked up when a frame comes (late binding: a test may replace a part's handler).
        self._handlers: dict[type, Callable[[Any], None]] = {
            P.PeerStatus: lambda m: self.chats.on_peer_status(m),
            P.ConversationKey: lambda m: self.chats.on_key(m),
            P.Deliver: lambda m: self.chats.on_deliver(m),
            P.WhoResponse: lambda m: self._on_who_response(m),
            P.DirectOffer: lambda m: self.direct.on_offer(m),
            P.DirectAsked: lambda m: self.direct.on_asked(m),
            P.DirectUnavailable: lambda m: self.direct.on_unavailable(m),
            P.PasswordChanged: lambda m: self.account.on_password_reply(m),
            P.PasswordChangeFailed: lambda m: self.account.on_password_reply(m),
            P.Error: lambda m: self._on_error(m),
            P.AccountDeleted: lambda m: self._on_account_deleted(m),
            P.StoredMessage: lambda m: self.mailbox.on_stored(m),
            P.StoreResult: lambda m: self.mailbox.on_store_result(m),
            P.OfflineKey: lambda m: self.mailbox.on_offline_key(m),
            P.PrekeyStatus: lambda m: self.mailbox.on_prekey_status(m),
            P.RoomMessage: lambda m: self.rooms.on_message(m),
            P.RoomChanged: lambda m: self.rooms.on_changed(m),
            P.RoomSendResult: lambda m: self.rooms.on_send_result(m),
            P.RoomResult: lambda m: self.rooms.on_result(m),
        }

    # -- the parts' state, as it always was named ----------------------------------------------
    servers = property(
        lambda self: self.connection.servers, lambda self, v: setattr(self.connection, "servers", v)
    )
    timeout_s = property(
        lambda self: self.connection.timeout_s, lambda self, v: setattr(self.connection, "timeout_s", v)
    )
    host = property(lambda self: self.connection.host)
    port = property(lambda self: self.connection.port)
    sock = property(lambda self: self.connection.sock)
    proto = property(lambda self: self.connection.proto)
    known_servers = property(lambda self: self.connection.known_servers)
    server_fingerprint = property(lambda self: self.connection.server_fingerprint)
    first_contact = property(lambda self: self.connection.first_contact)
    conversations = property(lambda self: self.chats.sessions)
    peer_trust = property(lambda self: self.trust.peer_trust)
    closed = property(lambda self: self.session.closed)
    stopping = property(lambda self: self.session.stopping)
    auto_reconnect = property(lambda self: self.session.auto_reconnect)
    reconnect_attempts = property(lambda self: self.session.reconnect_attempts)
    reconnect_max_s = property(lambda self: self.session.reconnect_max_s)

    @property
    def username(self) -> str | None:
        return self.account.username

    @property
    def identity(self) -> cu.IdentityKey | None:
        return self.account.identity

    @property
    def identity_fingerprint(self) -> str | None:
        return self.account.identity_fingerprint

    @property
    def server_id(self) -> str:
        """The service id: the first server listed.  The pin, the identity file and the peer keys
        are kept under it, whichever node is in use (every node presents the same key)."""
        return self.connection.server_id

    @property
    def node_id(self) -> str:
        """The server (node) this client is connected to now."""
        return self.connection.node_id

    @property
    def reconnecting(self) -> bool:
        """auto_reconnect: the connection was lost and is being resumed; sending raises ConnectionClosed."""
        return self.connection.reconnecting

    # -- connection, account, session ------------------------------------------------------------
    def connect(self, *, start_at: int = 0) -> P.HandshakeComplete:
        return self.connection.connect(start_at=start_at)

    def wait_hangup(self, timeout_s: float) -> bool:
        return self.connection.wait_hangup(timeout_s)

    def send_frame(self, msg: P.Message) -> None:
        self.connection.send_frame(msg)

    def barrier_after(self, msg: P.Message) -> Barrier:
        return self.connection.barrier_after(msg)

    def login(self, username: str, password: str) -> P.AuthOk:
        return self.account.login(username, password)

    def register(self, username: str, password: str) -> P.AuthOk:
        return self.account.register(username, password)

    def change_password(self, old_password: str, new_password: str) -> None:
        self.account.change_password(old_password, new_password)

    def delete_account(self, password: str, confirm: str) -> None:
        self.account.delete_account(password, confirm)

    def resume(self) -> bool:
        return self.session.resume()

    def start(self) -> None:
        self.session.start()

    def who(self) -> None:
        """Ask who is online; the answer comes as a WhoList event."""
        self.connection.send_who()

    # -- conversations and peers -----------------------------------------------------------------
    def open_conversation(self, peer: str) -> None:
        self.chats.open(peer)

    def presence(self, peer: str) -> str | None:
        return self.chats.presence(peer)

    def open_conversations(self) -> list[str]:
        return self.chats.ready_peers()

    def wait_conversation(self, peer: str, timeout_s: float = KEY_EXCHANGE_WAIT_S) -> bool:
        return self.chats.wait(peer, timeout_s)

    def has_conversation(self, peer: str) -> bool:
        return self.chats.has(peer)

    def why_not_ready(self, peer: str) -> str:
        return self.chats.why_not_ready(peer)

    def trust_peer(self, peer: str, key: bytes) -> bool:
        return self.trust.check(peer, key)

    def has_refused_key(self, peer: str) -> bool:
        return self.chats.has_refused_key(peer)

    def safety_number(self, peer: str) -> str | None:
        return self.trust.safety_number(peer)

    def accept_identity(self, peer: str, *, reopen: bool = True) -> bool:
        return self.trust.accept(peer, reopen=reopen)

    def mark_verified(self, peer: str) -> bool:
        return self.trust.mark_verified(peer)

    def is_verified(self, peer: str) -> bool:
        return self.trust.is_verified(peer)

    # -- sending ---------------------------------------------------------------------------------
    def send_message(self, peer: str, text: str) -> int | None:
        return self.sender.send_message(peer, text)

    def send_offline(self, peer: str, text: str) -> int | None:
        return self.sender.send_offline(peer, text)

    def send_confirmed(
        self, peer: str, text: str, timeout_s: float = KEY_EXCHANGE_WAIT_S + REPLY_TIMEOUT_S
    ) -> offline.Outgoing:
        return self.sender.send_confirmed(peer, text, timeout_s)

    def send_or_queue(self, peer: str, text: str, say: Say | None = None) -> LineOutcome:
        """A line under the policy the terminal uses (waiting.py): it waits while it cannot go."""
        return self.waiting.send_or_queue(P.normalize_username(peer), text, *([say] if say else []))

    def pending(self) -> list[offline.Outgoing]:
        """Messages sent this session with no delivery receipt yet, oldest first."""
        return self.sender.pending()

    def send_live_body(self, peer: str, body_type: int, content: bytes) -> bool:
        return self.sender.send_live_body(peer, body_type, content)

    def send_sealed(
        self, peer: str, text: str, barrier: Barrier | None, *, resend: offline.Outgoing | None = None
    ) -> int | None:
        return self.sender.send_sealed(peer, text, barrier, resend=resend)

    def stored_event(self, entry: offline.Outgoing) -> None:
        self.sender.stored_event(entry)

    def delivered_event(self, entry: offline.Outgoing, *, emit: bool = True) -> None:
        self.sender.delivered_event(entry, emit=emit)

    def forget_outbound(self, peer: str) -> None:
        self.mailbox.forget_outbound(peer)

    def release_held(self, peer: str) -> None:
        self.mailbox.release_held(peer)

    def resend_due(self, peer: str, *, live: bool) -> None:
        self.mailbox.resend_due(peer, live=live)

    def on_room_key_stored(self, msg: P.StoreResult) -> None:
        self.rooms.on_key_stored(msg)

    # -- direct mode -----------------------------------------------------------------------------
    def enable_direct(self) -> int:
        return self.direct.enable()

    def open_direct(self, peer: str) -> None:
        self.direct.open(peer)

    def is_direct(self, peer: str) -> bool:
        return self.direct.is_direct(peer)

    def close_direct_link(self, peer: str) -> None:
        self.direct.close_link(peer)

    def close_direct(self) -> None:
        self.direct.close()

    # -- the local history -----------------------------------------------------------------------
    def history_page(self, peer: str, limit: int = 20) -> H.Page:
        """The last ``limit`` messages with ``peer``, oldest first (empty without a history)."""
        return self.history.last(P.normalize_username(peer), limit) if self.history else H.Page(())

    def forget(self, peer: str) -> int:
        """Erase the history of the conversation with ``peer``; how many messages went."""
        return self.history.forget(P.normalize_username(peer)) if self.history else 0

    # -- hooks the parts call --------------------------------------------------------------------
    def logged_in(self, username: str, password: str) -> None:
        """Account: the login succeeded; open what is kept under this user (in this order)."""
        self.trust.start(self.home, username, self.server_id)
        if self.account.persist_identity and self.mailbox.store is None:
            self.mailbox.open_store(self.home, username, self.server_id, password)
            self.rooms.load()
        if self.history_enabled and self.history is None:
            try:
                self.history = H.History.open(
                    self.home,
                    username,
                    self.server_id,
                    password,
                    max_per_conversation=self._history_limits[0],
                    max_age_days=self._history_limits[1],
                )
            except HistoryError as exc:
                self._emit(HistoryUnavailable(str(exc)))

    def password_changed(self, new_password: str) -> None:
        """Account: the password changed; what is sealed under it here is sealed again."""
        if self.history is not None:
            self.history.change_password(new_password)
        self.mailbox.change_password(new_password)  # the private prekeys, sealed again

    def after_resume(self, wanted: set[str]) -> None:
        """Session: resume()'s second half, on the new session: what the old one left unfinished."""
        if self.direct.udp is not None:
            self.direct.enable()  # a new session has a new ticket key
        for peer in sorted(wanted):
            self.open_conversation(peer)
        self.mailbox.resend_unanswered()  # stores the server may not have seen: the same bytes again
        self.mailbox.after_reconnect()  # live messages with no receipt go again once keyed (or stored)

    def dispatch(self, msg: P.Message) -> None:
        self._dispatch(msg)

    def _dispatch(self, msg: P.Message) -> None:  # an override hook (bench/loadgen.py)
        handler = self._handlers.get(type(msg))
        if handler is not None:
            handler(msg)

    def _on_who_response(self, msg: P.WhoResponse) -> None:
        if not self.connection.on_who_response():
            self._emit(WhoList(tuple(sanitize(u, 64) for u in msg.users), msg.total))

    def _on_error(self, msg: P.Error) -> None:
        reason = sanitize(msg.reason, 512)
        self.connection.note_refusal(reason)
        self._emit(ServerNotice(reason, msg.code))

    def _on_account_deleted(self, msg: P.AccountDeleted) -> None:
        self._emit(AccountDeletion(msg.deleted, sanitize(msg.reason, 512)))

    def on_opened(
        self,
        sender: str,
        opened: e2e.Opened,
        *,
        stored_at: float | None = None,
        direct: bool = False,
        identity: bytes | None = None,
    ) -> None:
        self.incoming.on_opened(sender, opened, stored_at=stored_at, direct=direct, identity=identity)

    # -- events ----------------------------------------------------------------------------------
    def emit(self, event: object) -> None:
        """Queue an event for the user (the parts' way in; ``_emit`` stays the override hook)."""
        self._emit(event)

    def _emit(self, event) -> None:
        try:
            self.events.put_nowait(event)
        except queue.Full:  # the UI stopped reading events; drop the oldest notice
            log.warning("event queue full; an event was dropped")

    def warn(self, peer: str, text: str) -> None:
        self._emit(SecurityWarning(peer, text))

    def reject(self, peer: str, reason: str) -> None:
        self._emit(MessageRejected(sanitize(peer, 64), reason))

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
        self.session.stopping.set()
        try:
            self.mailbox.save()
        except OSError as exc:
            log.warning("the prekey store could not be saved: %s", exc)
        try:
            self.session.close_connection(timeout_s)
        finally:
            if self.history is not None:
                self.history.close()
                self.history = None
