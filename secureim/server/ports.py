"""What each part of the server needs of the others: narrow, structural seams (``typing.Protocol``).

A domain handler's constructor takes only these (plus plain values: ``ServerConfig``, the
``ServerMetrics`` counter bag, AEAD objects).  ``registry.Session`` and ``LiveConversation`` are
data, named as types.  ``runtime.Runtime`` is one object seen through several of these.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

import crypto_utils as cu
from secureim import proto as P
from secureim import storage as D

if TYPE_CHECKING:  # data classes and the cluster's interface only; no import at run time
    from secureim.server.cluster.local import Cluster
    from secureim.server.registry import LiveConversation, Session


# --- runtime: threads and the re-bindable values ----------------------------------------------
class Threads(Protocol):
    def on_loop(self, fn: Callable[..., object], *args: object) -> None: ...  # inline if detached/on loop
    def run_slow(self, fn: Callable[..., object], *args: object) -> None: ...  # inline if no pool
    def on_loop_thread(self) -> bool: ...  # a loop is attached AND this is its thread
    def call_later(self, delay_s: float, fn: Callable[..., object], *args: object) -> None: ...


class ClusterSlot(Protocol):
    @property
    def cluster(self) -> Cluster: ...


class SuiteSlot(Protocol):
    @property
    def suite(self) -> cu.Suite: ...


class NodeName(Protocol):
    @property
    def node(self) -> str: ...


class PresenceRuntime(Threads, ClusterSlot, NodeName, Protocol): ...


class KdcRuntime(Threads, ClusterSlot, SuiteSlot, Protocol): ...


class AccountRuntime(ClusterSlot, NodeName, Protocol): ...


# --- the registry, per reader ------------------------------------------------------------------
class SessionLookup(Protocol):
    def session_of(self, username: str) -> Session | None: ...


class OnlineTable(Protocol):
    """Loop-thread hot paths read the dict without the lock (an atomic get)."""

    @property
    def online(self) -> Mapping[str, Session]: ...


class LoginTable(Protocol):
    def login(self, session: Session, username: str) -> tuple[Session | None, set[str]]: ...
    def online_count(self) -> int: ...


class PresenceTable(SessionLookup, Protocol):
    def remove(self, session: Session) -> tuple[bool, list[str]]: ...
    def keyed(self, cid: int, members: tuple[str, str], generation: int) -> None: ...
    def online_users(self) -> list[str]: ...
    def online_count(self) -> int: ...


class ConversationTable(SessionLookup, OnlineTable, Protocol):
    @property
    def conversations(self) -> Mapping[int, LiveConversation]: ...
    def keyed(self, cid: int, members: tuple[str, str], generation: int) -> None: ...
    def watch_unless_online(self, watcher: str, target: str) -> Session | None: ...


class DirectTable(SessionLookup, Protocol):
    def conversation_between(self, first: str, second: str) -> LiveConversation | None: ...


class SessionList(SessionLookup, Protocol):
    def all_sessions(self) -> list[Session]: ...


# --- storage, per reader (secureim.storage.Storage satisfies all) ------------------------------
class ModerationStore(Protocol):
    def audit(
        self, event: str, username: str = "", source: str = "", detail: str = "", at: float | None = None
    ) -> None: ...
    def active_bans(self, now: float, kind: str | None = None) -> list[D.Ban]: ...
    def user_ban(self, username: str, now: float) -> D.Ban | None: ...


class SessionStore(Protocol):
    def session_ended(self, node: str, username: str) -> None: ...


class AccountStore(Protocol):
    def get_identity_key(self, username: str) -> bytes | None: ...
    def set_identity_key(self, username: str, identity_key: bytes) -> None: ...
    def clear_prekeys(self, username: str, *, signed: bool) -> None: ...
    def get_ticket_epoch(self, username: str) -> int | None: ...
    def bump_ticket_epoch(self, username: str) -> None: ...
    def record_session_start(self, node: str, username: str, source: str, now: float, event: str) -> None: ...
    def delete_user(self, username: str) -> bool: ...


class KdcStore(Protocol):
    def get_password_hash(self, username: str) -> str | None: ...
    def open_conversation(self, user_a: str, user_b: str) -> int: ...
    def record_key_generation(self, conversation_id: int) -> int: ...


class MailboxStore(Protocol):
    def expire_queue(self, before: float) -> int: ...
    def prekey_status(self, username: str) -> D.PrekeyStatus: ...
    def clear_prekeys(self, username: str, *, signed: bool) -> None: ...
    def set_signed_prekey(self, username: str, key_id: int, entry: bytes, now: float) -> None: ...
    def add_one_time_prekeys(self, username: str, entries: list[tuple[int, bytes]], max_kept: int) -> int: ...
    def get_identity_key(self, username: str) -> bytes | None: ...
    def take_prekey_bundle(self, username: str) -> tuple[bytes | None, bytes | None]: ...
    def open_conversation(self, user_a: str, user_b: str) -> int: ...
    def put_offline_key(
        self, recipient: str, conversation_id: int, generation: int, sender: str, wrapped: bytes, now: float
    ) -> None: ...
    def get_conversation(self, conversation_id: int) -> D.Conversation | None: ...
    def enqueue(self, msg: D.QueuedMessage, max_messages: int, max_bytes: int) -> tuple[str, int]: ...
    def queued_for(self, recipient: str, after_id: int, limit: int) -> list[D.QueuedMessage]: ...
    def ack_queued(self, recipient: str, message_id: int) -> bool: ...


class RoomStore(Protocol):
    def get_room_by_id(self, room_id: int) -> D.Room | None: ...
    def rooms_of(self, username: str) -> list[D.Room]: ...
    def get_identity_key(self, username: str) -> bytes | None: ...
    def create_room(
        self,
        name: str,
        uid: bytes,
        admin: str,
        head: bytes,
        change: bytes,
        wrapped_key: bytes,
        msg_ref: bytes,
        admin_identity: bytes,
        now: float,
    ) -> int | None: ...
    def change_room(
        self,
        room_id: int,
        expected_epoch: int,
        head: bytes,
        *,
        add: str | None = None,
        remove: str | None = None,
        close: bool = False,
        change: bytes,
        wrapped_key: bytes | None,
        actor: str,
        actor_identity: bytes,
        msg_ref: bytes,
        now: float,
    ) -> tuple[str, int]: ...
    def room_enqueue(
        self,
        room_id: int,
        epoch: int,
        sender: str,
        sender_identity: bytes,
        msg_ref: bytes,
        payload: bytes,
        recipients: list[str],
        now: float,
        max_messages: int,
        max_bytes: int,
    ) -> dict[str, str]: ...


# --- what the domains offer each other -----------------------------------------------------------
class Auditor(Protocol):  # moderation.Moderation
    def audit(self, event: str, username: str = "", source: str = "", detail: str = "") -> None: ...


class LoginGate(Auditor, Protocol):  # moderation.Moderation
    def refuse_if_banned(self, session: Session, username: str | None) -> bool: ...


class PasswordChecker(Protocol):  # accounts.AuthService
    def register(
        self, raw_username: str, password: bytes, source: str = "", identity_key: bytes | None = None
    ) -> str: ...
    def login(self, raw_username: str, password: bytes, source: str) -> str: ...
    def change_password(
        self, username: str, old_password: bytes, new_password: bytes, source: str
    ) -> int: ...


class TicketDesk(Protocol):  # tickets.TicketIssuer
    def issue(self, username: str, identity_key: bytes, epoch: int = 0) -> bytes: ...
    def redeem_with_epoch(self, ticket: bytes, identity_key: bytes) -> tuple[str, int]: ...


class Notifier(Protocol):  # presence.Presence
    def notify(self, username: str, peers: Iterable[str], *, online: bool) -> None: ...


class LoginFollowUp(Protocol):  # store_forward.Mailbox
    def send_prekey_status(self, session: Session) -> None: ...
    def push_queue(self, session: Session) -> None: ...


class KeyMaker(Protocol):  # kdc.Conversations
    def fresh_key(self, cid: int) -> tuple[int, bytes]: ...  # under the KDC lock: generation, then key
    def peer_named(self, session: Session, raw: str, refusal: str) -> str | None: ...


class Nudger(Protocol):  # store_forward.Mailbox
    def nudge(self, recipient: str) -> bool: ...


class RoomRows(Protocol):  # rooms.RoomKeyring
    def row_message(self, me: str, row: D.QueuedMessage) -> P.Message: ...
