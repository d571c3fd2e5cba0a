"""What the client tells its user: one small record per event."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from secureim import proto as P
from secureim.client import offline as offline
from secureim.errors import (
    AccountBanned,
    InvalidCredentials,
    InvalidPassword,
    InvalidUsername,
    SecureIMError,
    ServiceUnavailable,
    UsernameTaken,
)

log = logging.getLogger("secureim.client")


# =============================================================================
# Events
# =============================================================================
@dataclass(frozen=True)
class PeerOnline:
    peer: str


@dataclass(frozen=True)
class PeerOffline:
    peer: str


@dataclass(frozen=True)
class PeerUnknown:
    peer: str


@dataclass(frozen=True)
class ConversationReady:
    peer: str
    generation: int
    opened_by_peer: bool
    verified: bool = False


@dataclass(frozen=True)
class SecurityWarning:
    """A conversation was refused: a changed identity key or a forged key share."""

    peer: str
    text: str


@dataclass(frozen=True)
class MessageReceived:
    peer: str
    text: str
    sent_at: float
    direct: bool = False
    stored_at: float | None = None  # it waited in the server's queue (it was sent while we were away)


@dataclass(frozen=True)
class MessageStored:
    """The server keeps a message for ``peer`` (``online``: and handed it to their client now)."""

    peer: str
    text: str
    online: bool


@dataclass(frozen=True)
class MessageNotStored:
    """The server refused to keep a message (a full mailbox, an unknown conversation)."""

    peer: str
    text: str
    reason: str


@dataclass(frozen=True)
class MessageDelivered:
    """``peer``'s client opened the message: an end-to-end receipt the server cannot forge."""

    peer: str
    text: str
    stored: bool


@dataclass(frozen=True)
class DirectReady:
    """The conversation with ``peer`` now runs peer to peer (UDP); the server no longer sees it."""

    peer: str


@dataclass(frozen=True)
class DirectFallback:
    peer: str
    reason: str


@dataclass(frozen=True)
class DirectRequested:
    """``peer`` asked for a direct link; this client has not opted in (``open_direct`` accepts)."""

    peer: str


@dataclass(frozen=True)
class MessageUndelivered:
    """A direct message the peer never acknowledged."""

    peer: str
    text: str


@dataclass(frozen=True)
class MessageRejected:
    peer: str
    reason: str


@dataclass(frozen=True)
class WhoList:
    users: tuple
    total: int


@dataclass(frozen=True)
class ServerNotice:
    text: str
    code: int = 0  # the Error frame's code (protocol.ErrorCode), 0 for none


@dataclass(frozen=True)
class Reconnecting:
    """auto_reconnect: the connection was lost; try number ``attempt`` is about to start."""

    attempt: int
    reason: str


@dataclass(frozen=True)
class Reconnected:
    """auto_reconnect: the session goes on at ``server`` (with the ticket: no password)."""

    server: str
    attempts: int


@dataclass(frozen=True)
class HistoryUnavailable:
    """The local history could not be opened; nothing is recorded this session."""

    reason: str


@dataclass(frozen=True)
class Disconnected:
    """The connection ended for good.  ``ticket_refused``: auto_reconnect's resume was refused
    (the ticket expired, or a password change ended it): only a login with the password goes on."""

    reason: str
    ticket_refused: bool = False


@dataclass(frozen=True)
class AccountDeletion:
    """The server's answer to /delete-account."""

    deleted: bool
    reason: str


AUTH_ERRORS: dict[int, type[SecureIMError]] = {
    P.AuthCode.INVALID_CREDENTIALS: InvalidCredentials,
    P.AuthCode.USERNAME_TAKEN: UsernameTaken,
    P.AuthCode.INVALID_USERNAME: InvalidUsername,
    P.AuthCode.INVALID_PASSWORD: InvalidPassword,
    P.AuthCode.UNAVAILABLE: ServiceUnavailable,
    P.AuthCode.BANNED: AccountBanned,
}
