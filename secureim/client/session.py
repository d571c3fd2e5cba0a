"""The session: the "receiver" thread, resume with the ticket, auto-reconnect, and closing the connection."""

from __future__ import annotations

import logging
import random
import socket
import threading
import time

import crypto_utils as cu
from secureim import proto as P
from secureim.client.connection import NODE_CONNECT_TIMEOUT_S
from secureim.client.display import sanitize
from secureim.client.events import Disconnected, Reconnected, Reconnecting
from secureim.client.ports import SessionAccount, SessionConversations, SessionHost, SessionLink
from secureim.errors import (
    AuthError,
    ConnectionClosed,
    ProtocolError,
    SecureIMError,
    ServerKeyMismatch,
    ServiceUnavailable,
)

log = logging.getLogger("secureim.client")

RECONNECT_ATTEMPTS = 8  # auto_reconnect: at most this many tries...
RECONNECT_MAX_S = 60.0  # ...within this long
RECONNECT_BASE_DELAY_S = 0.25  # the first wait is up to this (full jitter), doubling each try...
RECONNECT_MAX_DELAY_S = 8.0  # ...up to this
# Goodbye reasons of a node that is going away (server.Server.shutdown's): failed over at once.
# The protocol's Goodbye has no code; any other Goodbye (a kick, a ban, a login from another
# place) is failed over only if the node no longer takes connections.
NODE_SHUTDOWN_REASONS = frozenset({"The server is shutting down."})


class Session:
    def __init__(
        self,
        host: SessionHost,
        link: SessionLink,
        account: SessionAccount,
        conversations: SessionConversations,
        *,
        auto_reconnect: bool,
        reconnect_attempts: int,
        reconnect_max_s: float,
    ) -> None:
        self._host = host
        self._link = link
        self._account = account
        self._conversations = conversations
        self.auto_reconnect = auto_reconnect
        self.reconnect_attempts, self.reconnect_max_s = reconnect_attempts, reconnect_max_s
        self.receiver: threading.Thread | None = None
        self.closed = threading.Event()
        self.stopping = threading.Event()  # close() was called: never reconnect again
        self.generation = 0  # bumped on every (re)connection: older receivers stay silent
        self._resume_lock = threading.Lock()

    def resume(self) -> bool:
        """Reconnect after the connection dropped (a server restart, a dead node), without the password.

        A new handshake with the next server of the list (the current one first when there
        is only one; the server's key is checked again), then the ticket from the last
        login.  The conversations that were open are asked for again.  Safe on a connection
        that is still open: the old receiver is woken and stays silent (it belongs to an
        older connection), so it never reads the new socket nor reports the old one lost.
        """
        self._host.after_resume(self.resume_session())
        return True

    def resume_session(self) -> set[str]:
        """resume()'s first half: a new session with the ticket.  The conversations to ask for again."""
        if self._account.ticket is None or self._account.identity is None:
            raise AuthError("No session ticket; log in with the password.")
        with self._resume_lock:
            wanted = self._conversations.wanted_peers()
            self.generation += 1  # first: the old receiver, once woken, knows it is stale
            self._link.drop_socket()
            if self.receiver is not None and self.receiver is not threading.current_thread():
                self.receiver.join(timeout=5)
            self._link.fail_barriers("the connection was lost before the server answered")
            self.closed.clear()
            self._conversations.reset()
            self._link.connect(start_at=self._link.node + 1)
            self._account.authenticate(
                P.Resume(ticket=self._account.ticket, identity_key=cu.public_bytes(self._account.identity))
            )
            self._link.end_reconnect()
            self.start()
        return wanted

    def start(self) -> None:
        """Start the receiver thread (after a successful login)."""
        if self._account.username is None:
            raise AuthError("Log in first.")
        assert self._link.sock is not None
        self._link.sock.settimeout(None)
        early = self._account.take_early()
        receiver = threading.Thread(
            target=self.receive_loop,
            args=(self._link.sock, self._link.proto, self.generation, early),
            name="receiver",
            daemon=True,
        )
        receiver.start()
        self.receiver = receiver  # only once started: close() may join it from another thread

    def receive_loop(
        self, sock: socket.socket, proto: P.ClientProtocol, connection: int, early: list | None = None
    ) -> None:
        """Read one connection until it ends; only the current connection may report its end."""
        reason, goodbye, going_away = "closed", False, False
        try:
            while not self.closed.is_set():
                events, early = (early, None) if early else (self._link.recv_events(sock, proto), None)
                if connection != self.generation:
                    return  # resume() replaced this connection: nothing of it is news any more
                # A Goodbye is taken first: what came before it in the same read is still shown,
                # but an answer it asks for fails on the closed session, and that failure must
                # not pass for a lost connection (auto_reconnect would undo a kick).
                bye = next((i for i, e in enumerate(events) if isinstance(e, P.Goodbye)), None)
                if bye is not None:
                    reason = f"the server closed the session: {sanitize(events[bye].reason, 512)}"
                    goodbye, going_away = True, events[bye].reason in NODE_SHUTDOWN_REASONS
                    events = events[:bye]
                for event in events:
                    try:
                        self._host.dispatch(event)
                    except ConnectionClosed:
                        if not goodbye:
                            raise
                if goodbye or proto.state is P.State.CLOSED:
                    reason = reason if goodbye else proto.close_reason or "closed"
                    break
        except ConnectionClosed as exc:
            reason = str(exc)
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
        finally:
            if connection == self.generation:
                self.connection_ended(reason, goodbye and not going_away)

    def connection_ended(self, reason: str, goodbye: bool) -> None:
        """``goodbye``: the server ended this session on purpose while staying up (probably)."""
        self._link.fail_barriers(f"the connection was lost before the server answered ({reason})")
        ticket_refused = False
        if (
            self.auto_reconnect
            and not self.stopping.is_set()
            and self._account.ticket is not None
            and (not goodbye or not self.node_reachable())
        ):
            self._link.begin_reconnect()
            failure = self.reconnect(reason)
            if failure is None:  # _resume_session cleared it; a newer connection's loss may have set it since
                return
            self._link.end_reconnect()
            reason, ticket_refused = (
                failure,
                self._account.ticket is None,
            )  # _reconnect forgets a refused ticket
        if not self.closed.is_set() and not self.stopping.is_set():
            self._host.emit(Disconnected(reason, ticket_refused))
        self.closed.set()
        self._conversations.wake_all()  # nobody waits for a conversation on a dead connection

    def node_reachable(self) -> bool:
        """After a Goodbye: does this node still take connections?  A kick, a ban or a login from
        another place comes from a node that is still up, and reconnecting must not undo it (nor
        start two devices kicking each other out)."""
        try:
            socket.create_connection(
                (self._link.host, self._link.port), timeout=NODE_CONNECT_TIMEOUT_S
            ).close()
        except OSError:
            return False
        return True

    def reconnect(self, reason: str) -> str | None:
        """auto_reconnect: resume on the next live server, with exponential backoff and full jitter
        (at most ``reconnect_attempts`` tries within ``reconnect_max_s``).  None once the session
        goes on (or close() was called meanwhile); else why it gave up."""
        deadline = time.monotonic() + self.reconnect_max_s
        for attempt in range(1, self.reconnect_attempts + 1):
            ceiling = min(RECONNECT_MAX_DELAY_S, RECONNECT_BASE_DELAY_S * 2 ** (attempt - 1))
            delay = random.uniform(0, ceiling)  # spread a whole node's clients over the window
            if time.monotonic() + delay > deadline or self.stopping.wait(delay):
                break
            self._host.emit(Reconnecting(attempt, reason))
            try:
                wanted = self.resume_session()
            except ServerKeyMismatch as exc:  # never retried: a security event
                return f"Reconnecting failed: {exc}"
            except (
                AuthError
            ) as exc:  # never retried: the ticket is void (expired, or a password change ended it)
                self._account.forget_ticket()
                return f"Reconnecting failed: {exc}"
            except (ConnectionClosed, ProtocolError, ServiceUnavailable) as exc:
                reason = str(exc)
                continue
            if self.stopping.is_set():  # close() was called while we reconnected
                self._host.close()
                return None
            # Said before the conversations are asked for again: their ConversationReady comes after.
            self._host.emit(Reconnected(self._link.node_id, attempt))
            try:
                self._host.after_resume(wanted)
            except (ConnectionClosed, ProtocolError) as exc:  # the new connection's receiver reports it
                log.info("after reconnecting: %s", exc)
            return None
        return f"Gave up reconnecting: {reason}"

    def close_connection(self, timeout_s: float) -> None:
        sock = self._link.sock
        if sock is None:
            self.closed.set()
            return
        self.closed.set()
        try:
            if self._link.proto.state in (P.State.ESTABLISHED, P.State.AUTHENTICATED):
                with self._link.send_lock:
                    sock.sendall(self._link.proto.send(P.Goodbye(reason="client quit")))
            sock.shutdown(socket.SHUT_WR)
        except (OSError, SecureIMError):
            pass
        if self.receiver is not None and self.receiver is not threading.current_thread():
            self.receiver.join(timeout=timeout_s)
        try:  # the server closes its end once it has processed our Goodbye
            sock.settimeout(timeout_s)
            while sock.recv(65536):
                pass
        except OSError:
            pass
        sock.close()
        self._link.sock = None
        self._host.close_direct()
