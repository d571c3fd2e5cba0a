"""The server's side of group rooms (docs/PROTOCOL.md section 16): RoomKeyring and RoomHandlers.

The server keeps each room's members and epoch in the database, checks every signed
membership change as the clients will (rooms.py: the chain, the rules, the actor's
signature), makes a fresh room key per epoch (the KDC of seed design 000) and queues
the change for every member, so each one sees every change in order, online or not.
A room message is one opaque payload, sent as it is to every other member who is
online (on this node or, over the cluster bus, on another) and queued for the others.

The server cannot read a room message (the sender keys travel over the pairwise
end-to-end sessions) and cannot add a member unseen (clients verify the admin's
signature); what it enforces is the same membership for routing and for its own room
keys, so a removed member gets neither the messages nor the key of the next epoch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import crypto_utils as cu
from secureim import proto as P
from secureim import storage as D
from secureim.e2e import rooms as R
from secureim.errors import ChangeRefused
from secureim.server.config import ServerConfig
from secureim.server.metrics import ServerMetrics
from secureim.server.ports import Auditor, KdcRuntime, Nudger, OnlineTable, RoomStore

if TYPE_CHECKING:
    from secureim.server.registry import Session

log = logging.getLogger("secureim.rooms")

ROOM_CACHE_S = 10.0  # a room's members are read again at least this often (other nodes' changes)
MAX_CACHED_ROOMS = 10_000
ROOM_CHANGES_PER_MINUTE = 60  # membership changes one session may make
MAX_ROOMS_PER_USER = R.MAX_ROOMS


@dataclass(frozen=True)
class _Cached:
    room: D.Room
    members: frozenset[str]
    at: float


class RoomKeyring:
    """Room keys at rest, the member cache (and the fast-path predicate that reads it), stored rows."""

    def __init__(
        self, storage: RoomStore, registry: OnlineTable, runtime: KdcRuntime, ticket_key: bytes
    ) -> None:
        self.storage = storage
        self.registry = registry
        self._runtime = runtime
        self._room_keys = cu.SealedBox(
            cu.hkdf(ticket_key, salt=None, info=cu.label("room kdc keys at rest"), length=32), "room kdc key"
        )
        self._room_cache: dict[int, _Cached] = {}
        self._room_cache_lock = threading.Lock()

    # -- the room key of each epoch, sealed at rest ---------------------------------
    @staticmethod
    def _room_aad(room_id: int, epoch: int) -> bytes:
        # after the box's label, "secureim/v1 room kdc key"
        return room_id.to_bytes(8, "big") + epoch.to_bytes(4, "big")

    def seal_key(self, room_id: int, epoch: int, key: bytes) -> bytes:
        return self._room_keys.seal(key, self._room_aad(room_id, epoch))

    def _open_room_key(self, room_id: int, epoch: int, wrapped: bytes | None) -> bytes:
        if not wrapped:
            return b""
        try:
            return self._room_keys.open(wrapped, self._room_aad(room_id, epoch))
        except cu.DecryptionFailed:  # another service's key; the client says so
            return b""

    # -- the member cache (the fan-out reads no database) -------------------------------
    def room(self, room_id: int, *, fresh: bool = False) -> _Cached | None:
        now = time.monotonic()
        with self._room_cache_lock:
            hit = self._room_cache.get(room_id)
        if hit is not None and not fresh and now - hit.at < ROOM_CACHE_S:
            return hit
        room = self.storage.get_room_by_id(room_id) if 0 < room_id <= D.MAX_DB_ID else None
        with self._room_cache_lock:
            if room is None:
                self._room_cache.pop(room_id, None)
                return None
            cached = _Cached(room, frozenset(room.members), now)
            self._room_cache[room_id] = cached
            while len(self._room_cache) > MAX_CACHED_ROOMS:
                self._room_cache.pop(next(iter(self._room_cache)))
        return cached

    def forget(self, room_id: int) -> None:
        with self._room_cache_lock:
            self._room_cache.pop(room_id, None)

    def send_is_fast(self, session: Session, msg: P.RoomSend) -> bool:
        """Whether ``msg`` can be handled on the loop thread: its room is in the cache for its epoch
        and every other member is online here or on another node, so the fan-out reads and writes
        no database (otherwise a worker takes it, in the session's order)."""
        with self._room_cache_lock:
            hit = self._room_cache.get(msg.room_id)
        if (
            hit is None
            or time.monotonic() - hit.at >= ROOM_CACHE_S
            or hit.room.epoch != msg.epoch
            or session.username not in hit.members
        ):
            return False
        online, remote = self.registry.online, self._runtime.cluster.is_remote
        return all(m in online or remote(m) for m in hit.members if m != session.username)

    # -- the queue: what a stored room row becomes on the wire ----------------------------
    def row_message(self, me: str, row: D.QueuedMessage) -> P.Message:
        key = self._open_room_key(row.room_id, row.generation, row.wrapped_key)
        if row.kind == D.KIND_ROOM_MESSAGE:
            return P.RoomMessage(
                queue_id=row.id,
                room_id=row.room_id,
                sender=row.sender,
                epoch=row.generation,
                key=key,
                stored_at_ms=int(row.stored_at * 1000),
                payload=row.payload,
            )
        self.forget(row.room_id)  # a change: this node's copy of the members is stale
        try:
            change = R.parse_change(row.payload)
            if change.action == R.CLOSE or (change.action in (R.REMOVE, R.LEAVE) and change.target == me):
                key = b""  # who is no longer a member gets no key of the new epoch
        except ChangeRefused:
            key = b""
        return P.RoomChanged(
            queue_id=row.id,
            room_id=row.room_id,
            suite=self._runtime.suite.suite_id,
            key=key,
            actor_identity=row.sender_identity,
            change=row.payload,
        )


class RoomHandlers:
    """RoomCreate, RoomChange and RoomSend; a live copy that missed its member is queued here too."""

    def __init__(
        self,
        storage: RoomStore,
        keyring: RoomKeyring,
        registry: OnlineTable,
        mailbox: Nudger,
        gate: Auditor,
        runtime: KdcRuntime,
        metrics: ServerMetrics,
        config: ServerConfig,
    ) -> None:
        self.storage = storage
        self.registry = registry
        self.metrics = metrics
        self.config = config
        self._keyring = keyring
        self._mailbox = mailbox
        self._gate = gate
        self._runtime = runtime

    # -- changes -------------------------------------------------------------------------
    def _room_result(
        self,
        session: Session,
        name: str,
        status: int,
        reason: str = "",
        *,
        room_id: int = 0,
        epoch: int = 0,
        key: bytes = b"",
    ) -> None:
        session.send(
            P.RoomResult(
                room=name[: P.MAX_ROOM_NAME_BYTES],
                room_id=room_id,
                epoch=epoch,
                status=status,
                suite=self._runtime.suite.suite_id,
                key=key,
                reason=reason,
            )
        )

    def _room_ops_refused(self, session: Session) -> bool:
        now = time.monotonic()
        times = session.room_ops
        while times and now - times[0] > 60.0:
            times.popleft()
        if len(times) >= ROOM_CHANGES_PER_MINUTE:
            return True
        times.append(now)
        return False

    def _checked_change(self, session: Session, blob: bytes) -> R.Change | None:
        assert session.identity_key is not None  # room messages pass the protocol only after login
        change = None
        try:
            change = R.parse_change(blob)
            if change.actor != session.username:
                raise ChangeRefused("A change must be made (and signed) by you.")
            R.verify_signature(change, session.identity_key)
        except (
            ChangeRefused
        ) as exc:  # the answer names the room when the change does (the client waits on it)
            self._room_result(session, change.room if change else "", P.RoomStatus.REFUSED, str(exc))
            return None
        if self._room_ops_refused(session):
            self._room_result(
                session,
                change.room,
                P.RoomStatus.REFUSED,
                "Too many room changes in a minute; try again shortly.",
            )
            return None
        return change

    def create(self, session: Session, msg: P.RoomCreate) -> None:
        me = session.username
        assert me is not None and session.identity_key is not None
        change = self._checked_change(session, msg.change)
        if change is None:
            return
        try:
            R.check_rules(change, None, None)
            if not cu.constant_time_equal(change.identity_of(me) or b"", session.identity_key):
                raise ChangeRefused("A room's creation must list your own identity key.")
        except ChangeRefused as exc:
            self._room_result(session, change.room, P.RoomStatus.REFUSED, str(exc))
            return
        if len(change.uid) != R.UID_BYTES or len(self.storage.rooms_of(me)) >= MAX_ROOMS_PER_USER:
            self._room_result(
                session,
                change.room,
                P.RoomStatus.REFUSED,
                f"You are in {MAX_ROOMS_PER_USER} rooms already; leave one first.",
            )
            return
        # Epoch 1 has one member, so no queued row ever needs its key: the admin gets it here, and the
        # row kept for it is sealed under room id 0, which opens nothing (every later epoch's key is
        # sealed under the room's id, for the queue).
        key = self._runtime.suite.generate_key()
        room_id = self.storage.create_room(
            change.room,
            change.uid,
            me,
            change.head,
            change.blob,
            self._keyring.seal_key(0, 1, key),
            cu.random_bytes(P.MSG_REF_BYTES),
            session.identity_key,
            time.time(),
        )
        if room_id is None:
            self._room_result(
                session,
                change.room,
                P.RoomStatus.REFUSED,
                f"{change.room} already exists; choose another name.",
            )
            return
        self._gate.audit("room_create", me, session.source, change.room)
        self._room_result(session, change.room, P.RoomStatus.OK, room_id=room_id, epoch=1, key=key)
        self._mailbox.nudge(me)

    def change(self, session: Session, msg: P.RoomChange) -> None:
        me = session.username
        assert me is not None and session.identity_key is not None
        change = self._checked_change(session, msg.change)  # parsed, signed, rate-limited: then the database
        if change is None:
            return
        cached = self._keyring.room(msg.room_id, fresh=True)
        if cached is None or me not in cached.members:
            self._room_result(
                session,
                change.room,
                P.RoomStatus.REFUSED,
                f"No such room as {change.room}, or you are not a member of it.",
                room_id=msg.room_id,
            )
            return
        room = cached.room
        if change.uid != room.uid or change.room != room.name:
            self._room_result(
                session, room.name, P.RoomStatus.REFUSED, "That change is for another room.", room_id=room.id
            )
            return
        if change.epoch != room.epoch + 1 or change.prev_head != room.head:
            self._room_result(
                session,
                room.name,
                P.RoomStatus.STALE,
                f"{room.name} changed meanwhile; the change waiting for you comes first.",
                room_id=room.id,
                epoch=room.epoch,
            )
            return
        try:
            # The server knows the members' names; each client checks the keys in its own roster.
            R.check_rules(
                change,
                [(m, b"") for m in room.members],
                room.admin,
                self.config.room_max_members,
                names_only=True,
            )
        except ChangeRefused as exc:
            self._room_result(session, room.name, P.RoomStatus.REFUSED, str(exc), room_id=room.id)
            return
        if change.action == R.ADD:
            registered = self.storage.get_identity_key(change.target)
            if registered is None:
                self._room_result(
                    session,
                    room.name,
                    P.RoomStatus.REFUSED,
                    f"There is no user {change.target}.",
                    room_id=room.id,
                )
                return
            if not cu.constant_time_equal(change.identity_of(change.target) or b"", registered):
                self._room_result(
                    session,
                    room.name,
                    P.RoomStatus.REFUSED,
                    f"The identity key you vouch for is not {change.target}'s (they have a new one: "
                    f"compare safety numbers with /verify {change.target}).",
                    room_id=room.id,
                )
                return
        if change.action == R.ADD and len(self.storage.rooms_of(change.target)) >= MAX_ROOMS_PER_USER:
            self._room_result(
                session,
                room.name,
                P.RoomStatus.REFUSED,
                f"{change.target} is in {MAX_ROOMS_PER_USER} rooms already.",
                room_id=room.id,
            )
            return
        epoch = room.epoch + 1
        key = self._runtime.suite.generate_key() if change.action != R.CLOSE else b""
        status, now_epoch = self.storage.change_room(
            room.id,
            room.epoch,
            change.head,
            add=change.target if change.action == R.ADD else None,
            remove=change.target if change.action in (R.REMOVE, R.LEAVE) else None,
            close=change.action == R.CLOSE,
            change=change.blob,
            wrapped_key=self._keyring.seal_key(room.id, epoch, key) if key else None,
            actor=me,
            actor_identity=session.identity_key,
            msg_ref=cu.random_bytes(P.MSG_REF_BYTES),
            now=time.time(),
        )
        self._keyring.forget(room.id)
        if status == D.ROOM_STALE:
            self._room_result(
                session,
                room.name,
                P.RoomStatus.STALE,
                f"{room.name} changed meanwhile.",
                room_id=room.id,
                epoch=now_epoch,
            )
            return
        if status != D.ROOM_OK:
            self._room_result(
                session, room.name, P.RoomStatus.REFUSED, f"{room.name} no longer exists.", room_id=room.id
            )
            return
        self._gate.audit(
            f"room_{R.ACTION_NAMES[change.action]}",
            me,
            session.source,
            f"{room.name} {change.target}".strip(),
        )
        leaving = change.action in (R.LEAVE, R.CLOSE)  # who leaves gets no key of the epoch without them
        self._room_result(
            session, room.name, P.RoomStatus.OK, room_id=room.id, epoch=epoch, key=b"" if leaving else key
        )
        for user in sorted(set(room.members) | {change.target} - {""}):
            self._mailbox.nudge(user)

    def send(self, session: Session, msg: P.RoomSend) -> None:
        """One payload to every other member: live where they are online, queued where not."""
        me = session.username

        def answer(status: int, reason: str = "", epoch: int = 0, online: int = 0, stored: int = 0) -> None:
            session.send(
                P.RoomSendResult(
                    room_id=msg.room_id,
                    msg_ref=msg.msg_ref,
                    status=status,
                    epoch=epoch,
                    online=online,
                    stored=stored,
                    reason=reason,
                )
            )

        if len(msg.payload) < R.MIN_MESSAGE_BYTES:
            answer(P.RoomStatus.REFUSED, "A malformed room message was refused.")
            return
        if session.room_sends is not None and not session.room_sends.allow(""):
            answer(P.RoomStatus.REFUSED, "Too many room messages at once; slow down.")
            return
        cached = self._keyring.room(msg.room_id)
        if cached is not None and me in cached.members and msg.epoch != cached.room.epoch:
            cached = self._keyring.room(msg.room_id, fresh=True)  # another node's change, not seen here yet?
        if cached is None or me not in cached.members:
            answer(P.RoomStatus.REFUSED, "No such room, or you are not a member of it.")
            return
        room = cached.room
        if msg.epoch != room.epoch:
            answer(
                P.RoomStatus.STALE,
                f"{room.name} changed; the message is sealed again for its members now.",
                epoch=room.epoch,
            )
            return
        deliver = P.RoomMessage(
            queue_id=0,
            room_id=room.id,
            sender=me,
            epoch=room.epoch,
            key=b"",
            stored_at_ms=0,
            payload=msg.payload,
        )
        online, offline = 0, []
        for member in room.members:
            if member == me:
                continue
            peer = self.registry.online.get(member)
            sent = peer.send(deliver) if peer is not None else self._runtime.cluster.deliver(member, deliver)
            if sent:
                online += 1
            else:
                offline.append(member)
        if offline and self._runtime.on_loop_thread():
            # someone left between send_is_fast and here: their copy is queued by a worker
            self._runtime.run_slow(self._store, session, msg, room, offline, online, answer)
            return
        self._store(session, msg, room, offline, online, answer)

    def _store(
        self,
        session: Session,
        msg: P.RoomSend,
        room: D.Room,
        offline: list[str],
        online: int,
        answer: Callable[..., None],
    ) -> None:
        """Queue the copies for the members who are away, then answer the sender."""
        me = session.username
        assert me is not None and session.identity_key is not None
        stored, full = 0, []
        if offline:
            results = self.storage.room_enqueue(
                room.id,
                room.epoch,
                me,
                session.identity_key,
                msg.msg_ref,
                msg.payload,
                offline,
                time.time(),
                self.config.queue_max_messages,
                self.config.queue_max_bytes,
            )
            for member, status in sorted(results.items()):
                if status in (D.STORED, D.DUPLICATE):
                    stored += 1
                    if status == D.STORED:
                        self._mailbox.nudge(member)  # online after all (a login this very moment)
                elif status != D.NO_USER:  # an account deleted (still listed until removed)
                    full.append(member)
        self.metrics.room_copies.inc(online + stored)
        reason = f"Not stored for {', '.join(full)}: their mailbox is full." if full else ""
        answer(P.RoomStatus.OK, reason, epoch=room.epoch, online=online, stored=stored)

    def copy_to_queue(self, member: str, msg: P.RoomMessage, sender_identity: bytes | None) -> None:
        """A live copy sent to another node found its member gone: it is queued for them instead."""
        if sender_identity is None:
            sender_identity = self.storage.get_identity_key(msg.sender)
        if sender_identity is None or len(msg.payload) < R.MIN_MESSAGE_BYTES:
            return
        ref = cu.sha256(msg.payload)[: P.MSG_REF_BYTES]  # the same copy again is not stored twice
        results = self.storage.room_enqueue(
            msg.room_id,
            msg.epoch,
            msg.sender,
            sender_identity,
            ref,
            msg.payload,
            [member],
            time.time(),
            self.config.queue_max_messages,
            self.config.queue_max_bytes,
        )
        if results.get(member) == D.STORED:
            self._mailbox.nudge(member)
