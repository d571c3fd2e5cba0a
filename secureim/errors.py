"""The one exception tree of secureim.

Every error the project raises on purpose derives from :class:`SecureIMError`.
Leaf docstrings are written for users: the client prints them, the server logs
them and turns them into an error frame.  Protocol errors are split, as in h11,
into *local* (we were asked to do something the protocol forbids) and *remote*
(the peer sent something the protocol forbids).
"""

from __future__ import annotations


class SecureIMError(Exception):
    """Something went wrong in secureim."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def reason(self) -> str:
        return str(self)


# --- protocol -----------------------------------------------------------------
class ProtocolError(SecureIMError):
    """The connection broke the secureim protocol and was closed."""


class LocalProtocolError(ProtocolError):
    """This program tried to do something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The other side sent something the protocol does not allow."""


class FrameTooLarge(RemoteProtocolError):
    """The other side sent a frame larger than the protocol allows."""


class MalformedMessage(RemoteProtocolError):
    """The other side sent a message that could not be decoded."""


class UnexpectedMessage(RemoteProtocolError):
    """The other side sent a message that is not allowed at this point."""


class RecordAuthenticationFailed(RemoteProtocolError):
    """A message failed its integrity check: it was tampered with, replayed,
    reordered or dropped on the way, so the session was closed."""


class SequenceExhausted(LocalProtocolError):
    """The session has sent as many messages as its sequence numbers allow."""


# --- cryptography -------------------------------------------------------------
class CryptoError(SecureIMError):
    """A cryptographic operation failed."""


class DecryptionFailed(CryptoError):
    """A message failed its integrity check and was discarded."""


class InvalidKey(CryptoError):
    """A key was refused: wrong length, weak, or otherwise unusable."""


class DHError(CryptoError):
    """The Diffie-Hellman key exchange failed."""


class UnsupportedGroup(DHError):
    """The Diffie-Hellman group offered is not on the allowlist."""


class InvalidPublicValue(DHError):
    """The other side's Diffie-Hellman public value is invalid."""


class InvalidKemValue(InvalidPublicValue):
    """The other side's ML-KEM-768 encapsulation key or ciphertext is invalid."""


class HandshakeFailed(RemoteProtocolError, CryptoError):
    """The server could not prove its identity: the handshake failed."""


class ServerKeyMismatch(HandshakeFailed):
    """The server's identity key is not the one this client trusts."""


# --- application --------------------------------------------------------------
class AuthError(SecureIMError):
    """Login failed."""


class InvalidCredentials(AuthError):
    """Unknown user or wrong password."""


class AccountLocked(AuthError):
    """Too many failed logins: the account is locked for a while."""

    def __init__(self, retry_after_s: int, message: str | None = None) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(
            message or f"Account locked after too many failed logins; try again in {retry_after_s} seconds."
        )


class AccountBanned(AuthError):
    """This account or network address is banned from the server."""


class InvalidUsername(AuthError):
    """That username is not allowed."""


class InvalidPassword(AuthError):
    """That password is not allowed."""


class UsernameTaken(AuthError):
    """That username is already taken."""


class ServiceUnavailable(SecureIMError):
    """The server cannot do that right now; try again later."""


class DatabaseError(SecureIMError):
    """The database failed."""


class DatabaseUnavailable(DatabaseError, ServiceUnavailable):
    """The database is unreachable; try again later."""


class ConfigError(SecureIMError):
    """The configuration is invalid."""


class ConnectionClosed(SecureIMError):
    """The connection to the server was closed."""


class HistoryError(SecureIMError):
    """The local message history cannot be used."""


class HistoryLocked(HistoryError):
    """The local message history is sealed under another password; it was not opened."""


class MessageRefused(SecureIMError):
    """The server did not accept the message (the peer is offline, or the conversation is gone)."""


class RoomError(SecureIMError):
    """A room operation was refused (unknown room, not a member, not the admin, full...)."""


class InvalidRoomName(RoomError):
    """That room name is not allowed."""


class ChangeRefused(RoomError):
    """A membership change did not verify (a bad signature, a broken chain, a rule broken) and was refused."""
