"""The network shell: the asyncio listener, one Link per connection, the worker pools."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import crypto_utils as cu
import diffiehellman
from secureim import proto as P
from secureim.errors import (
    ConfigError,
    DatabaseError,
    ProtocolError,
)
from secureim.server.config import IDENTITY_FILE, ServerConfig
from secureim.server.metrics import MetricsEndpoint
from secureim.server.moderation import (
    ModerationPoller,
)
from secureim.server.puzzle_gate import PuzzleGate
from secureim.server.registry import (
    INBOX_RESUME_ITEMS,
    LINGER_S,
    MAX_INBOX_BYTES,
    MAX_INBOX_ITEMS,
    Session,
    SourceRateLimiter,
)
from secureim.server.service import ChatService
from secureim.storage import Storage, open_storage

log = logging.getLogger("secureim.server")


class Link(asyncio.Protocol):
    """The event-loop end of one TCP connection: bytes in to the server, queued bytes out."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = server.loop
        self.limit = server.config.outbox_limit_bytes
        self.buffered = 0  # bytes written but not yet taken by the kernel (the loop updates it)
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.lingering = False
        self.peer_eof = False
        self._closing = False

    # -- asyncio callbacks (loop thread) ----------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername") or ("?", 0)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small frames: no Nagle delay
            except OSError:
                pass
        self.session = self.server.admit(self, peer[0])

    def data_received(self, data: bytes) -> None:
        if self.lingering or self.session is None:
            return  # a farewell is on its way: what still arrives is read and dropped
        self.server.feed(self.session, data)

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.buffered = self.transport.get_write_buffer_size()

    def resume_writing(self) -> None:  # the kernel took most of it: the count is fresh again
        if self.transport is not None:
            self.buffered = self.transport.get_write_buffer_size()

    def eof_received(self) -> bool:
        """The peer has sent all it will: answer what it sent, then close (half-open until then)."""
        self.peer_eof = True
        if self.session is not None and not self.lingering:
            self.server.pump(self.session)
        if self.lingering and self.transport is not None:
            self.transport.close()
        return True

    def connection_lost(self, exc) -> None:
        if self.session is not None:
            self.server.lost(self.session)

    # -- called from any thread ---------------------------------------------------------
    def _call(self, fn, *args) -> None:
        if threading.get_ident() == self.server.loop_thread_id:
            self.loop.call_soon(fn, *args)
        else:
            try:
                self.loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the loop has stopped: the server is gone
                pass

    def flush_soon(self) -> None:
        self._call(self.flush)

    def close_soon(self) -> None:
        self._call(self.close_gracefully)

    def abort(self, why: str) -> None:
        log.info("closed %s: %s", self.session.source if self.session else "?", why)
        self._call(self.abort_now)

    # -- loop thread -------------------------------------------------------------------
    def flush(self) -> None:
        transport, session = self.transport, self.session
        if transport is None or session is None or transport.is_closing():
            return
        data = session.take_output()
        if data:
            transport.write(data)
        self.buffered = transport.get_write_buffer_size()  # what the kernel has not taken yet

    def close_gracefully(self) -> None:
        """Loop thread only.  Write what is queued, half-close, read until the peer closes (bounded), then close.

        Closing at once with unread input makes the kernel send RST, which can destroy
        the farewell before the peer reads it."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        self.flush()
        self.lingering = True
        if self.session is not None:
            self.server.lost(self.session)  # others see the user gone at once, not after the linger
        transport = self.transport
        if transport.is_closing():
            return
        try:
            if transport.can_write_eof():
                transport.write_eof()
        except (OSError, RuntimeError):
            transport.close()
            return
        self.loop.call_later(LINGER_S, transport.abort)  # bounded: a peer that never reads cannot hold it

    def abort_now(self) -> None:
        """Loop thread only."""
        if self.transport is not None:
            self.transport.abort()


# =============================================================================
# The socket server
# =============================================================================
class Server:
    """A loop thread for every socket, a pool of worker threads for slow work.

    One event loop (uvloop where it is installed, else asyncio's) owns the
    listening socket and every connection.  Relayed messages are opened, checked
    and re-sealed on the loop thread: that is the hot path, and it takes no lock
    shared by all sessions.  Everything slow runs on ``workers`` threads: the
    handshake's key agreement and signature, logins (bcrypt has its own pool,
    auth.py), and every database call, so a login burst never stalls the relay.
    A session's input is handled in order: while a worker has it, what arrives
    next waits in its inbox (bounded; past that the socket is not read).

    The constructor loads keys and opens the database but does not listen;
    ``start()`` binds (port 0 picks a free port) and starts the loop thread,
    ``serve_forever()`` accepts until ``shutdown()``, which stops everything and
    closes the database.
    """

    def __init__(
        self,
        config: ServerConfig,
        announce: Callable[[str], None] = lambda _line: None,
        storage: Storage | None = None,
    ) -> None:
        self.config = config
        self.announce = announce
        data_dir = Path(config.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ticket_key = None
        if config.identity_key_file is not None:  # one identity for every node of a cluster
            self.identity = cu.load_identity(Path(config.identity_key_file))
            ticket_key = cu.hkdf(
                self.identity.private_bytes_raw(),
                salt=None,
                info=cu.label("ticket key from the identity"),
                length=32,
            )
        else:
            self.identity = cu.load_or_create_identity(data_dir / IDENTITY_FILE)
        self.fingerprint = cu.fingerprint(self.identity.public_key())
        self.storage = storage or open_storage(config.database_url)
        if config.cluster_url and self.storage.backend.lower().startswith("sqlite"):
            self.storage.close()
            raise ConfigError(
                "--cluster needs a database every node shares: use --db mysql://... "
                "(SQLite is one file on one machine)."
            )
        self.service = ChatService(self.storage, config, announce, ticket_key=ticket_key)
        self.router = self.service.router  # mutated in place (override), never replaced
        self.rate_limiter = SourceRateLimiter(
            config.connections_per_source_per_s, config.connection_burst_per_source
        )
        self.puzzle = PuzzleGate(
            config.puzzle_mode,
            base_difficulty=config.puzzle_bits,
            load_threshold=config.puzzle_load_threshold,
            load=self.service.registry.unauthenticated_total,
        )
        self.loop = new_event_loop()
        self.loop_thread_id: int | None = None
        self.pool = ThreadPoolExecutor(max_workers=config.worker_threads, thread_name_prefix="worker")
        # Password work (a thread waits for bcrypt, about 240 ms at cost 12) has threads of its own:
        # a burst of logins must not queue the KDC, opens or resumes behind it.
        self.password_pool = ThreadPoolExecutor(
            max_workers=config.worker_threads, thread_name_prefix="password"
        )
        self.modexp = diffiehellman.ModexpOffload()
        self._aserver: asyncio.AbstractServer | None = None
        self._listener: socket.socket | None = None
        self._loop_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self.moderation = ModerationPoller(
            self.storage,
            self.service.address_bans,
            kick=self.service.kick,
            kick_banned_sources=self.service.kick_banned_sources,
            audit_retention_s=config.audit_retention_days * 86400,
        )
        self.metrics_endpoint: MetricsEndpoint | None = None

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> tuple[str, int]:
        listener = socket.create_server(
            (self.config.host, self.config.port), backlog=1024, reuse_port=self.config.reuse_port
        )
        listener.setblocking(False)
        self._listener = listener
        self._loop_thread = threading.Thread(target=self._run_loop, name="loop", daemon=True)
        self._loop_thread.start()
        self._aserver = asyncio.run_coroutine_threadsafe(
            self.loop.create_server(lambda: Link(self), sock=listener, start_serving=False), self.loop
        ).result()
        host, port = self.server_address
        if not self.config.node_name:
            self.service.node = f"{socket.gethostname()}:{port}"[:64]
        try:
            self.storage.clear_sessions(self.service.node)  # rows a crashed run of this node left
        except DatabaseError as exc:
            log.warning("cannot clear old session rows: %s", exc)
        self.service.attach(self.loop, self.loop_thread_id, self.pool)
        diffiehellman.offload_modexp(self.modexp)  # finite-field groups: pow() off the GIL
        _MODEXP.owner = self.modexp
        self.moderation.start()
        if self.config.metrics_port is not None:
            self._start_metrics()
        return host, port

    def _run_loop(self) -> None:
        self.loop_thread_id = threading.get_ident()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self._stopped.set()

    def _start_metrics(self) -> None:
        registry, auth = self.service.registry, self.service.auth
        self.service.metrics.watch(
            open_connections=lambda: len(registry.all_sessions()),
            online_users=lambda: len(registry.online_users()),
            outbox_bytes=lambda: sum(s.link.buffered for s in registry.all_sessions() if s.link is not None),
            bcrypt_queue=auth.bcrypt_queue_depth,
            puzzle_difficulty=self.puzzle.difficulty,
        )
        self.metrics_endpoint = MetricsEndpoint(
            self.service.metrics, self.health, self.config.metrics_port or 0
        )
        self.metrics_endpoint.start()

    def health(self) -> str | None:
        """None when healthy (accepting, database answering), else the reason: the /healthz answer."""
        if self._stopping.is_set() or self._listener is None:
            return "shutting down"
        try:
            self.storage.count_users()
        except DatabaseError:
            return "database"
        return self.service.cluster.health()

    @property
    def server_address(self) -> tuple[str, int]:
        assert self._listener is not None, "call start() first"
        host, port = self._listener.getsockname()[:2]
        return host, port

    def serve_forever(self) -> None:
        """Accept connections until ``shutdown()`` (from another thread or a signal handler)."""
        assert self._aserver is not None, "call start() first"
        if not self._stopping.is_set():
            asyncio.run_coroutine_threadsafe(self._aserver.start_serving(), self.loop).result()
        while not self._stopping.wait(0.5):  # a timed wait: signals reach the main thread
            pass
        self._stopped.wait()

    def shutdown(self, reason: str = "The server is shutting down.") -> None:
        if self._stopping.is_set() and self._stopped.is_set():
            return
        self._stopping.set()
        self.moderation.stop()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
        if self._loop_thread is not None and self.loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._close_all(reason), self.loop).result(timeout=10)
            except Exception:
                log.exception("error while closing connections")
            self.service.cluster_stop()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._loop_thread.join(timeout=10)
        self._stopped.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.password_pool.shutdown(wait=True, cancel_futures=True)
        try:  # what the cancelled bookkeeping would have removed: nobody is connected here any more
            self.storage.clear_sessions(self.service.node)
        except DatabaseError as exc:
            log.warning("cannot clear session rows: %s", exc)
        if _MODEXP.owner is self.modexp:  # ours to take back
            diffiehellman.offload_modexp(None)
            _MODEXP.owner = None
        self.modexp.shutdown()
        if not self.loop.is_running():
            self.loop.close()
        self.storage.close()

    async def _close_all(self, reason: str) -> None:
        if self._aserver is not None:
            self._aserver.close()
        sessions = self.service.registry.all_sessions()
        for session in sessions:
            session.close(reason)
        deadline = time.monotonic() + LINGER_S + 0.5
        links = [link for link in map(link_of, sessions) if link is not None]
        while time.monotonic() < deadline and any(
            link.transport is not None
            and not link.transport.is_closing()
            and link.transport.get_write_buffer_size()
            for link in links
        ):
            await asyncio.sleep(0.02)  # the farewells drain (bounded)
        for link in links:
            if link.transport is not None:
                link.transport.close()

    # -- connections (loop thread) ----------------------------------------------------------
    def admit(self, link: Link, source: str) -> Session | None:
        """Rate and connection limits, checked at accept: refused junk costs no work."""
        refusal = None
        if self._stopping.is_set():
            refusal = "shutting down"
        elif not self.rate_limiter.allow(source):
            refusal = "too many new connections from this address"
        proto = P.ServerProtocol(
            self.identity,
            suite=self.config.cipher,
            allowed_groups=self.config.allowed_groups,
            tdes_backend=self.config.tdes_backend,
            puzzle=self.puzzle,
            source=source,
        )
        session = Session(proto, link, source)
        if refusal is None:
            refusal = self.service.registry.add_connection(
                session,
                self.config.max_connections,
                self.config.max_unauthenticated,
                self.config.max_unauthenticated_per_source,
            )
        if refusal is None:
            self.service.metrics.connections.inc()
            self.loop.call_later(self.config.login_grace_s, self._login_deadline, session)
            return session
        self.service.metrics.connections_refused.inc()
        log.warning("refused a connection from %s: %s", source, refusal)
        assert link.transport is not None
        link.transport.write(P.encode_frame(P.HandshakeError(code=P.HandshakeErrorCode.BUSY).encode()))
        link.transport.close()
        return None

    def _login_deadline(self, session: Session) -> None:
        if session.username is None and not session.closed.is_set():
            log.info("closed %s: no login within %.0f s", session.source, self.config.login_grace_s)
            session.closed.set()
            link = link_of(session)
            if link is not None:
                link.abort_now()

    def feed(self, session: Session, data: bytes) -> None:
        if session.inbox or session.busy or not session.proto.established:
            session.inbox.append(data)
            session.inbox_bytes += len(data)
            self.pump(session)
            return
        # The common case, without the inbox: an idle, established session sent relays.
        events = self._open_records(session, data)
        if not events:
            return
        for i, event in enumerate(events):
            if session.closed.is_set():
                return
            if not self.router.runs_on_loop(session, event):  # the table: router.py
                session.inbox.extend(events[i:])  # the rest in order, behind the slow one
                self.pump(session)
                return
            self._handle(session, event)

    def pump(self, session: Session) -> None:
        """Handle what waits in the session's inbox, in order: fast work here, slow work on a worker."""
        inbox = session.inbox
        while inbox and not session.busy:
            if session.closed.is_set():
                inbox.clear()
                return
            item = inbox.popleft()
            if isinstance(item, bytes):
                session.inbox_bytes -= len(item)
                if not session.proto.established:  # the handshake's DH and signature: a worker's job
                    self._to_worker(session, self._work_handshake, item)
                    break
                events = self._open_records(session, item)
                if events is None:
                    return
                inbox.extendleft(reversed(events))
            elif self.router.runs_on_loop(session, item):
                self._handle(session, item)
            elif isinstance(item, P.Message):
                self._to_worker(session, self._work_message, item)
        link = link_of(session)
        if link is not None and link.transport is not None:
            if link.peer_eof and not inbox and not session.busy:
                link.close_gracefully()  # all the peer sent is answered
            elif len(inbox) > MAX_INBOX_ITEMS or session.inbox_bytes > MAX_INBOX_BYTES:
                link.transport.pause_reading()
            elif (
                len(inbox) < INBOX_RESUME_ITEMS
                and session.inbox_bytes <= MAX_INBOX_BYTES
                and not link.transport.is_closing()
            ):
                link.transport.resume_reading()

    def _open_records(self, session: Session, data: bytes) -> list | None:
        """The messages in ``data`` (an established session's records), or None after a protocol error."""
        try:
            return session.receive(data)[0]
        except ProtocolError as exc:
            self._protocol_failed(session, exc)
            return None

    def _handle(self, session: Session, msg: P.Message) -> None:
        try:
            self.service.handle(session, msg)
        except Exception:
            log.exception("unexpected error on a connection from %s", session.source)
            session.close()

    def _to_worker(self, session: Session, job, item) -> None:
        session.busy = True
        try:
            pool = self.password_pool if self.router.is_password_work(item) else self.pool
            pool.submit(self._run_job, session, job, item)
        except RuntimeError:  # the pool is shut down: the server is stopping
            session.busy = False

    def _run_job(self, session: Session, job, item) -> None:
        events: list = []
        try:
            events = job(session, item) or []
        except Exception:
            log.exception("unexpected error on a connection from %s", session.source)
            session.close()
        try:
            self.loop.call_soon_threadsafe(self._job_done, session, events)
        except RuntimeError:
            pass

    def _job_done(self, session: Session, events: list) -> None:
        session.busy = False
        session.inbox.extendleft(reversed(events))
        self.pump(session)

    # -- worker threads ------------------------------------------------------------------------
    def _work_handshake(self, session: Session, data: bytes) -> list:
        try:
            events, handshake_bytes = session.receive(data)
        except ProtocolError as exc:
            self._protocol_failed(session, exc)
            return []
        session.write_raw(handshake_bytes)
        return [e for e in events if isinstance(e, P.Message)]

    def _work_message(self, session: Session, msg: P.Message) -> None:
        self.service.handle(session, msg)

    def _protocol_failed(self, session: Session, exc: ProtocolError) -> None:
        """A sealed Goodbye with the reason (or the plaintext HandshakeError), then close."""
        log.info("closed %s: %s", session.source, exc)
        session.say_farewell(str(exc))
        session.closed.set()
        if session.link is not None:
            session.link.close_soon()

    def lost(self, session: Session) -> None:
        """The session is over: others see the user gone at once (bookkeeping on a worker).  Once."""
        session.closed.set()
        session.inbox.clear()
        session.inbox_bytes = 0
        if not session.gone:
            session.gone = True
            self.service.disconnected(session)


class _ModexpSlot:
    """Which server's offload is installed in diffiehellman (only Server.start installs one)."""

    owner: diffiehellman.ModexpOffload | None = None


_MODEXP = _ModexpSlot()


def link_of(session: Session) -> Link | None:
    """A session's connection as the Link the server gave it (Session sees only a SessionLink)."""
    return cast("Link | None", session.link)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop where it is installed (Linux, macOS), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
