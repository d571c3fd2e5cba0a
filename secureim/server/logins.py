"""The service's side of accounts: login, registration, resumption, password change, deletion.

The password rules, bcrypt and the lockout are accounts.py's (``AuthService``, seen here as a
``PasswordChecker``); this module answers the messages and logs a session in."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import crypto_utils as cu
from secureim import proto as P
from secureim.errors import (
    AccountLocked,
    ConnectionClosed,
    DatabaseError,
    InvalidCredentials,
    InvalidPassword,
    InvalidUsername,
    SecureIMError,
    ServiceUnavailable,
    UsernameTaken,
)
from secureim.server.cluster.local import SIGNED_IN_ELSEWHERE
from secureim.server.config import ServerConfig
from secureim.server.metrics import ServerMetrics
from secureim.server.ports import (
    AccountRuntime,
    AccountStore,
    LoginFollowUp,
    LoginGate,
    LoginTable,
    Notifier,
    PasswordChecker,
    TicketDesk,
)
from secureim.server.registry import SourceRateLimiter, loggable

if TYPE_CHECKING:
    from secureim.server.registry import Session

log = logging.getLogger("secureim.server")


class AccountHandlers:
    """Login, registration, resumption, password change, account deletion (the service's side)."""

    def __init__(
        self,
        storage: AccountStore,
        auth: PasswordChecker,
        tickets: TicketDesk,
        gate: LoginGate,
        registry: LoginTable,
        presence: Notifier,
        mailbox: LoginFollowUp,
        runtime: AccountRuntime,
        metrics: ServerMetrics,
        config: ServerConfig,
        announce: Callable[[str], None],
    ) -> None:
        self.storage = storage
        self.auth = auth  # read per call: tests replace its methods on the instance
        self.tickets = tickets
        self.registry = registry
        self.metrics = metrics
        self.config = config
        self._gate = gate
        self._presence = presence
        self._mailbox = mailbox
        self._runtime = runtime
        self._announce = announce

    def login_or_register(self, session: Session, msg: P.Login | P.Register) -> None:
        session.auth_attempts += 1
        register = isinstance(msg, P.Register)
        if self._gate.refuse_if_banned(session, None):
            return
        try:
            cu.load_public_key(msg.identity_key)
        except SecureIMError:
            self._auth_failed(
                session, P.AuthCode.INVALID_IDENTITY, "The identity key is not a valid Ed25519 key."
            )
            return
        try:
            if register:
                username = self.auth.register(msg.username, msg.password, session.source, msg.identity_key)
            else:
                username = self.auth.login(msg.username, msg.password, session.source)
                if self.storage.get_identity_key(username) != msg.identity_key:
                    # A new device or reinstall: peers will see the change and must accept it.
                    self.storage.set_identity_key(username, msg.identity_key)
                    self.storage.clear_prekeys(username, signed=True)  # signed by the old key: useless now
                    log.info("a user registered a new identity key")
                    self._gate.audit("identity_key_changed", username, session.source)
        except AccountLocked as exc:
            self._auth_failed(
                session,
                P.AuthCode.LOCKED,
                str(exc),
                exc.retry_after_s,
                loggable(msg.username),
                username=msg.username,
            )
            return
        except InvalidCredentials as exc:
            self._auth_failed(
                session,
                P.AuthCode.INVALID_CREDENTIALS,
                str(exc),
                who=loggable(msg.username),
                username=msg.username,
            )
            return
        except (InvalidUsername, InvalidPassword, UsernameTaken) as exc:
            code = {
                InvalidUsername: P.AuthCode.INVALID_USERNAME,
                InvalidPassword: P.AuthCode.INVALID_PASSWORD,
                UsernameTaken: P.AuthCode.USERNAME_TAKEN,
            }[type(exc)]
            self._auth_failed(session, code, str(exc), username=msg.username)
            return
        session.identity_key = msg.identity_key
        self._logged_in(session, username, created=register)

    def resume(self, session: Session, msg: P.Resume) -> None:
        """A resumption ticket instead of the password: no bcrypt; one database read (the epoch)."""
        session.auth_attempts += 1
        if self._gate.refuse_if_banned(session, None):
            return
        try:  # the account's ticket epoch: a reset, changed or deleted account's tickets are void
            username, epoch = self.tickets.redeem_with_epoch(msg.ticket, msg.identity_key)
            if epoch != self.storage.get_ticket_epoch(username):  # password changed since (or no such user)
                raise InvalidCredentials(
                    "The session ticket is invalid or expired; log in with your password."
                )
        except InvalidCredentials as exc:
            self._auth_failed(session, P.AuthCode.INVALID_CREDENTIALS, str(exc), who="a session ticket")
            return
        session.identity_key = msg.identity_key
        self._logged_in(session, username, created=False, how="resume")

    def _auth_failed(
        self,
        session: Session,
        code: P.AuthCode,
        reason: str,
        retry_after_s: int = 0,
        who: str = "an invalid username",
        username: str = "",
    ) -> None:
        # Seen at the default level (an operator watches for guessing); never the password.
        if code == P.AuthCode.LOCKED:
            log.warning(
                "login refused from %s for %s: locked for %d s after repeated failures",
                session.source,
                who,
                retry_after_s,
            )
        elif code == P.AuthCode.INVALID_CREDENTIALS:
            log.warning("failed login from %s for %s", session.source, who)
        else:
            log.info("login failed from %s: %s", session.source, code.name)
        locked = code == P.AuthCode.LOCKED
        self.metrics.logins.labels("locked" if locked else "failed").inc()
        self._gate.audit("lockout" if locked else "login_failed", username, session.source, code.name)
        if session.auth_attempts >= self.config.max_auth_tries:
            session.send(
                P.AuthFailed(
                    code=P.AuthCode.TOO_MANY_ATTEMPTS,
                    retry_after_s=retry_after_s,
                    reason=f"{reason} Too many attempts on this connection.",
                )
            )
            session.close()
            return
        session.send(P.AuthFailed(code=code, retry_after_s=retry_after_s, reason=reason))

    def _logged_in(self, session: Session, username: str, created: bool, how: str = "login") -> None:
        if self._gate.refuse_if_banned(session, username):
            return
        epoch = self.storage.get_ticket_epoch(username)  # read once: the ticket below carries it
        if epoch is None:  # deleted a moment ago
            self._auth_failed(session, P.AuthCode.INVALID_CREDENTIALS, "Unknown user or wrong password.")
            return
        try:
            old, waiting = self.registry.login(session, username)
        except ConnectionClosed:
            return
        if old is not None and old is not session:
            # Decision: a new login replaces the old session (docs/PROTOCOL.md, section 7).
            old.close(SIGNED_IN_ELSEWHERE)
        assert session.identity_key is not None
        rate = self.config.room_sends_per_s
        session.room_sends = SourceRateLimiter(rate, max(1, int(rate * 4)))
        self._runtime.cluster.user_online(
            username, session.login_at, session.identity_key
        )  # other nodes drop theirs
        session.send(
            P.AuthOk(
                username=username,
                created=created,
                ticket=self.tickets.issue(username, session.identity_key, epoch),
            )
        )
        self.metrics.logins.labels("ok").inc()
        try:  # last login, the session row and the audit row, in one transaction
            self.storage.record_session_start(
                self._runtime.node, username, session.source, time.time(), "register" if created else how
            )
        except DatabaseError as exc:
            self.metrics.audit_failures.inc()
            log.warning("login bookkeeping failed: %s", exc)
        self._announce(
            f"[SERVER]: {username} connected from {session.source}. ({self.registry.online_count()} online)"
        )
        self._presence.notify(username, waiting, online=True)
        self._mailbox.send_prekey_status(session)
        self._mailbox.push_queue(
            session
        )  # what was stored while they were away, in order, before anything new

    def change_password(self, session: Session, msg: P.ChangePassword) -> None:
        me = session.username
        assert me is not None and session.identity_key is not None
        try:
            epoch = self.auth.change_password(me, msg.old_password, msg.new_password, session.source)
        except AccountLocked as exc:
            log.warning(
                "password change refused from %s for %r: locked for %d s",
                session.source,
                me,
                exc.retry_after_s,
            )
            session.send(
                P.PasswordChangeFailed(
                    code=P.AuthCode.LOCKED, retry_after_s=exc.retry_after_s, reason=str(exc)
                )
            )
            return
        except InvalidCredentials:
            log.warning("failed password change from %s for %r: wrong old password", session.source, me)
            session.send(
                P.PasswordChangeFailed(
                    code=P.AuthCode.INVALID_CREDENTIALS,
                    retry_after_s=0,
                    reason="The old password is wrong; the password was not changed.",
                )
            )
            return
        except InvalidPassword as exc:
            session.send(
                P.PasswordChangeFailed(code=P.AuthCode.INVALID_PASSWORD, retry_after_s=0, reason=str(exc))
            )
            return
        except ServiceUnavailable as exc:
            log.warning("service unavailable: %s", exc)
            session.send(
                P.PasswordChangeFailed(
                    code=P.AuthCode.UNAVAILABLE,
                    retry_after_s=5,
                    reason="The server's database is unavailable; try again later.",
                )
            )
            return
        log.info(
            "%r changed their password from %s; their earlier session tickets have ended", me, session.source
        )
        self._gate.audit("password_change", me, session.source)
        session.send(P.PasswordChanged(ticket=self.tickets.issue(me, session.identity_key, epoch)))

    def delete_account(self, session: Session, msg: P.DeleteAccount) -> None:
        """The password again (bcrypt, with the login lockout) and the username typed; then it is all gone."""
        me = session.username
        assert me is not None
        if msg.confirm != me:
            session.send(
                P.AccountDeleted(
                    deleted=False, reason="The confirmation is not your username; nothing was deleted."
                )
            )
            return
        try:
            self.auth.login(me, msg.password, session.source)
        except AccountLocked as exc:
            self._gate.audit("lockout", me, session.source, "DeleteAccount")
            session.send(P.AccountDeleted(deleted=False, reason=str(exc)))
            return
        except InvalidCredentials:
            self._gate.audit("delete_account_failed", me, session.source, "wrong password")
            session.send(P.AccountDeleted(deleted=False, reason="Wrong password; nothing was deleted."))
            return
        self.storage.delete_user(me)
        self._gate.audit("delete_account", me, session.source)
        session.send(
            P.AccountDeleted(
                deleted=True, reason="Your account and everything the server kept for it were deleted."
            )
        )
        session.close("Your account was deleted.")

    def password_changed(self, username: str, source: str) -> int:
        """The hook for a password change (/passwd): call it once the new hash is stored.

        Raises the account's ticket epoch, so every resumption ticket issued before is
        void (docs/PROTOCOL.md section 7.1), and writes the audit row (never the
        password).  Returns the new epoch, to issue the changing session a fresh ticket:
        ``self.tickets.issue(username, session.identity_key, epoch)``."""
        self.storage.bump_ticket_epoch(username)
        self._gate.audit("password_change", username, source)
        return self.storage.get_ticket_epoch(username) or 0
