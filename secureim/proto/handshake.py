"""The handshake and session state machines: a transition table, one class per role."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NoReturn

import crypto_utils as cu
from diffiehellman import (
    DEFAULT_GROUP,
    GROUPS,
    POST_QUANTUM_GROUPS,
    DiffieHellman,
    get_group,
    share_length,
)
from secureim.errors import (
    DHError,
    HandshakeFailed,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    ServerKeyMismatch,
    UnexpectedMessage,
    UnsupportedGroup,
)
from secureim.proto.codec import Message, decode_message
from secureim.proto.limits import MAX_OFFERED_GROUPS, MAX_REASON_BYTES, NONCE_BYTES, PROTOCOL_VERSION
from secureim.proto.messages import (
    AccountDeleted,
    Ack,
    AuthFailed,
    AuthOk,
    ChangePassword,
    ClientFinished,
    ClientHello,
    ConversationKey,
    Defer,
    DeleteAccount,
    Deliver,
    DirectAsked,
    DirectOffer,
    DirectRequest,
    DirectUnavailable,
    Error,
    Goodbye,
    GroupRetry,
    HandshakeError,
    HandshakeErrorCode,
    KeyUpdate,
    Login,
    OfflineKey,
    OfflineOpen,
    OpenConversation,
    PasswordChanged,
    PasswordChangeFailed,
    PeerStatus,
    PrekeyStatus,
    PublishPrekeys,
    Puzzle,
    Register,
    RegisterEndpoint,
    Relay,
    Resume,
    RoomChange,
    RoomChanged,
    RoomCreate,
    RoomMessage,
    RoomResult,
    RoomSend,
    RoomSendResult,
    ServerAuth,
    ServerHello,
    Store,
    StoredMessage,
    StoreResult,
    WhoRequest,
    WhoResponse,
)
from secureim.proto.puzzle import PuzzleChecker
from secureim.proto.puzzle import solve as puzzle_solve
from secureim.proto.records import FrameDecoder, TrafficKeys, encode_frame


# =============================================================================
# Handshake and session state machines
# =============================================================================
class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"
    # Members are singletons: hash by identity, in C (Enum's own __hash__ is Python code, and
    # the state tables look up (role, state) pairs for every frame).
    __hash__ = object.__hash__


class State(enum.Enum):
    __hash__ = object.__hash__  # as Role: the state tables are read for every frame
    START = "start"
    AWAITING_SERVER_HELLO = "awaiting server hello"
    AWAITING_SERVER_AUTH = "awaiting server auth"
    AWAITING_CLIENT_HELLO = "awaiting client hello"
    AWAITING_CLIENT_FINISHED = "awaiting client finished"
    ESTABLISHED = "established (not logged in)"
    AUTHENTICATED = "authenticated"
    CLOSED = "closed"


@dataclass(frozen=True)
class HandshakeComplete:
    """Event: keys are established and the server proved its identity key."""

    server_key: bytes
    fingerprint: str
    suite: str
    group: str


SIGNATURE_CONTEXT = b"secureim/v1 server handshake signature\x00"

# Messages the *peer* may send us, per state.  A pair missing here closes the connection.
_SESSION_FROM_CLIENT_UNAUTH = {Register, Login, Resume, Goodbye}
_SESSION_FROM_CLIENT_AUTH = {OpenConversation, Relay, WhoRequest, RegisterEndpoint, DirectRequest, Goodbye}
_SESSION_FROM_SERVER_UNAUTH = {AuthOk, AuthFailed, Error, Goodbye}
_SESSION_FROM_SERVER_AUTH = {
    PeerStatus,
    ConversationKey,
    Deliver,
    WhoResponse,
    DirectOffer,
    DirectUnavailable,
    Error,
    Goodbye,
}
# Account self-service (section 14.1).
_SESSION_FROM_CLIENT_AUTH |= {DeleteAccount}
_SESSION_FROM_SERVER_AUTH |= {AccountDeleted}
# Store and forward (section 15).
_SESSION_FROM_CLIENT_AUTH |= {PublishPrekeys, OfflineOpen, Store, Ack, Defer}
_SESSION_FROM_SERVER_AUTH |= {PrekeyStatus, OfflineKey, StoreResult, StoredMessage}
# Group rooms (section 16).
_SESSION_FROM_CLIENT_AUTH |= {RoomCreate, RoomChange, RoomSend}
_SESSION_FROM_SERVER_AUTH |= {RoomResult, RoomSendResult, RoomMessage, RoomChanged}

RECEIVE_TABLE: dict[tuple[Role, State], frozenset] = {
    (Role.SERVER, State.AWAITING_CLIENT_HELLO): frozenset({ClientHello}),
    (Role.SERVER, State.AWAITING_CLIENT_FINISHED): frozenset({ClientFinished}),
    (Role.SERVER, State.ESTABLISHED): frozenset(_SESSION_FROM_CLIENT_UNAUTH),
    (Role.SERVER, State.AUTHENTICATED): frozenset(_SESSION_FROM_CLIENT_AUTH),
    (Role.CLIENT, State.AWAITING_SERVER_HELLO): frozenset({ServerHello, HandshakeError, Puzzle, GroupRetry}),
    (Role.CLIENT, State.AWAITING_SERVER_AUTH): frozenset({ServerAuth}),
    (Role.CLIENT, State.ESTABLISHED): frozenset(_SESSION_FROM_SERVER_UNAUTH),
    (Role.CLIENT, State.AUTHENTICATED): frozenset(_SESSION_FROM_SERVER_AUTH),
}
# Section 13: password change (message types 0x60-0x67), for logged-in clients only.
_SESSION_FROM_CLIENT_AUTH |= {ChangePassword}
_SESSION_FROM_SERVER_AUTH |= {PasswordChanged, PasswordChangeFailed, DirectAsked}
RECEIVE_TABLE[(Role.SERVER, State.AUTHENTICATED)] = frozenset(_SESSION_FROM_CLIENT_AUTH)
RECEIVE_TABLE[(Role.CLIENT, State.AUTHENTICATED)] = frozenset(_SESSION_FROM_SERVER_AUTH)
# What we may send, per state (after the handshake; handshake messages are internal).
SEND_TABLE: dict[tuple[Role, State], frozenset] = {
    (Role.CLIENT, State.ESTABLISHED): frozenset(_SESSION_FROM_CLIENT_UNAUTH),
    (Role.CLIENT, State.AUTHENTICATED): frozenset(_SESSION_FROM_CLIENT_AUTH),
    (Role.SERVER, State.ESTABLISHED): frozenset(_SESSION_FROM_SERVER_UNAUTH),
    (Role.SERVER, State.AUTHENTICATED): frozenset(_SESSION_FROM_SERVER_AUTH),
}


@dataclass
class _KeySchedule:
    c2s: bytes
    s2c: bytes
    server_confirm: bytes
    client_confirm: bytes
    direct_ticket: bytes


def derive_handshake_keys(shared_secret: bytes, transcript_hash: bytes) -> _KeySchedule:
    """HKDF over the DH secret, salted with the transcript hash (docs/PROTOCOL.md, key schedule)."""
    hs = cu.hkdf(shared_secret, salt=transcript_hash, info=cu.label("handshake secret"), length=32)

    def expand(purpose: str) -> bytes:
        return cu.hkdf(hs, salt=None, info=cu.label(purpose), length=32)

    return _KeySchedule(
        c2s=expand("c2s traffic"),
        s2c=expand("s2c traffic"),
        server_confirm=expand("server finished"),
        client_confirm=expand("client finished"),
        direct_ticket=expand("direct ticket"),
    )


class Connection:
    """Common machinery: frame decoding, the state table, the record layer."""

    role: Role

    def __init__(self, *, update_after_bytes: int | None = None) -> None:
        self._frames = FrameDecoder()
        self._outgoing = bytearray()
        self._send_keys: TrafficKeys | None = None
        self._recv_keys: TrafficKeys | None = None
        self._update_after_bytes = update_after_bytes
        self.suite: cu.Suite | None = None
        self.close_reason: str | None = None
        self._transcript = bytearray()
        # Shared by this client and the server only: seals direct-mode tickets for this client.
        self.direct_ticket_key: bytes | None = None

    state: State

    # -- public API --------------------------------------------------------
    def receive_data(self, data: bytes) -> list:
        """Feed bytes from the peer; return the events they complete.

        Raises :class:`ProtocolError` (and moves to CLOSED) on anything the
        protocol does not allow; nothing else escapes for any input.
        """
        if self.state is State.CLOSED:
            raise LocalProtocolError("The connection is closed.")
        events: list = []
        try:
            self._frames.feed(data)
            while self.state is not State.CLOSED:
                body = self._frames.next_frame()
                if body is None:
                    break
                event = self._receive_frame(body)
                if event is not None:
                    events.append(event)
        except ProtocolError as exc:
            self._fail(exc)
            raise
        except DHError as exc:
            self._fail(exc)
            raise RemoteProtocolError(str(exc)) from exc
        return events

    def data_to_send(self) -> bytes:
        """Handshake bytes produced by the state machine, to write to the peer."""
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def send(self, msg: Message) -> bytes:
        """Seal one application message into a frame; returns the bytes to write."""
        allowed = SEND_TABLE.get((self.role, self.state), frozenset())
        if type(msg) not in allowed:
            raise LocalProtocolError(f"Cannot send {type(msg).__name__} in state {self.state.value}.")
        assert self._send_keys is not None
        out = bytearray()
        if self._send_keys.needs_update:
            out += encode_frame(self._send_keys.seal(KeyUpdate().encode()))
            self._send_keys.update()
        out += encode_frame(self._send_keys.seal(msg.encode()))
        self._after_send(msg)
        return bytes(out)

    def farewell(self, reason: str) -> bytes:
        """After a failure: a sealed Goodbye telling the peer why, if keys exist (else b"")."""
        if self._send_keys is None:
            return b""
        try:
            return encode_frame(
                self._send_keys.seal(Goodbye(reason=reason[: MAX_REASON_BYTES // 4]).encode())
            )
        except ProtocolError:
            return b""

    def close(self, reason: str = "closed") -> None:
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            self.close_reason = reason

    @property
    def established(self) -> bool:
        return self.state in (State.ESTABLISHED, State.AUTHENTICATED)

    # -- internals -------------------------------------------------------------
    def _fail(self, exc: Exception) -> None:
        self.close(str(exc))

    def _after_send(self, msg: Message) -> None:
        if isinstance(msg, Goodbye):
            self.close("closed by us")

    def _after_receive(self, msg: Message) -> None:
        if isinstance(msg, Goodbye):
            self.close(f"closed by peer: {msg.reason}")

    def _receive_frame(self, body: bytes):
        if self.established:
            assert self._recv_keys is not None
            plaintext = self._recv_keys.open(body)
            msg = decode_message(plaintext)
            if isinstance(msg, KeyUpdate):
                self._recv_keys.update()
                return None
        else:
            msg = decode_message(body)
        allowed = RECEIVE_TABLE.get((self.role, self.state), frozenset())
        if type(msg) not in allowed:
            raise UnexpectedMessage(f"Unexpected {type(msg).__name__} in state {self.state.value}.")
        if not self.established:
            return self._handshake(msg, body)
        self._after_receive(msg)
        return msg

    def _emit_plain(self, msg: Message) -> bytes:
        body = msg.encode()
        self._outgoing += encode_frame(body)
        return body

    def _install_keys(self, suite: cu.Suite, send_secret: bytes, recv_secret: bytes) -> None:
        limit = self._update_after_bytes or suite.max_bytes_per_key // 2
        self._send_keys = TrafficKeys(suite, send_secret, limit)
        self._recv_keys = TrafficKeys(suite, recv_secret, limit)

    def _handshake(self, msg: Message, body: bytes):  # pragma: no cover - overridden
        raise NotImplementedError


class ClientProtocol(Connection):
    """The client's side: propose a group, check the server's signature and confirmation."""

    role = Role.CLIENT

    def __init__(
        self,
        *,
        group: str = DEFAULT_GROUP,
        suites: tuple[str, ...] = cu.SUITE_NAMES,
        expected_server_key: bytes | None = None,
        tdes_backend: str | None = None,
        update_after_bytes: int | None = None,
        fallback_groups: tuple[str, ...] | None = None,
    ) -> None:
        """``fallback_groups``: groups the server may ask for instead (GroupRetry).  By
        default a post-quantum group falls back to x25519 and a classical one to none."""
        super().__init__(update_after_bytes=update_after_bytes)
        self.state = State.START
        self._dh = DiffieHellman(group)
        if fallback_groups is None:
            fallback_groups = ("x25519",) if group in POST_QUANTUM_GROUPS else ()
        self._groups = tuple(
            dict.fromkeys((self._dh.group.name, *(get_group(g).name for g in fallback_groups)))
        )
        if len(self._groups) > MAX_OFFERED_GROUPS:
            raise LocalProtocolError(f"At most {MAX_OFFERED_GROUPS} groups can be offered.")
        self._group_retried = False
        self._suites = tuple(cu.get_suite(s, tdes_backend=tdes_backend) for s in suites)
        self._expected_server_key = expected_server_key
        self._server_hello: ServerHello | None = None
        self._keys: _KeySchedule | None = None
        self._puzzle_solved = False

    def initiate(self) -> bytes:
        """Start the handshake: returns the ClientHello frame."""
        if self.state is not State.START:
            raise LocalProtocolError("The handshake has already started.")
        self._send_hello()
        self.state = State.AWAITING_SERVER_HELLO
        return self.data_to_send()

    def _send_hello(self, challenge: bytes = b"", solution: bytes = b"") -> None:
        hello = ClientHello(
            version=PROTOCOL_VERSION,
            group=self._dh.group.name,
            public=self._dh.public_bytes,
            nonce=cu.random_bytes(NONCE_BYTES),
            suites=bytes(s.suite_id for s in self._suites),
            puzzle_challenge=challenge,
            puzzle_solution=solution,
            groups=self._groups,
        )
        self._transcript = bytearray(self._emit_plain(hello))  # only the final hello is in the transcript

    def _handshake(self, msg: Message, body: bytes):
        if isinstance(msg, GroupRetry):
            if self._group_retried or self._puzzle_solved:
                raise HandshakeFailed("The server asked for another group twice (or after a puzzle).")
            if msg.group not in self._groups or msg.group == self._dh.group.name:
                raise HandshakeFailed("The server asked for a group this client did not offer.")
            self._group_retried = True
            self._dh = DiffieHellman(msg.group)
            self._send_hello()
            return None
        if isinstance(msg, Puzzle):
            if self._puzzle_solved:
                raise HandshakeFailed("The server sent a second puzzle.")
            try:
                solution = puzzle_solve(msg.challenge, self._dh.public_bytes, msg.difficulty)
            except ValueError as exc:
                raise HandshakeFailed(str(exc)) from None
            self._puzzle_solved = True
            self._send_hello(msg.challenge, solution)
            return None
        if isinstance(msg, HandshakeError):
            try:
                code = HandshakeErrorCode(msg.code).name.lower().replace("_", " ")
            except ValueError:
                code = "unknown reason"
            raise HandshakeFailed(f"The server refused the handshake ({code}).")
        if isinstance(msg, ServerHello):
            if msg.version != PROTOCOL_VERSION:
                raise HandshakeFailed("The server speaks another protocol version.")
            suite = next((s for s in self._suites if s.suite_id == msg.suite), None)
            if suite is None:
                raise HandshakeFailed("The server chose a cipher suite this client did not offer.")
            self.suite = suite
            self._server_hello = msg
            self._transcript += body
            shared = self._dh.generate_shared_secret(msg.public)
            self._keys = derive_handshake_keys(shared, cu.sha256(bytes(self._transcript)))
            self.state = State.AWAITING_SERVER_AUTH
            return None
        assert isinstance(msg, ServerAuth) and self._server_hello and self._keys and self.suite
        th1 = cu.sha256(bytes(self._transcript))
        server_key = self._server_hello.server_key
        if not cu.verify_signature(server_key, msg.signature, SIGNATURE_CONTEXT + th1):
            raise HandshakeFailed("The server's handshake signature is invalid.")
        if not DiffieHellman.verify_hashed_key(self._keys.server_confirm, msg.confirm, th1):
            raise HandshakeFailed("The server's key confirmation is invalid.")
        if self._expected_server_key is not None and not cu.constant_time_equal(
            server_key, self._expected_server_key
        ):
            raise ServerKeyMismatch(
                f"The server's identity key {cu.fingerprint(server_key)} is not the expected "
                f"{cu.fingerprint(self._expected_server_key)}."
            )
        self._transcript += body
        th2 = cu.sha256(bytes(self._transcript))
        self._emit_plain(ClientFinished(confirm=DiffieHellman.hash_key(self._keys.client_confirm, th2)))
        self._install_keys(self.suite, self._keys.c2s, self._keys.s2c)
        self.direct_ticket_key = self._keys.direct_ticket
        self._keys = None
        self.state = State.ESTABLISHED
        return HandshakeComplete(
            server_key=server_key,
            fingerprint=cu.fingerprint(server_key),
            suite=self.suite.name,
            group=self._dh.group.name,
        )

    def _after_receive(self, msg: Message) -> None:
        super()._after_receive(msg)
        if isinstance(msg, AuthOk):
            self.state = State.AUTHENTICATED


class ServerProtocol(Connection):
    """The server's side: answer the group, sign the transcript, check the client's confirmation."""

    role = Role.SERVER

    def __init__(
        self,
        identity: cu.IdentityKey,
        *,
        suite: str = cu.DEFAULT_SUITE,
        allowed_groups: frozenset[str] | None = None,
        tdes_backend: str | None = None,
        update_after_bytes: int | None = None,
        puzzle: PuzzleChecker | None = None,
        source: str = "",
    ) -> None:
        super().__init__(update_after_bytes=update_after_bytes)
        self.state = State.AWAITING_CLIENT_HELLO
        self._puzzle = puzzle
        self._source = source
        self._puzzles_sent = 0
        self._group_retries = 0
        self._identity = identity
        self._suite = cu.get_suite(suite, tdes_backend=tdes_backend)
        self._allowed_groups = allowed_groups
        self._keys: _KeySchedule | None = None
        self.group: str | None = None

    def _refuse(self, code: HandshakeErrorCode, why: str) -> NoReturn:
        self._emit_plain(HandshakeError(code=code))
        raise RemoteProtocolError(why)

    def _handshake(self, msg: Message, body: bytes):
        if isinstance(msg, ClientHello):
            if msg.version != PROTOCOL_VERSION:
                self._refuse(HandshakeErrorCode.UNSUPPORTED_VERSION, "Unsupported protocol version.")
            if self._suite.suite_id not in msg.suites:
                self._refuse(
                    HandshakeErrorCode.UNSUPPORTED_SUITE,
                    f"The client does not offer the {self._suite.name} suite.",
                )
            group = self._choose_group(msg)
            if group is None:
                return None  # a GroupRetry was sent; the client answers with a new ClientHello
            if len(msg.public) != share_length(group):  # sizes first, before any puzzle or DH work
                self._refuse(
                    HandshakeErrorCode.BAD_PUBLIC_VALUE,
                    f"A {group.name} public value is exactly {share_length(group)} bytes.",
                )
            if self._puzzle is not None and not self._puzzle_passed(msg):
                return None  # a Puzzle was sent; the client answers with a new ClientHello
            try:
                public, shared = DiffieHellman.respond(group, msg.public)
            except DHError as exc:
                self._refuse(HandshakeErrorCode.BAD_PUBLIC_VALUE, str(exc))
            self.group = group.name
            self.suite = self._suite
            self._transcript += body
            hello = ServerHello(
                version=PROTOCOL_VERSION,
                suite=self._suite.suite_id,
                public=public,
                nonce=cu.random_bytes(NONCE_BYTES),
                server_key=cu.public_bytes(self._identity),
            )
            self._transcript += self._emit_plain(hello)
            th1 = cu.sha256(bytes(self._transcript))
            self._keys = derive_handshake_keys(shared, th1)
            auth = ServerAuth(
                signature=self._identity.sign(SIGNATURE_CONTEXT + th1),
                confirm=DiffieHellman.hash_key(self._keys.server_confirm, th1),
            )
            self._transcript += self._emit_plain(auth)
            self.state = State.AWAITING_CLIENT_FINISHED
            return None
        assert isinstance(msg, ClientFinished) and self._keys
        th2 = cu.sha256(bytes(self._transcript))
        if not DiffieHellman.verify_hashed_key(self._keys.client_confirm, msg.confirm, th2):
            raise RemoteProtocolError("The client's key confirmation is invalid.")
        self._install_keys(self._suite, self._keys.s2c, self._keys.c2s)
        self.direct_ticket_key = self._keys.direct_ticket
        self._keys = None
        self.state = State.ESTABLISHED
        key = cu.public_bytes(self._identity)
        return HandshakeComplete(
            server_key=key, fingerprint=cu.fingerprint(key), suite=self._suite.name, group=self.group or ""
        )

    def _allows(self, name: str) -> bool:
        return (
            name in GROUPS
            and (self._allowed_groups is None or name in self._allowed_groups)
            and (name not in POST_QUANTUM_GROUPS or cu.mlkem_available())
        )

    def _choose_group(self, msg: ClientHello):
        """The group to use, or None after sending a GroupRetry; refuses a downgrade.

        The server takes the first group in the client's signed list that it allows.
        A client whose share is in a later (weaker) group than that was pushed there
        by someone forging a GroupRetry or HandshakeError: refused (TLS 1.3 section
        4.1.3 protects the same choice with the signed transcript).
        """
        offered = msg.groups or (msg.group,)
        if msg.group not in offered:
            self._refuse(
                HandshakeErrorCode.PROTOCOL, "The client's key share is for a group it did not offer."
            )
        best = next((name for name in offered if self._allows(name)), None)
        if best is None:
            try:
                group = get_group(msg.group)
                raise UnsupportedGroup(f"Diffie-Hellman group {group.name!r} is disabled on this server.")
            except DHError as exc:
                self._refuse(HandshakeErrorCode.UNSUPPORTED_GROUP, str(exc))
        if msg.group == best:
            return get_group(best)
        if self._allows(msg.group):
            self._refuse(
                HandshakeErrorCode.DOWNGRADE,
                f"Downgrade refused: the client offered {best!r} but used {msg.group!r}.",
            )
        if self._group_retries:
            self._refuse(HandshakeErrorCode.UNSUPPORTED_GROUP, "The client ignored the group retry.")
        self._group_retries += 1
        self._emit_plain(GroupRetry(group=best))
        return None

    def _puzzle_passed(self, msg: ClientHello) -> bool:
        """Before any DH work: a puzzle solved, or none needed; else send one (at most once)."""
        assert self._puzzle is not None
        need = self._puzzle.difficulty()
        if need == 0 and not msg.puzzle_challenge:
            return True
        if not msg.puzzle_challenge:
            if self._puzzles_sent:
                self._refuse(HandshakeErrorCode.PUZZLE_FAILED, "The client ignored the puzzle.")
            self._puzzles_sent += 1
            self._emit_plain(Puzzle(challenge=self._puzzle.issue(self._source, need), difficulty=need))
            return False
        why = self._puzzle.check(self._source, msg.puzzle_challenge, msg.public, msg.puzzle_solution, need)
        if why is not None:
            self._refuse(HandshakeErrorCode.PUZZLE_FAILED, why)
        return True

    def _after_send(self, msg: Message) -> None:
        super()._after_send(msg)
        if isinstance(msg, AuthOk):
            self.state = State.AUTHENTICATED
