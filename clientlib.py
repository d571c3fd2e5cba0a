"""The client as a library: connect, pin the server, log in, open conversations, chat.

No terminal code here: ``client.py`` (the terminal UI), the tests and the
benchmarks all drive :class:`ChatClient`.  Two layers of encryption:

- the *session* layer (``protocol.ClientProtocol``) to the server;
- the *conversation* layer (:class:`Conversation`) end to end with the peer,
  keyed by the KDC key the server hands out.  The server relays its output as
  opaque bytes.

Incoming things arrive as typed events on a queue (``next_event()``).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import struct
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import crypto_utils as cu
import protocol as P
from errors import (
    AccountLocked,
    AuthError,
    ConfigError,
    ConnectionClosed,
    DecryptionFailed,
    InvalidCredentials,
    InvalidPassword,
    InvalidUsername,
    ProtocolError,
    SecureIMError,
    ServerKeyMismatch,
    ServiceUnavailable,
    UsernameTaken,
)

log = logging.getLogger("secureim.client")

CONNECT_TIMEOUT_S = 10.0
REPLY_TIMEOUT_S = 30.0
KNOWN_SERVERS_FILE = "known_servers"
INNER_VERSION = 1
MAX_TEXT_BYTES = 16 * 1024
EVENT_QUEUE_MAX = 10000


def default_home() -> Path:
    env = os.environ.get("SECUREIM_HOME")
    return Path(env) if env else Path.home() / ".secureim"


# =============================================================================
# Display hygiene
# =============================================================================
def sanitize(text: str, max_chars: int = 4096) -> str:
    """Neutralise control characters and terminal escapes before anything is shown.

    Every C0/C1 control (ESC included), DEL, bidi override, zero-width and other
    format character, and line/paragraph separator becomes a visible ``\\x..`` or
    ``\\u....`` escape, so nobody can move the cursor or rewrite another user's screen.
    """
    out = []
    for ch in text[:max_chars]:
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Cn"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    if len(text) > max_chars:
        out.append("…")
    return "".join(out)


# =============================================================================
# Trust in the server (TOFU, like ssh's known_hosts)
# =============================================================================
class KnownServers:
    """``<home>/known_servers``: one line per server, ``host:port base64(ed25519 key)``."""

    def __init__(self, home: Path) -> None:
        self.path = Path(home) / KNOWN_SERVERS_FILE

    def _load(self) -> dict[str, bytes]:
        entries: dict[str, bytes] = {}
        if not self.path.exists():
            return entries
        for line in self.path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and not line.startswith("#"):
                try:
                    entries[parts[0]] = cu.b64decode(parts[1])
                except SecureIMError:
                    continue
        return entries

    def lookup(self, server: str) -> bytes | None:
        return self._load().get(server)

    def remember(self, server: str, key: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as fh:
            fh.write(f"{server} {cu.b64encode(key)}\n")


def parse_fingerprint(text: str) -> str:
    if not text.startswith("SHA256:") or len(text) != 50:
        raise ConfigError("A server fingerprint looks like SHA256: followed by 43 base64 characters.")
    return text


# =============================================================================
# The conversation layer (end to end between two clients)
# =============================================================================
_INNER_HEADER = struct.Struct(">BIQ")  # version, generation, counter
_TEXT_HEADER = struct.Struct(">BQ")    # kind, sent_at (ms since the epoch)
KIND_TEXT = 1


class Conversation:
    """One peer's conversation: keys per generation, counters, seal and open.

    Each KDC key yields one key per direction (HKDF, labelled with both names),
    so the two senders never share a key.  Messages from the peer arrive in
    order (TCP through the server), so once one arrives under generation g the
    peer will never use an older one: every generation below g is discarded.
    Newer generations the peer has not used yet are kept (messages may be in
    flight across several rekeys), at most ``MAX_KEPT_GENERATIONS`` of them.
    """

    MAX_KEPT_GENERATIONS = 8

    def __init__(self, me: str, peer: str, conversation_id: int, suite: cu.Suite) -> None:
        self.me, self.peer, self.id, self.suite = me, peer, conversation_id, suite
        self._keys: dict[int, tuple] = {}
        self.generation = 0
        self._send_counter = 0
        self._recv_counter: dict[int, int] = {}

    def install_key(self, generation: int, kdc_key: bytes) -> None:
        if generation <= self.generation:
            return  # stale or repeated delivery
        send = self.suite.cipher(self._direction_key(kdc_key, self.me, self.peer))
        recv = self.suite.cipher(self._direction_key(kdc_key, self.peer, self.me))
        self._keys[generation] = (send, recv)
        while len(self._keys) > self.MAX_KEPT_GENERATIONS:
            del self._keys[min(self._keys)]
        self.generation = generation
        self._send_counter = 0

    def _direction_key(self, kdc_key: bytes, sender: str, recipient: str) -> bytes:
        material = cu.hkdf(kdc_key, salt=self.id.to_bytes(8, "big"),
                           info=cu.label(f"conversation {sender}>{recipient}"), length=self.suite.key_bytes)
        return self.suite.key_from_material(material)

    def _aad(self, sender: str, recipient: str, generation: int, counter: int) -> bytes:
        return (b"secureim/v1 message" + self.id.to_bytes(8, "big") + bytes([len(sender)]) + sender.encode()
                + bytes([len(recipient)]) + recipient.encode() + _INNER_HEADER.pack(INNER_VERSION, generation, counter))

    @property
    def ready(self) -> bool:
        return self.generation in self._keys

    def seal(self, text: str) -> bytes:
        raw = text.encode("utf-8")
        if len(raw) > MAX_TEXT_BYTES:
            raise ValueError(f"Messages are limited to {MAX_TEXT_BYTES} bytes.")
        send, _recv = self._keys[self.generation]
        self._send_counter += 1
        header = _INNER_HEADER.pack(INNER_VERSION, self.generation, self._send_counter)
        body = _TEXT_HEADER.pack(KIND_TEXT, int(time.time() * 1000)) + raw
        return header + send.seal(body, self._aad(self.me, self.peer, self.generation, self._send_counter))

    def open(self, payload: bytes) -> tuple[str, float]:
        """(text, sent_at) of a payload from the peer; DecryptionFailed on anything wrong."""
        if len(payload) < _INNER_HEADER.size:
            raise DecryptionFailed()
        version, generation, counter = _INNER_HEADER.unpack_from(payload)
        keys = self._keys.get(generation)
        if version != INNER_VERSION or keys is None:
            raise DecryptionFailed()
        if counter <= self._recv_counter.get(generation, 0):
            raise DecryptionFailed("A replayed message was discarded.")
        body = keys[1].open(payload[_INNER_HEADER.size:], self._aad(self.peer, self.me, generation, counter))
        if len(body) < _TEXT_HEADER.size:
            raise DecryptionFailed()
        kind, sent_ms = _TEXT_HEADER.unpack_from(body)
        if kind != KIND_TEXT:
            raise DecryptionFailed()
        try:
            text = body[_TEXT_HEADER.size:].decode("utf-8")
        except UnicodeDecodeError:
            raise DecryptionFailed() from None
        self._recv_counter[generation] = counter
        for old in [g for g in self._keys if g < generation]:  # the peer has moved past them
            del self._keys[old]
            self._recv_counter.pop(old, None)
        return text, sent_ms / 1000.0


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


@dataclass(frozen=True)
class MessageReceived:
    peer: str
    text: str
    sent_at: float


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


@dataclass(frozen=True)
class Disconnected:
    reason: str


_AUTH_ERRORS = {
    P.AuthCode.INVALID_CREDENTIALS: InvalidCredentials,
    P.AuthCode.USERNAME_TAKEN: UsernameTaken,
    P.AuthCode.INVALID_USERNAME: InvalidUsername,
    P.AuthCode.INVALID_PASSWORD: InvalidPassword,
    P.AuthCode.UNAVAILABLE: ServiceUnavailable,
}


# =============================================================================
# The client
# =============================================================================
class ChatClient:
    def __init__(self, host: str, port: int, *, home: Path | None = None, group: str = "x25519",
                 suites: tuple[str, ...] = cu.SUITE_NAMES, server_fingerprint: str | None = None,
                 timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self.host, self.port = host, port
        self.home = Path(home) if home is not None else default_home()
        self.known_servers = KnownServers(self.home)
        self.pinned_fingerprint = parse_fingerprint(server_fingerprint) if server_fingerprint else None
        self.timeout_s = timeout_s
        self.proto = P.ClientProtocol(group=group, suites=suites)
        self.sock: socket.socket | None = None
        self.server_fingerprint: str | None = None
        self.first_contact = False
        self.username: str | None = None
        self.events: queue.Queue = queue.Queue(maxsize=EVENT_QUEUE_MAX)
        self.conversations: dict[str, Conversation] = {}
        self._wanted: set[str] = set()
        self._pending_open: set[str] = set()
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._receiver: threading.Thread | None = None
        self._backlog: list = []
        self.closed = threading.Event()

    @property
    def server_id(self) -> str:
        return f"{self.host}:{self.port}"

    # -- connection and handshake -------------------------------------------------
    def connect(self) -> P.HandshakeComplete:
        """TCP connect, handshake, and check the server's key (pinned, known, or first use)."""
        try:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        except OSError as exc:
            reason = exc.strerror or str(exc) or exc.__class__.__name__
            raise ConnectionClosed(f"Cannot connect to {self.server_id}: {reason}.") from None
        self.sock.settimeout(REPLY_TIMEOUT_S)
        self._sendall(self.proto.initiate())
        done = None
        while done is None:
            for event in self._recv_events():
                if isinstance(event, P.HandshakeComplete):
                    done = event
        self._sendall(self.proto.data_to_send())  # ClientFinished
        self._check_server_key(done.server_key)
        self.server_fingerprint = done.fingerprint
        return done

    def _check_server_key(self, key: bytes) -> None:
        got = cu.fingerprint(key)
        if self.pinned_fingerprint is not None:
            if not cu.constant_time_equal(got.encode(), self.pinned_fingerprint.encode()):
                self.close()
                raise ServerKeyMismatch(f"The server at {self.server_id} presented {got}, "
                                        f"but {self.pinned_fingerprint} was expected.")
        known = self.known_servers.lookup(self.server_id)
        if known is None:
            self.known_servers.remember(self.server_id, key)
            self.first_contact = True
        elif not cu.constant_time_equal(known, key):
            self.close()
            raise ServerKeyMismatch(f"The server at {self.server_id} presented {got}, but this client "
                                    f"knows it as {cu.fingerprint(known)} ({self.known_servers.path}).")

    def _sendall(self, data: bytes) -> None:
        if not data:
            return
        assert self.sock is not None
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise ConnectionClosed(f"The connection to {self.server_id} was lost: {exc}.") from None

    def _recv_events(self) -> list:
        assert self.sock is not None
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise ConnectionClosed(f"The server at {self.server_id} did not answer in time.") from None
        except OSError as exc:
            raise ConnectionClosed(f"The connection to {self.server_id} was lost: {exc}.") from None
        if not data:
            reason = self.proto.close_reason
            raise ConnectionClosed(f"The server at {self.server_id} closed the connection"
                                   + (f" ({reason})." if reason else "."))
        with self._send_lock:
            return self.proto.receive_data(data)

    def _send(self, msg: P.Message) -> None:
        with self._send_lock:
            data = self.proto.send(msg)
            self._sendall(data)

    # -- accounts --------------------------------------------------------------------
    def login(self, username: str, password: str) -> P.AuthOk:
        return self._authenticate(P.Login(username=username, password=password.encode("utf-8")))

    def register(self, username: str, password: str) -> P.AuthOk:
        return self._authenticate(P.Register(username=username, password=password.encode("utf-8")))

    def _authenticate(self, msg: P.Login | P.Register) -> P.AuthOk:
        if len(msg.password) > P.MAX_PASSWORD_BYTES:
            raise InvalidPassword(f"Passwords must be at most {P.MAX_PASSWORD_BYTES} bytes.")
        if len(msg.username.encode()) > P.MAX_USERNAME_BYTES:
            raise InvalidUsername("Usernames are at most 32 characters.")
        self._send(msg)
        while True:
            for event in self._recv_events():
                if isinstance(event, P.AuthOk):
                    self.username = event.username
                    return event
                if isinstance(event, P.AuthFailed):
                    self._raise_auth_failed(event)
                if isinstance(event, P.Goodbye):
                    raise ConnectionClosed(f"The server closed the session: {sanitize(event.reason)}")

    @staticmethod
    def _raise_auth_failed(event: P.AuthFailed) -> None:
        reason = sanitize(event.reason, 512)
        if event.code == P.AuthCode.LOCKED:
            raise AccountLocked(event.retry_after_s)
        if event.code == P.AuthCode.TOO_MANY_ATTEMPTS:
            raise ConnectionClosed(f"Too many attempts; the server closed the connection. {reason}")
        raise _AUTH_ERRORS.get(event.code, AuthError)(reason)

    # -- after login ---------------------------------------------------------------
    def start(self) -> None:
        """Start the receiver thread (after a successful login)."""
        if self.username is None:
            raise AuthError("Log in first.")
        assert self.sock is not None
        self.sock.settimeout(None)
        self._receiver = threading.Thread(target=self._receive_loop, name="receiver", daemon=True)
        self._receiver.start()

    def _receive_loop(self) -> None:
        reason = "closed"
        try:
            while not self.closed.is_set():
                for event in self._recv_events():
                    self._dispatch(event)
                if self.proto.state is P.State.CLOSED:
                    reason = self.proto.close_reason or "closed"
                    break
        except ConnectionClosed as exc:
            reason = str(exc)
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
        finally:
            if not self.closed.is_set():
                self._emit(Disconnected(reason))
            self.closed.set()

    def _emit(self, event) -> None:
        try:
            self.events.put_nowait(event)
        except queue.Full:  # the UI stopped reading events; drop the oldest notice
            log.warning("event queue full; an event was dropped")

    def _dispatch(self, msg: P.Message) -> None:
        if isinstance(msg, P.PeerStatus):
            self._on_peer_status(msg)
        elif isinstance(msg, P.ConversationKey):
            self._on_key(msg)
        elif isinstance(msg, P.Deliver):
            self._on_deliver(msg)
        elif isinstance(msg, P.WhoResponse):
            self._emit(WhoList(tuple(sanitize(u, 64) for u in msg.users), msg.total))
        elif isinstance(msg, P.Error):
            self._emit(ServerNotice(sanitize(msg.reason, 512)))
        elif isinstance(msg, P.Goodbye):
            self._emit(Disconnected(f"the server closed the session: {sanitize(msg.reason, 512)}"))
            self.closed.set()

    def _on_peer_status(self, msg: P.PeerStatus) -> None:
        peer = msg.peer
        if not msg.known:
            with self._state_lock:
                self._wanted.discard(peer)
                self._pending_open.discard(peer)
            self._emit(PeerUnknown(sanitize(peer, 64)))
            return
        if not msg.online:
            with self._state_lock:
                self.conversations.pop(peer, None)  # keys discarded
                self._pending_open.discard(peer)
            self._emit(PeerOffline(peer))
            return
        with self._state_lock:
            reopen = peer in self._wanted and peer not in self._pending_open
            if reopen:  # a new session of the peer has none of our keys: start over
                self._pending_open.add(peer)
                self.conversations.pop(peer, None)
        self._emit(PeerOnline(peer))
        if reopen:  # told again automatically: open (and key) the conversation, no user action
            self._send(P.OpenConversation(peer=peer))

    def _on_key(self, msg: P.ConversationKey) -> None:
        try:
            suite = cu.suite_by_id(msg.suite)
            if len(msg.key) != suite.key_bytes or msg.peer == self.username:
                raise DecryptionFailed()
        except SecureIMError:
            self._emit(ServerNotice("The server sent an unusable conversation key; it was ignored."))
            return
        with self._state_lock:
            conv = self.conversations.get(msg.peer)
            opened_by_peer = msg.peer not in self._wanted
            if conv is None or conv.id != msg.conversation_id:
                conv = Conversation(self.username or "", msg.peer, msg.conversation_id, suite)
                self.conversations[msg.peer] = conv
                new = True
            else:
                new = False
            conv.install_key(msg.generation, msg.key)
            self._wanted.add(msg.peer)
            self._pending_open.discard(msg.peer)
        if new:
            self._emit(ConversationReady(msg.peer, msg.generation, opened_by_peer))

    def _on_deliver(self, msg: P.Deliver) -> None:
        with self._state_lock:
            conv = self.conversations.get(msg.sender)
            if conv is None or conv.id != msg.conversation_id:
                conv = None
            else:
                try:
                    text, sent_at = conv.open(msg.payload)
                except DecryptionFailed as exc:
                    text, sent_at = None, str(exc)
        if conv is None:
            self._emit(MessageRejected(sanitize(msg.sender, 64), "A message for an unknown conversation was discarded."))
        elif text is None:
            self._emit(MessageRejected(msg.sender, f"A message from {msg.sender} failed its integrity check and was "
                                                   f"discarded."))
        else:
            self._emit(MessageReceived(msg.sender, text, sent_at))

    # -- user actions ------------------------------------------------------------------
    def open_conversation(self, peer: str) -> None:
        """Ask for ``peer``: answered by PeerOnline/PeerOffline/PeerUnknown, then ConversationReady."""
        peer = peer.strip().lower()
        with self._state_lock:
            self._wanted.add(peer)
            self._pending_open.add(peer)
        self._send(P.OpenConversation(peer=peer))

    def has_conversation(self, peer: str) -> bool:
        with self._state_lock:
            conv = self.conversations.get(peer)
            return conv is not None and conv.ready

    def send_message(self, peer: str, text: str) -> None:
        """Seal ``text`` end to end for ``peer`` and hand it to the server to relay."""
        with self._state_lock:
            conv = self.conversations.get(peer)
            if conv is None or not conv.ready:
                raise ConnectionClosed(f"No open conversation with {peer}; they may be offline.")
            payload = conv.seal(text)
            cid = conv.id
        self._send(P.Relay(conversation_id=cid, payload=payload))

    def who(self) -> None:
        self._send(P.WhoRequest())

    def next_event(self, timeout: float | None = None):
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self, timeout_s: float = 5.0) -> None:
        """Say Goodbye, half-close, and wait (bounded) until the server has let go of us."""
        sock = self.sock
        if sock is None:
            self.closed.set()
            return
        self.closed.set()
        try:
            if self.proto.state in (P.State.ESTABLISHED, P.State.AUTHENTICATED):
                with self._send_lock:
                    sock.sendall(self.proto.send(P.Goodbye(reason="client quit")))
            sock.shutdown(socket.SHUT_WR)
        except (OSError, SecureIMError):
            pass
        if self._receiver is not None and self._receiver is not threading.current_thread():
            self._receiver.join(timeout=timeout_s)
        try:  # the server closes its end once it has processed our Goodbye
            sock.settimeout(timeout_s)
            while sock.recv(65536):
                pass
        except OSError:
            pass
        sock.close()
        self.sock = None
