"""The narrow interfaces (``typing.Protocol``) the client's parts are given instead of the whole client.

Each part names what it needs of the rest here; :class:`secureim.client.chat.ChatClient` (the
facade) is the one object that implements them all today.  A test drives a part with a stub that
has exactly these members (tests/integration/test_offline.py, tests/unit/client/).
"""

from __future__ import annotations

import socket
import threading
from typing import TYPE_CHECKING, Any, Protocol

import crypto_utils as cu
from secureim import proto as P
from secureim.e2e import sessions as e2e

if TYPE_CHECKING:
    from secureim.client import history as H
    from secureim.client.outgoing import Outgoing
    from secureim.e2e import datagrams as direct
    from secureim.e2e import prekeys as K
    from secureim.e2e import rooms as R


class Barrier(Protocol):
    """A WhoRequest sent after a message: done once every answer to that message is in."""

    done: threading.Event
    refusals: list[str]


class FrameSender(Protocol):
    """Sends a frame on the current session (raises ConnectionClosed while reconnecting)."""

    def send_frame(self, msg: P.Message) -> None: ...


class EventSink(Protocol):
    """Where the parts' events for the user go (the client's event queue)."""

    def emit(self, event: object) -> None: ...


class Me(Protocol):
    """Who is logged in on this client."""

    @property
    def username(self) -> str | None: ...
    @property
    def identity(self) -> cu.IdentityKey | None: ...


def logged_in_name(me: Me) -> str:
    """The user logged in on ``me``; for parts that only run once logged in."""
    name = me.username
    assert name is not None  # only used once logged in
    return name


def logged_in_identity(me: Me) -> cu.IdentityKey:
    """The identity key of the user logged in on ``me``; for parts that only run once logged in."""
    key = me.identity
    assert key is not None  # only used once logged in
    return key


class OpenedSink(Protocol):
    """Where an opened end-to-end message goes (the facade: history, receipt, event)."""

    def on_opened(
        self,
        sender: str,
        opened: e2e.Opened,
        *,
        stored_at: float | None = None,
        direct: bool = False,
        identity: bytes | None = None,
    ) -> None: ...


class PeerTrustGate(Protocol):
    """Pin on first use; a changed identity key is refused (and said) until accepted."""

    def trust_peer(self, peer: str, key: bytes) -> bool: ...
    def has_refused_key(self, peer: str) -> bool: ...


class Closed(Protocol):
    """The session's lifecycle: ``closed`` is set once the connection is gone for good."""

    @property
    def closed(self) -> threading.Event: ...


class MailboxHost(FrameSender, Me, PeerTrustGate, OpenedSink, Protocol):
    """What the store-and-forward part (offline.Mailbox) needs of the rest of the client."""

    @property
    def node_id(self) -> str: ...
    @property
    def stopping(self) -> threading.Event: ...
    def barrier_after(self, msg: P.Message) -> Barrier: ...
    def why_not_ready(self, peer: str) -> str: ...
    def warn(self, peer: str, text: str) -> None: ...
    def reject(self, peer: str, reason: str) -> None: ...
    def stored_event(self, entry: Outgoing) -> None: ...
    def delivered_event(self, entry: Outgoing, *, emit: bool = True) -> None: ...
    def on_room_key_stored(self, msg: P.StoreResult) -> None: ...
    def send_live_body(self, peer: str, body_type: int, content: bytes) -> bool: ...
    def send_sealed(
        self, peer: str, text: str, barrier: Any, *, resend: Outgoing | None = None
    ) -> int | None: ...


class RoomsMailbox(Protocol):
    """What the rooms part needs of the mailbox: the store at rest and the offline sessions."""

    lock: threading.RLock
    store: Any

    def ack(self, queue_id: int) -> None: ...
    def defer(self, queue_id: int) -> None: ...
    def forget_outbound(self, peer: str) -> None: ...
    def outbound_for(self, peer: str) -> Any: ...
    def send_body(
        self, peer: str, body_type: int, content: bytes, *, expect_identity: bytes | None = None
    ) -> bytes: ...


class RoomsHost(FrameSender, EventSink, Me, PeerTrustGate, Protocol):
    """What the rooms part (rooms.RoomsClient) needs of the rest of the client."""

    @property
    def mailbox(self) -> RoomsMailbox: ...
    @property
    def peer_trust(self) -> e2e.PeerTrust | None: ...
    def presence(self, peer: str) -> str | None: ...


# -- the facade's parts ---------------------------------------------------------------------------
class ConversationsHost(FrameSender, EventSink, Me, Closed, PeerTrustGate, OpenedSink, Protocol):
    """What conversations.Conversations needs of the rest of the client."""

    @property
    def node_id(self) -> str: ...
    def is_verified(self, peer: str) -> bool: ...
    def close_direct_link(self, peer: str) -> None: ...
    def forget_outbound(self, peer: str) -> None: ...
    def resend_due(self, peer: str, *, live: bool) -> None: ...


class RefusedKeys(Protocol):
    """The conversations' record of identity keys refused until accepted."""

    def refuse(self, peer: str, key: bytes) -> bool: ...
    def clear_refused(self, peer: str) -> None: ...
    def changed_key(self, peer: str) -> bytes | None: ...


class TrustHost(EventSink, Me, Protocol):
    """What trust.PeerTrustKeeper needs of the rest of the client."""

    def forget_outbound(self, peer: str) -> None: ...
    def release_held(self, peer: str) -> int | None: ...
    def open_conversation(self, peer: str) -> None: ...


class DirectConnection(Protocol):
    sock: socket.socket | None
    proto: P.ClientProtocol


class DirectHost(FrameSender, EventSink, Closed, OpenedSink, Protocol):
    """What direct.DirectMode needs of the rest of the client."""

    @property
    def connection(self) -> DirectConnection: ...
    @property
    def username(self) -> str | None: ...


class DirectConversations(Protocol):
    """The conversation keys a direct link is made of."""

    def channel_for(
        self, initiator: str, conversation_id: int, generation: int
    ) -> direct.DatagramChannel | None: ...
    def direct_offer(
        self, peer: str
    ) -> tuple[e2e.E2ESession | None, tuple[bytes, bytes] | None, int | None]: ...
    def open_link_message(self, peer: str, payload: bytes) -> tuple[e2e.Opened | None, bytes | None]: ...


class HistoryHolder(Protocol):
    @property
    def history(self) -> H.History | None: ...


class SenderHost(EventSink, HistoryHolder, Protocol):
    """What sending.Sender needs of the rest of the client."""

    @property
    def username(self) -> str | None: ...
    @property
    def node_id(self) -> str: ...


class SenderLink(FrameSender, Protocol):
    def barrier_after(self, msg: P.Message, barrier: Any = None) -> Any: ...


class SenderConversations(Protocol):
    def presence(self, peer: str) -> str | None: ...
    def why_not_ready(self, peer: str) -> str: ...
    def has(self, peer: str) -> bool: ...
    def open(self, peer: str) -> None: ...
    def wait(self, peer: str, timeout_s: float = ...) -> bool: ...
    def seal_live(self, peer: str, text: str, msg_id: bytes) -> tuple[bytes, int]: ...
    def seal_body(self, peer: str, body_type: int, content: bytes) -> tuple[bytes, int] | None: ...


class SenderDirect(Protocol):
    def is_direct(self, peer: str) -> bool: ...
    def send(self, peer: str, payload: bytes, text: str | None) -> None: ...


class SenderMailbox(Protocol):
    """The outbox: every message sent, live or stored, until its receipt."""

    def send_text(self, peer: str, text: str, msg_id: bytes, *, retried: bool = False) -> Outgoing: ...
    def sent_live(self, peer: str, text: str, msg_id: bytes) -> Outgoing: ...
    def entry(self, msg_id: bytes) -> Outgoing | None: ...
    def pending(self) -> list[Outgoing]: ...


class RoomsLeaver(Protocol):
    def my_rooms(self) -> list[str]: ...
    def leave_all(self) -> list[str]: ...


class AccountHost(Protocol):
    """What account.Account needs of the rest of the client."""

    @property
    def server_id(self) -> str: ...
    @property
    def rooms(self) -> RoomsLeaver: ...
    def logged_in(self, username: str, password: str) -> None: ...
    def password_changed(self, new_password: str) -> None: ...


class AccountLink(FrameSender, Protocol):
    def recv_events(
        self, sock: socket.socket | None = None, proto: P.ClientProtocol | None = None
    ) -> list: ...


class SessionHost(EventSink, Protocol):
    """What session.Session needs of the rest of the client."""

    def dispatch(self, msg: P.Message) -> None: ...
    def close(self, timeout_s: float = ...) -> None: ...
    def after_resume(self, wanted: set[str]) -> None: ...
    def close_direct(self) -> None: ...


class SessionLink(AccountLink, Protocol):
    sock: socket.socket | None
    proto: P.ClientProtocol
    node: int
    host: str
    port: int
    send_lock: threading.Lock

    @property
    def node_id(self) -> str: ...
    def connect(self, *, start_at: int = 0) -> P.HandshakeComplete: ...
    def drop_socket(self) -> None: ...
    def fail_barriers(self, reason: str) -> None: ...
    def begin_reconnect(self) -> None: ...
    def end_reconnect(self) -> None: ...


class SessionAccount(Protocol):
    ticket: bytes | None
    identity: cu.IdentityKey | None
    username: str | None

    def authenticate(self, msg: P.Login | P.Register | P.Resume) -> P.AuthOk: ...
    def take_early(self) -> list: ...
    def forget_ticket(self) -> None: ...


class SessionConversations(Protocol):
    def wanted_peers(self) -> set[str]: ...
    def reset(self) -> None: ...
    def wake_all(self) -> None: ...


class IncomingHost(EventSink, HistoryHolder, Protocol):
    pass


class IncomingMailbox(Protocol):
    def on_receipt(self, peer: str, ids: tuple[bytes, ...]) -> None: ...
    def seen_before(self, peer: str, msg_id: bytes) -> bool: ...
    def receipt(self, peer: str, msg_id: bytes) -> None: ...


class SenderKeys(Protocol):
    def on_sender_key(self, sender: str, content: bytes, identity: bytes | None) -> None: ...


class CourierHost(Protocol):
    """What the "offline-mail" worker (courier.Courier) needs of the rest of the client."""

    @property
    def stopping(self) -> threading.Event: ...
    def send_live_body(self, peer: str, body_type: int, content: bytes) -> bool: ...
    def send_sealed(
        self, peer: str, text: str, barrier: Any, *, resend: Outgoing | None = None
    ) -> int | None: ...


class CourierMailbox(Protocol):
    """What the worker needs of the mailbox it works for."""

    @property
    def lock(self) -> threading.RLock: ...
    def send_body(
        self, peer: str, body_type: int, content: bytes, *, expect_identity: bytes | None = None
    ) -> bytes: ...
    def send_text(self, peer: str, text: str, msg_id: bytes, *, retried: bool = False) -> Outgoing: ...
    def refuse(self, entry: Outgoing, reason: str) -> None: ...


class RoomMessagingHost(FrameSender, EventSink, Protocol):
    """What room_messaging.RoomMessaging needs of the rest of the client."""

    @property
    def mailbox(self) -> RoomsMailbox: ...


class RoomRegistry(Protocol):
    """The rooms this client is in (rooms.RoomsClient): guarded by ``lock``, saved with ``save``."""

    @property
    def lock(self) -> threading.RLock: ...
    @property
    def rooms(self) -> dict[str, R.RoomSession]: ...
    def room(self, name: str) -> R.RoomSession: ...
    def by_id(self, room_id: int) -> R.RoomSession | None: ...
    def save(self) -> None: ...
    def wait_epoch(self, room: R.RoomSession, epoch: int, timeout_s: float = ...) -> None: ...
    def suite(self, suite_id: int, key: bytes) -> Any: ...


class WaitingHost(Protocol):
    """What waiting.WaitingLines needs of the client: its connection state and the send paths."""

    @property
    def reconnecting(self) -> bool: ...
    def send_message(self, peer: str, text: str) -> int | None: ...
    def send_offline(self, peer: str, text: str) -> int | None: ...
    def has_conversation(self, peer: str) -> bool: ...
    def wait_conversation(self, peer: str, timeout_s: float = ...) -> bool: ...
    def presence(self, peer: str) -> str | None: ...
    def why_not_ready(self, peer: str) -> str: ...


class InboxHost(FrameSender, Me, OpenedSink, Protocol):
    """What inbox.Inbox (stored messages coming in) needs of the rest of the client."""

    def trust_peer(self, peer: str, key: bytes) -> bool: ...
    def reject(self, peer: str, reason: str) -> None: ...


class PrekeyHolder(Protocol):
    """The mailbox's sealed prekey store and the sessions it opens stored messages with."""

    @property
    def lock(self) -> threading.RLock: ...
    @property
    def store(self) -> K.PrekeyStore | None: ...
    @property
    def inbound(self) -> K.InboundSessions | None: ...
