"""The chat service: handshake results in, logins, the KDC, relay, queue, direct mode."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import crypto_utils as cu
from secureim import proto as P
from secureim import storage as D
from secureim.e2e import datagrams as direct
from secureim.errors import (
    AccountLocked,
    AuthError,
    ConnectionClosed,
    DatabaseError,
    InvalidCredentials,
    InvalidPassword,
    InvalidUsername,
    SecureIMError,
    ServiceUnavailable,
    UsernameTaken,
)
from secureim.proto import normalize_username
from secureim.server.accounts import AuthService
from secureim.server.cluster.local import SIGNED_IN_ELSEWHERE, Cluster, LocalCluster
from secureim.server.config import ServerConfig
from secureim.server.metrics import ServerMetrics
from secureim.server.moderation import (
    AddressBans,
    ban_message,
)
from secureim.server.registry import (
    MAX_DB_ID,
    MAX_ONE_TIME_PREKEYS,
    MAX_TRACKED_RECIPIENTS,
    QUEUE_EXPIRY_EVERY_S,
    QUEUE_WINDOW,
    LiveConversation,
    Registry,
    Session,
    SourceRateLimiter,
    loggable,
)
from secureim.server.rooms import RoomService
from secureim.server.tickets import TicketIssuer, load_or_create_ticket_key
from secureim.storage import Storage

log = logging.getLogger("secureim.server")


# =============================================================================
# The service: what each message means
# =============================================================================
class ChatService(RoomService):
    """Login, presence, KDC and relay (rooms: room_service.py).  No sockets; tests drive it directly."""

    def __init__(
        self,
        storage: Storage,
        config: ServerConfig,
        announce: Callable[[str], None] = lambda line: None,
        *,
        ticket_key: bytes | None = None,
    ) -> None:
        self.storage = storage
        self.config = config
        self.suite = cu.get_suite(config.cipher, tdes_backend=config.tdes_backend)
        self.auth = AuthService(
            storage, bcrypt_cost=config.bcrypt_cost, max_failures=config.max_failures, lock_s=config.lock_s
        )
        self.registry = Registry()
        self.announce = announce
        ticket_key = ticket_key or load_or_create_ticket_key(Path(config.data_dir))
        self.tickets = TicketIssuer(ticket_key)
        self._kdc_lock = threading.Lock()
        self._opens_for: dict[str, deque] = {}  # recipient -> times of recent OfflineOpens for them
        self._opens_lock = threading.Lock()
        # The KDC keys of offline conversations wait in the database sealed under this (every node has it).
        self._offline_keys = cu.SealedBox(
            cu.hkdf(ticket_key, salt=None, info=cu.label("offline kdc keys at rest"), length=32),
            "offline kdc key",
        )
        self._init_rooms(ticket_key)
        # Operating the server (moderation.py, metrics.py): bans, kicks, the audit log, counters.
        self.metrics = ServerMetrics()
        self.address_bans = AddressBans()
        self.node = config.node_name or socket.gethostname()
        self.relayed = 0  # messages relayed (the loop thread counts; the metric reads it)
        self.metrics.relayed_total = lambda: self.relayed
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread_id: int | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.cluster: Cluster = LocalCluster()
        if config.cluster_url:
            from secureim.server.cluster.nats_bus import NatsCluster, bus_key

            self.cluster = NatsCluster(
                config.cluster_url,
                config.cluster_prefix,
                bus_key(ticket_key),
                config.node_name or socket.gethostname(),
            )

    def attach(
        self, loop: asyncio.AbstractEventLoop, loop_thread_id: int | None, pool: ThreadPoolExecutor
    ) -> None:
        """Serve from ``loop`` with slow work on ``pool`` (Server.start calls this)."""
        self.loop, self.loop_thread_id, self.pool = loop, loop_thread_id, pool
        self.cluster.start(self)
        self.on_loop(self._expire_queue_soon, 0.0)

    def _expire_queue_soon(self, delay_s: float) -> None:
        """Stored messages older than the queue's age bound go, now and every hour."""
        assert self.loop is not None
        self.loop.call_later(delay_s, self.run_slow, self._expire_queue)

    def _expire_queue(self) -> None:
        try:
            gone = self.storage.expire_queue(time.time() - self.config.queue_max_age_s)
            if gone:
                log.info("%d stored messages expired unread", gone)
        finally:
            self.on_loop(self._expire_queue_soon, QUEUE_EXPIRY_EVERY_S)

    def learn_conversation(self, cid: int, members: tuple[str, str], generation: int) -> None:
        """Another node's KDC keyed a conversation with one of our users: relay it from here too."""
        self.registry.keyed(cid, members, generation)

    def replaced_elsewhere(self, session: Session) -> None:
        """``session``'s user logged in on another node: end it here (the cluster announces the new one)."""
        session.gone = True  # this bookkeeping instead of disconnected(): the user is not offline
        self.registry.remove(session)
        self.run_slow(self._session_ended, session.username)
        session.close(SIGNED_IN_ELSEWHERE)

    def cluster_stop(self) -> None:
        self.cluster.stop()

    # -- operating the server: audit, bans, kicks --------------------------------------
    def audit(self, event: str, username: str = "", source: str = "", detail: str = "") -> None:
        """One audit row; never a password, key or message.  A failed write is logged, never fatal."""
        try:
            self.storage.audit(event, username, source, detail)
        except DatabaseError as exc:
            self.metrics.audit_failures.inc()
            log.warning("audit %s not recorded: %s", event, exc)

    def _refuse_if_banned(self, session: Session, username: str | None) -> bool:
        """Network bans before any password work; account bans after it.  True if refused."""
        ban = self.address_bans.match(session.source)
        if ban is not None:  # the cache says banned: re-read, so a lifted ban counts at once
            self.address_bans.load(self.storage.active_bans(time.time(), kind="address"))
            ban = self.address_bans.match(session.source)
        if ban is None and username is not None:
            ban = self.storage.user_ban(username, time.time())
        if ban is None:
            return False
        self.metrics.logins.labels("banned").inc()
        self.audit("login_banned", username or "", session.source, ban.kind)
        session.send(P.AuthFailed(code=P.AuthCode.BANNED, retry_after_s=0, reason=ban_message(ban)))
        session.close()
        return True

    def password_changed(self, username: str, source: str) -> int:
        """The hook for a password change (/passwd): call it once the new hash is stored.

        Raises the account's ticket epoch, so every resumption ticket issued before is
        void (docs/PROTOCOL.md section 7.1), and writes the audit row (never the
        password).  Returns the new epoch, to issue the changing session a fresh ticket:
        ``self.tickets.issue(username, session.identity_key, epoch)``."""
        self.storage.bump_ticket_epoch(username)
        self.audit("password_change", username, source)
        return self.storage.get_ticket_epoch(username) or 0

    def kick(self, username: str, reason: str) -> bool:
        """End ``username``'s session here, telling them why; False if not online here."""
        session = self.registry.session_of(username)
        if session is None:
            return False
        self.metrics.kicks.inc()
        session.close(reason[: P.MAX_REASON_BYTES // 2] or "An administrator ended your session.")
        return True

    def kick_banned_sources(self) -> int:
        """End every session whose address a network ban now covers."""
        ended = 0
        for session in self.registry.all_sessions():
            ban = self.address_bans.match(session.source)
            if ban is not None:
                self.metrics.kicks.inc()
                session.close(ban_message(ban))
                ended += 1
        return ended

    # -- dispatch ----------------------------------------------------------------
    def handle(self, session: Session, msg: P.Message) -> None:
        handler = self._HANDLERS.get(type(msg))
        if handler is None:
            return  # Goodbye: the protocol already closed the session
        try:
            handler(self, session, msg)
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

    # -- accounts ------------------------------------------------------------------
    def _auth(self, session: Session, msg: P.Login | P.Register) -> None:
        session.auth_attempts += 1
        register = isinstance(msg, P.Register)
        if self._refuse_if_banned(session, None):
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
                    self.audit("identity_key_changed", username, session.source)
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

    def _resume(self, session: Session, msg: P.Resume) -> None:
        """A resumption ticket instead of the password: no bcrypt; one database read (the epoch)."""
        session.auth_attempts += 1
        if self._refuse_if_banned(session, None):
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
        self.audit("lockout" if locked else "login_failed", username, session.source, code.name)
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
        if self._refuse_if_banned(session, username):
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
        self.cluster.user_online(username, session.login_at, session.identity_key)  # other nodes drop theirs
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
                self.node, username, session.source, time.time(), "register" if created else how
            )
        except DatabaseError as exc:
            self.metrics.audit_failures.inc()
            log.warning("login bookkeeping failed: %s", exc)
        self.announce(
            f"[SERVER]: {username} connected from {session.source}. ({len(self.registry.online)} online)"
        )
        self.notify(username, waiting, online=True)
        self._send_prekey_status(session)
        self.push_queue(session)  # what was stored while they were away, in order, before anything new

    def disconnected(self, session: Session) -> None:
        was_online, peers = self.registry.remove(session)
        if not was_online or session.username is None:
            return
        username = session.username
        self.announce(f"[SERVER]: {username} disconnected. ({len(self.registry.online)} online)")
        self.cluster.user_offline(username, session.login_at)
        self.run_slow(self._session_ended, username)
        self.notify(username, peers, online=False)

    def notify(self, username: str, peers, *, online: bool) -> None:
        """Tell each of ``peers`` online here that ``username`` came or went (a notice: they re-open)."""
        for peer in peers:
            peer_session = self.registry.session_of(peer)
            if peer_session is not None:
                peer_session.send(P.PeerStatus(peer=username, online=online, known=True, notice=True))

    def _session_ended(self, username: str) -> None:
        try:
            self.storage.session_ended(self.node, username)
        except DatabaseError as exc:
            log.warning("session bookkeeping failed: %s", exc)

    # -- presence and the KDC ------------------------------------------------------
    @staticmethod
    def _peer_named(session: Session, raw: str, refusal: str) -> str | None:
        """``raw`` as a username, or None once the session has been told why not (invalid, or itself)."""
        try:
            peer = normalize_username(raw)
        except AuthError:
            session.send(P.PeerStatus(peer=raw, online=False, known=False))
            return None
        if peer == session.username:
            session.send(P.Error(code=P.ErrorCode.BAD_REQUEST, reason=refusal))
            return None
        return peer

    def _open(self, session: Session, msg: P.OpenConversation) -> None:
        me = session.username
        assert me is not None
        peer = self._peer_named(session, msg.peer, "You cannot open a conversation with yourself.")
        if peer is None:
            return
        peer_session = self.registry.session_of(peer)
        if peer_session is None and not self.cluster.is_remote(peer):
            known = self.storage.get_password_hash(peer) is not None
            if known:  # the peer may have logged in while the database answered
                peer_session = self.registry.watch_unless_online(me, peer)
            if peer_session is None and not self.cluster.is_remote(peer):
                session.send(P.PeerStatus(peer=peer, online=False, known=known))
                return
        session.send(P.PeerStatus(peer=peer, online=True, known=True))
        cid = self.storage.open_conversation(me, peer)
        self._distribute_key(cid, (me, peer) if me < peer else (peer, me))

    def _distribute_key(self, cid: int, members: tuple[str, str], *, rekey: bool = False) -> None:
        """KDC: a fresh key for the conversation, sent to both members, then forgotten.

        The generation comes from the database (a worker's job); the hand-out runs on the
        loop thread, in one go, so no relayed frame of this conversation can slip between
        the two members' keys (a peer's share must never arrive before the key it answers)."""
        with self._kdc_lock:
            generation = self.storage.record_key_generation(cid)
            key = self.suite.generate_key()
        self.on_loop(self._hand_out_key, cid, members, generation, key, rekey)
        del key  # never stored (design 000)

    def _hand_out_key(
        self, cid: int, members: tuple[str, str], generation: int, key: bytes, rekey: bool = False
    ) -> None:
        if rekey and cid not in self.registry.conversations:
            return  # a member left while the key was made: the conversation is over, not re-created
        self._send_keys(cid, members, generation, key)
        self._release_held(cid)

    def _send_keys(self, cid: int, members: tuple[str, str], generation: int, key: bytes) -> None:
        self.registry.keyed(cid, members, generation)
        sessions = {user: self.registry.session_of(user) for user in members}
        identities = {
            user: s.identity_key if s is not None else self.cluster.identity_of(user)
            for user, s in sessions.items()
        }
        for user in members:
            other = members[1] if user == members[0] else members[0]
            if identities[other] is None:
                continue
            msg = P.ConversationKey(
                conversation_id=cid,
                peer=other,
                suite=self.suite.suite_id,
                generation=generation,
                key=key,
                peer_identity=identities[other],
            )
            if sessions[user] is not None:
                sessions[user].send(msg)
            else:  # on another node: sealed for the cluster bus (cluster_nats.py)
                self.cluster.send_key(user, members, generation, msg)
            del msg

    def on_loop(self, fn, *args) -> None:
        """Run ``fn`` on the loop thread (now, if this is it): relays run there, so it runs between them."""
        if self.loop is None or threading.get_ident() == self.loop_thread_id:
            fn(*args)
            return
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop has stopped
            pass

    # -- relay -------------------------------------------------------------------------
    def _relay(self, session: Session, msg: P.Relay) -> None:
        """The hot path, on the loop thread only: no lock shared by all sessions, no database.

        The conversation table is written under the registry lock by workers; a dict
        read is atomic, and the counters below are touched by this thread alone."""
        sampled = not self.relayed & RELAY_SAMPLE_MASK  # time one relay in 16: the histogram stays cheap
        started = time.perf_counter() if sampled else 0.0
        me = session.username
        conv = self.registry.conversations.get(msg.conversation_id)
        if conv is None or me not in conv.members:
            self.metrics.undelivered.inc()
            session.send(
                P.Error(code=P.ErrorCode.NOT_A_MEMBER, reason="No such conversation; open it again.")
            )
            return
        if conv.held is not None:  # its new key is on its way: this frame goes right after it
            if len(conv.held) >= MAX_HELD_RELAYS:
                session.send(
                    P.Error(
                        code=P.ErrorCode.UNAVAILABLE,
                        reason="The conversation is being re-keyed; try again in a moment.",
                    )
                )
            else:
                conv.held.append((session, msg))
            return
        conv.messages += 1
        conv.bytes_relayed += len(msg.payload)
        peer = conv.members[0] if conv.members[1] == me else conv.members[1]
        deliver = P.Deliver(conversation_id=msg.conversation_id, sender=me, payload=msg.payload)
        peer_session = self.registry.online.get(peer)
        if peer_session is not None:
            delivered = peer_session.send(deliver)
        else:
            delivered = self.cluster.deliver(peer, deliver)
        if not delivered:
            self.metrics.undelivered.inc()
            if peer_session is None and self.cluster.is_remote(peer):
                reason = (
                    f"{peer} is temporarily unreachable (the cluster link is down); message not delivered."
                )
            else:
                reason = f"{peer} is offline; message not delivered."
            session.send(P.Error(code=P.ErrorCode.PEER_OFFLINE, reason=reason))
            return
        self.relayed += 1
        if sampled:
            self.metrics.relay_latency.observe(time.perf_counter() - started)
        if (
            conv.messages >= self.config.rekey_after_messages
            or conv.rekey_pending
            or conv.bytes_relayed >= self.suite.max_bytes_per_key // 2
            or time.monotonic() - conv.keyed_at >= self.config.rekey_after_s
        ):
            self._maybe_rekey(conv)

    def _maybe_rekey(self, conv: LiveConversation) -> None:
        age = time.monotonic() - conv.keyed_at
        if age < self.config.min_rekey_interval_s:
            conv.rekey_pending = True  # due, but not faster than the minimum interval
            return
        conv.rekey_pending = False
        conv.messages, conv.bytes_relayed, conv.keyed_at = 0, 0, time.monotonic()
        conv.held = []  # as in a one-thread server: nothing of this conversation overtakes the new key
        self.run_slow(self._rekey, conv.id, conv.members)

    def _rekey(self, cid: int, members: tuple[str, str]) -> None:
        try:
            self._distribute_key(cid, members, rekey=True)
        except Exception:
            self.on_loop(self._release_held, cid)  # no new key after all: the held frames go now
            raise

    def _release_held(self, cid: int) -> None:
        conv = self.registry.conversations.get(cid)
        if conv is None or conv.held is None:
            return
        held, conv.held = conv.held, None
        for sender, msg in held:
            if not sender.closed.is_set():
                self._relay(sender, msg)

    def run_slow(self, fn, *args) -> None:
        """Run ``fn`` on a worker thread (database, KDC); at once when no pool is attached (tests)."""
        if self.pool is None:
            fn(*args)
            return
        try:
            self.pool.submit(self._guarded, fn, *args)
        except RuntimeError:  # shutting down
            pass

    @staticmethod
    def _guarded(fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001
            log.exception("background task failed")

    # -- direct mode: endpoints and tickets (docs/PROTOCOL.md section 12.2) ----------
    def _register_endpoint(self, session: Session, msg: P.RegisterEndpoint) -> None:
        if not 1 <= msg.port <= 65535:
            session.send(P.Error(code=P.ErrorCode.BAD_REQUEST, reason="A UDP port is between 1 and 65535."))
            return
        session.udp_port = msg.port

    def _direct_request(self, session: Session, msg: P.DirectRequest) -> None:
        """Hand the initiator the peer's endpoint and a ticket only the peer can open."""
        me, peer = session.username, msg.peer
        assert me is not None
        conv = self.registry.conversation_between(me, peer)
        if conv is None:
            answer = (
                f"{peer} is offline."
                if self.registry.session_of(peer) is None and not self.cluster.is_remote(peer)
                else f"Open a conversation with {peer} first."
            )
        elif session.udp_port is None:
            answer = "Register a UDP port first."
        elif self.registry.session_of(peer) is None and self.cluster.is_remote(peer):
            answer = self.cluster.direct_offer(peer, me, session.source, session.udp_port, conv.id)
        else:
            answer = self.direct_offer_for(peer, me, session.source, session.udp_port, conv.id)
        if isinstance(answer, str):
            answer = P.DirectUnavailable(peer=peer, reason=answer)
        session.send(answer)

    def direct_offer_for(
        self, peer: str, initiator: str, host: str, port: int, conversation_id: int
    ) -> P.DirectOffer | str:
        """The offer for ``initiator`` to reach ``peer`` (online here), or why not.

        The ticket is sealed with the key only ``peer``'s session shares with this node,
        so another node asks this one for it (cluster_nats.py, DIRECT)."""
        peer_session = self.registry.session_of(peer)
        if peer_session is None:
            return f"{peer} is offline."
        if peer_session.udp_port is None:
            peer_session.send(P.DirectAsked(peer=initiator))  # the peer has not opted in: tell them who asks
            return f"{peer} does not accept direct connections."
        key = peer_session.proto.direct_ticket_key
        assert key is not None
        ticket = direct.seal_ticket(
            key, initiator=initiator, host=host, port=port, conversation_id=conversation_id, now_s=time.time()
        )
        return P.DirectOffer(peer=peer, host=peer_session.source, port=peer_session.udp_port, ticket=ticket)

    # -- password change (docs/PROTOCOL.md section 13) ------------------------------------
    def _change_password(self, session: Session, msg: P.ChangePassword) -> None:
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
        self.audit("password_change", me, session.source)
        session.send(P.PasswordChanged(ticket=self.tickets.issue(me, session.identity_key, epoch)))

    def _who(self, session: Session, msg: P.WhoRequest) -> None:
        users = sorted(set(self.registry.online_users()) | set(self.cluster.remote_users()))
        session.send(P.WhoResponse(users=tuple(users[: P.MAX_WHO_USERS]), total=len(users)))

    # -- store and forward (docs/PROTOCOL.md section 15) --------------------------------
    def _wrap_aad(self, recipient: str, cid: int, generation: int) -> bytes:
        return (  # after the box's label, "secureim/v1 offline kdc key"
            recipient.encode() + b"\x00" + cid.to_bytes(8, "big") + generation.to_bytes(4, "big")
        )

    def _send_prekey_status(self, session: Session) -> None:
        assert session.username is not None
        status = self.storage.prekey_status(session.username)
        age = int(max(0.0, time.time() - status.signed_at)) if status.signed_at is not None else 0
        session.send(
            P.PrekeyStatus(
                one_time_left=status.one_time_left,
                signed_prekey_id=status.signed_id or 0,
                signed_prekey_age_s=min(age, 0xFFFFFFFF),
            )
        )

    def _publish_prekeys(self, session: Session, msg: P.PublishPrekeys) -> None:
        me = session.username
        assert me is not None
        entry = P.ONE_TIME_PREKEY_BYTES
        if (msg.signed_prekey and len(msg.signed_prekey) != P.SIGNED_PREKEY_BYTES) or len(
            msg.one_time
        ) % entry:
            session.send(P.Error(code=P.ErrorCode.BAD_REQUEST, reason="Malformed prekeys were refused."))
            return
        one_time = [
            (int.from_bytes(msg.one_time[i : i + 4], "big"), msg.one_time[i : i + entry])
            for i in range(0, len(msg.one_time), entry)
        ]
        signed_id = int.from_bytes(msg.signed_prekey[:4], "big") if msg.signed_prekey else None
        if signed_id == 0 or any(key_id == 0 for key_id, _e in one_time):
            session.send(P.Error(code=P.ErrorCode.BAD_REQUEST, reason="Prekey id 0 is reserved."))
            return
        if msg.replace:
            self.storage.clear_prekeys(me, signed=False)
        if signed_id is not None:
            self.storage.set_signed_prekey(me, signed_id, msg.signed_prekey, time.time())
        if one_time:
            self.storage.add_one_time_prekeys(me, one_time, MAX_ONE_TIME_PREKEYS)
        self._send_prekey_status(session)

    def _offline_open(self, session: Session, msg: P.OfflineOpen) -> None:
        """The peer's prekey bundle (one one-time prekey taken) and a fresh KDC key for an offline
        conversation; the key also waits, sealed, for the peer (docs/PROTOCOL.md section 15)."""
        me = session.username
        assert me is not None
        peer = self._peer_named(session, msg.peer, "You cannot write to yourself.")
        if peer is None:
            return
        refusal = self._offline_open_refused(session, peer)
        if refusal is not None:
            session.send(P.Error(code=P.ErrorCode.RATE_LIMITED, reason=refusal))
            return
        identity = self.storage.get_identity_key(peer)
        if identity is None:
            session.send(P.PeerStatus(peer=peer, online=False, known=False))
            return
        signed, one_time = self.storage.take_prekey_bundle(peer)
        if signed is None:
            session.send(
                P.Error(
                    code=P.ErrorCode.PEER_OFFLINE,
                    reason=f"{peer} is offline and has no keys for offline messages yet (their client "
                    f"publishes them when it logs in); the message was not sent.",
                )
            )
            return
        cid = self.storage.open_conversation(me, peer)
        with self._kdc_lock:
            generation = self.storage.record_key_generation(cid)
            key = self.suite.generate_key()
        wrapped = self._offline_keys.seal(key, self._wrap_aad(peer, cid, generation))
        self.storage.put_offline_key(peer, cid, generation, me, wrapped, time.time())
        session.send(
            P.OfflineKey(
                conversation_id=cid,
                peer=peer,
                suite=self.suite.suite_id,
                generation=generation,
                key=key,
                peer_identity=identity,
                signed_prekey=signed,
                one_time_prekey=one_time or b"",
            )
        )
        del key

    def _offline_open_refused(self, session: Session, peer: str) -> str | None:
        """Each OfflineOpen takes one of the peer's one-time prekeys: at most so many a minute per
        session, and per recipient whoever asks (on this node); None when this one may go."""
        now = time.monotonic()
        with self._opens_lock:
            mine = session.offline_opens
            theirs = self._opens_for.setdefault(peer, deque())
            for times in (mine, theirs):
                while times and now - times[0] > 60.0:
                    times.popleft()
            if len(mine) >= self.config.offline_opens_per_minute:
                return "Too many offline conversations opened in a minute; try again shortly."
            if len(theirs) >= self.config.offline_opens_per_recipient_per_minute:
                return (
                    f"Too many offline conversations with {peer} were opened in a minute; try again shortly."
                )
            mine.append(now)
            theirs.append(now)
            while len(self._opens_for) > MAX_TRACKED_RECIPIENTS:
                self._opens_for.pop(next(iter(self._opens_for)))
        return None

    def _store(self, session: Session, msg: P.Store) -> None:
        me = session.username
        assert me is not None and session.identity_key is not None
        known = (
            self.storage.get_conversation(msg.conversation_id) if msg.conversation_id <= MAX_DB_ID else None
        )
        if known is None or me not in known.members:
            session.send(
                P.StoreResult(
                    conversation_id=msg.conversation_id,
                    msg_ref=msg.msg_ref,
                    status=P.StoreStatus.REFUSED,
                    reason="No such conversation.",
                )
            )
            return
        recipient = known.members[1] if known.members[0] == me else known.members[0]
        status, _qid = self.storage.enqueue(
            D.QueuedMessage(
                0,
                recipient,
                me,
                msg.conversation_id,
                msg.generation,
                msg.msg_ref,
                session.identity_key,
                msg.payload,
                time.time(),
                None,
            ),
            self.config.queue_max_messages,
            self.config.queue_max_bytes,
        )
        if status == D.NO_KEY:
            result, reason = (
                P.StoreStatus.NO_KEY,
                "That offline conversation key has expired; open a new one.",
            )
        elif status in (D.FULL_MESSAGES, D.FULL_BYTES):
            limit = (
                f"{self.config.queue_max_messages} messages"
                if status == D.FULL_MESSAGES
                else f"{self.config.queue_max_bytes // (1 << 20)} MiB"
            )
            result = P.StoreStatus.REFUSED
            reason = (
                f"{recipient}'s mailbox is full ({limit} waiting); this message was not stored. Nothing "
                f"already stored for {recipient} was lost; try again once {recipient} has read them."
            )
            log.info("a stored message was refused: the recipient's queue is full (%s)", status)
        else:
            handed = self._nudge_queue(recipient)
            result, reason = (P.StoreStatus.HANDED_OVER if handed else P.StoreStatus.STORED), ""
        session.send(
            P.StoreResult(
                conversation_id=msg.conversation_id, msg_ref=msg.msg_ref, status=result, reason=reason
            )
        )

    def _nudge_queue(self, recipient: str) -> bool:
        """The recipient is online (here or on another node): hand them what waits now."""
        local = self.registry.session_of(recipient)
        if local is not None:
            self.push_queue(local)
            return True
        if self.cluster.is_remote(recipient):
            nudge = P.StoredMessage(
                queue_id=0,
                conversation_id=0,
                sender=recipient,
                suite=0,
                generation=0,
                key=b"",
                sender_identity=bytes(32),
                stored_at_ms=0,
                payload=b"",
            )
            self.on_loop(self.cluster.deliver, recipient, nudge)  # that node reads the queue
            return True
        return False

    def push_queue(self, session: Session) -> None:
        """Send the session's stored messages, in order, at most QUEUE_WINDOW unacknowledged (a worker)."""
        me = session.username
        if me is None or session.closed.is_set():
            return
        with session.queue_lock:
            room = QUEUE_WINDOW - session.queue_in_flight
            if room < QUEUE_WINDOW // 2:
                return  # enough in flight: acknowledgements bring the rest
            for row in self.storage.queued_for(me, session.queue_sent_upto, room):
                sent = session.send(
                    self.room_row_message(me, row) if row.kind else self._stored_message(me, row)
                )
                if not sent:
                    return
                session.queue_sent_upto = row.id
                session.queue_in_flight += 1

    def _stored_message(self, me: str, row: D.QueuedMessage) -> P.StoredMessage:
        key = b""
        if row.wrapped_key:
            try:
                key = self._offline_keys.open(
                    row.wrapped_key, self._wrap_aad(me, row.conversation_id, row.generation)
                )
            except cu.DecryptionFailed:  # another service's key; the client says so
                key = b""
        return P.StoredMessage(
            queue_id=row.id,
            conversation_id=row.conversation_id,
            sender=row.sender,
            suite=self.suite.suite_id,
            generation=row.generation,
            key=key,
            sender_identity=row.sender_identity,
            stored_at_ms=int(row.stored_at * 1000),
            payload=row.payload,
        )

    def _defer(self, session: Session, msg: P.Defer) -> None:
        """The client keeps the message for later (a changed identity awaiting /accept): it stays
        stored, comes again at the next login, and no longer holds up the messages behind it."""
        with session.queue_lock:
            if 0 < msg.queue_id <= session.queue_sent_upto:
                session.queue_in_flight = max(0, session.queue_in_flight - 1)
        self.push_queue(session)

    def _ack(self, session: Session, msg: P.Ack) -> None:
        me = session.username
        assert me is not None
        if msg.queue_id <= MAX_DB_ID and self.storage.ack_queued(me, msg.queue_id):
            with session.queue_lock:
                session.queue_in_flight = max(0, session.queue_in_flight - 1)
            self.push_queue(session)

    # -- account self-service (docs/PROTOCOL.md section 14.1) -------------------------
    def _delete_account(self, session: Session, msg: P.DeleteAccount) -> None:
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
            self.audit("lockout", me, session.source, "DeleteAccount")
            session.send(P.AccountDeleted(deleted=False, reason=str(exc)))
            return
        except InvalidCredentials:
            self.audit("delete_account_failed", me, session.source, "wrong password")
            session.send(P.AccountDeleted(deleted=False, reason="Wrong password; nothing was deleted."))
            return
        self.storage.delete_user(me)
        self.audit("delete_account", me, session.source)
        session.send(
            P.AccountDeleted(
                deleted=True, reason="Your account and everything the server kept for it were deleted."
            )
        )
        session.close("Your account was deleted.")

    _HANDLERS = {
        P.Login: _auth,
        P.Register: _auth,
        P.Resume: _resume,
        P.OpenConversation: _open,
        P.Relay: _relay,
        P.WhoRequest: _who,
        P.RegisterEndpoint: _register_endpoint,
        P.DirectRequest: _direct_request,
        P.ChangePassword: _change_password,
    }
    _HANDLERS[P.DeleteAccount] = _delete_account
    _HANDLERS.update(
        {
            P.PublishPrekeys: _publish_prekeys,
            P.OfflineOpen: _offline_open,
            P.Store: _store,
            P.Ack: _ack,
            P.Defer: _defer,
        }
    )
    _HANDLERS.update(
        {
            P.RoomCreate: RoomService._room_create,
            P.RoomChange: RoomService._room_change,
            P.RoomSend: RoomService._room_send,
        }
    )


MAX_HELD_RELAYS = 1024  # frames of one conversation waiting for its new key (a database write away)
RELAY_SAMPLE_MASK = 15  # the relay latency histogram times one relayed message in 16
# Checked with bcrypt: handled on the password threads.  Resume (a ticket, no bcrypt) is not.
PASSWORD_MESSAGES = frozenset({P.Login, P.Register, P.ChangePassword, P.DeleteAccount})
FAST_MESSAGES = frozenset({P.Relay, P.WhoRequest})  # handled on the loop thread: no database, no slow crypto
