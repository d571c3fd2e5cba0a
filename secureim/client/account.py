"""The account: log in, register, the session ticket, the identity key, password change, deletion."""

from __future__ import annotations

import logging
import queue

import crypto_utils as cu
from secureim import proto as P
from secureim.client.connection import REPLY_TIMEOUT_S
from secureim.client.display import sanitize
from secureim.client.events import AUTH_ERRORS
from secureim.client.ports import AccountHost, AccountLink
from secureim.e2e import sessions as e2e
from secureim.errors import (
    AccountLocked,
    AuthError,
    ConnectionClosed,
    InvalidPassword,
    InvalidUsername,
)

log = logging.getLogger("secureim.client")


class Account:
    def __init__(
        self, host: AccountHost, link: AccountLink, identities: e2e.IdentityStore, *, persist_identity: bool
    ) -> None:
        self._host = host
        self._link = link
        self.identities = identities
        self.persist_identity = persist_identity
        self.identity: cu.IdentityKey | None = None
        self.username: str | None = None
        self.ticket: bytes | None = None  # resumption ticket: memory only, never on disk
        self.early: list = []  # frames that came in the same read as AuthOk
        self._password_reply: queue.Queue = queue.Queue(maxsize=1)

    def login(self, username: str, password: str) -> P.AuthOk:
        """Log in; the identity key stored for this user opens with the same password.

        A user with no identity on this machine (or whose file the password
        does not open) gets a new one; their peers will see the key change.
        """
        name = P.normalize_username(username)
        identity = self.identities.load(name, password) if self.persist_identity else None
        created = identity is None
        identity = identity or cu.IdentityKey.generate()
        ok = self.authenticate(
            P.Login(username=name, password=password.encode("utf-8"), identity_key=cu.public_bytes(identity))
        )
        self.logged_in(ok, password, identity, save=created)
        return ok

    def register(self, username: str, password: str) -> P.AuthOk:
        """Create the account with a new identity key made here; it never leaves this machine."""
        name = P.normalize_username(username)
        identity = cu.IdentityKey.generate()
        ok = self.authenticate(
            P.Register(
                username=name, password=password.encode("utf-8"), identity_key=cu.public_bytes(identity)
            )
        )
        self.logged_in(ok, password, identity, save=True)
        return ok

    def logged_in(self, ok: P.AuthOk, password: str, identity: cu.IdentityKey, *, save: bool) -> None:
        if save and self.persist_identity:
            self.identities.save(ok.username, password, identity)
        self.identity = identity
        self._host.logged_in(ok.username, password)

    @property
    def identity_fingerprint(self) -> str | None:
        return cu.fingerprint(cu.public_bytes(self.identity)) if self.identity is not None else None

    def authenticate(self, msg: P.Login | P.Register | P.Resume) -> P.AuthOk:
        if len(getattr(msg, "password", b"")) > P.MAX_PASSWORD_BYTES:
            raise InvalidPassword(f"Passwords must be at most {P.MAX_PASSWORD_BYTES} bytes.")
        if len(getattr(msg, "username", "").encode()) > P.MAX_USERNAME_BYTES:
            raise InvalidUsername("Usernames are at most 32 characters.")
        self._link.send_frame(msg)
        while True:
            events = self._link.recv_events()
            for i, event in enumerate(events):
                if isinstance(event, P.AuthOk):
                    self.username = event.username
                    self.ticket = event.ticket or None
                    self.early = events[i + 1 :]  # the prekey status, stored messages: after start()
                    return event
                if isinstance(event, P.AuthFailed):
                    raise_auth_failed(event)
                if isinstance(event, P.Goodbye):
                    raise ConnectionClosed(f"The server closed the session: {sanitize(event.reason)}")

    def change_password(self, old_password: str, new_password: str) -> None:
        """Change this account's password (docs/PROTOCOL.md section 13).

        The server checks the old password and ends every resumption ticket of the
        account; this session gets a new one.  The identity key on this machine is
        sealed again under the new password (it opens with the password at login).
        Raises :class:`InvalidCredentials`, :class:`InvalidPassword`, :class:`AccountLocked`...
        """
        old, new = old_password.encode("utf-8"), new_password.encode("utf-8")
        if len(new) > P.MAX_PASSWORD_BYTES or len(old) > P.MAX_PASSWORD_BYTES:
            raise InvalidPassword(f"Passwords must be at most {P.MAX_PASSWORD_BYTES} bytes.")
        while True:  # an earlier answer that nobody waited for is stale
            try:
                self._password_reply.get_nowait()
            except queue.Empty:
                break
        self._link.send_frame(P.ChangePassword(old_password=old, new_password=new))
        try:
            reply = self._password_reply.get(timeout=REPLY_TIMEOUT_S)
        except queue.Empty:
            raise ConnectionClosed(f"The server at {self._host.server_id} did not answer in time.") from None
        if isinstance(reply, P.PasswordChangeFailed):
            if reply.code == P.AuthCode.LOCKED:
                raise AccountLocked(reply.retry_after_s)
            raise AUTH_ERRORS.get(reply.code, AuthError)(sanitize(reply.reason, 512))
        self.ticket = reply.ticket or None
        if self.persist_identity and self.identity is not None and self.username is not None:
            self.identities.save(self.username, new_password, self.identity)
        self._host.password_changed(new_password)

    def delete_account(self, password: str, confirm: str) -> None:
        """Ask the server to delete this account; the answer comes as an AccountDeletion event."""
        raw = password.encode("utf-8")
        if len(raw) > P.MAX_PASSWORD_BYTES or len(confirm.encode("utf-8")) > P.MAX_USERNAME_BYTES:
            raise InvalidPassword("That is not your password or username.")
        if confirm == self.username and self._host.rooms.my_rooms():
            # The server cannot sign a change: this client leaves its rooms itself (closing the ones it
            # administers) before the account goes, once the password is known to be right.
            if self.identity is None or self.identities.load(self.username, password) is None:
                raise InvalidPassword("Wrong password; nothing was deleted and you are still in your rooms.")
            self._host.rooms.leave_all()
        self._link.send_frame(P.DeleteAccount(password=raw, confirm=confirm))

    def on_password_reply(self, msg: P.PasswordChanged | P.PasswordChangeFailed) -> None:
        try:
            self._password_reply.put_nowait(msg)
        except queue.Full:
            log.warning("an unasked password-change answer was ignored")

    def take_early(self) -> list:
        """The frames that came with AuthOk (the prekey status, stored messages): for the receiver."""
        early, self.early = self.early, []
        return early

    def forget_ticket(self) -> None:
        """The server refused the ticket (expired, or a password change ended it)."""
        self.ticket = None


def raise_auth_failed(event: P.AuthFailed) -> None:
    reason = sanitize(event.reason, 512)
    if event.code == P.AuthCode.LOCKED:
        raise AccountLocked(event.retry_after_s)
    if event.code == P.AuthCode.TOO_MANY_ATTEMPTS:
        # The server's reason ends with its own "Too many attempts..." sentence: say each thing once.
        first = reason.split(" Too many attempts", 1)[0].strip()
        raise ConnectionClosed(
            (f"{first}\n" if first else "") + "Too many attempts on this connection; the server closed it. "
            "Start the client again to try once more."
        )
    raise AUTH_ERRORS.get(event.code, AuthError)(reason)
