"""The narrow interfaces (``typing.Protocol``) the client's parts are given instead of the whole client.

Each part names what it needs of the rest here; :class:`secureim.client.chat.ChatClient` (the
facade) is the one object that implements them all today.  A test drives a part with a stub that
has exactly these members (tests/test_offline.py, tests/unit/client/).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from secureim import proto as P
from secureim.e2e import sessions as e2e

if TYPE_CHECKING:
    from secureim.client.offline import Outgoing


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
    def identity(self) -> Ed25519PrivateKey | None: ...


class PeerTrustGate(Protocol):
    """Pin on first use; a changed identity key is refused (and said) until accepted."""

    def trust_peer(self, peer: str, key: bytes) -> bool: ...
    def has_refused_key(self, peer: str) -> bool: ...


class MailboxHost(FrameSender, Me, PeerTrustGate, Protocol):
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
    def on_opened(
        self,
        sender: str,
        opened: e2e.Opened,
        *,
        stored_at: float | None = None,
        direct: bool = False,
        identity: bytes | None = None,
    ) -> None: ...
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
