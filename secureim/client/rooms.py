"""The client's side of group rooms (docs/PROTOCOL.md section 16): one per ChatClient.

- **Membership**: every RoomChanged from the queue is verified (rooms.RoomState rules, the
  admin's pinned identity key, the chain of heads) before anything is shown or used; a change
  that does not verify is refused loudly (:class:`RoomWarning`) and changes nothing.
- **Sender keys**: before this client's first message of an epoch, its sender key goes to
  every member of that epoch *as this client verified it* (never the server's list), each
  over the pairwise end-to-end path (``offline.Mailbox.send_body``: stored, acknowledged,
  in the same queue as the room's messages, so it is there first).
- **Messages**: sealed once (rooms.RoomSession.seal), fanned out by the server; a message
  whose sender key is still on its way is held (bounded) and opened when it arrives.

The verified state and every received key live in the client's sealed store (prekeys.PrekeyStore).
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import crypto_utils as cu
from secureim import proto as P
from secureim.client.ports import RoomsHost, logged_in_identity, logged_in_name
from secureim.client.room_events import (
    HELD_FOR_S as HELD_FOR_S,
)
from secureim.client.room_events import (
    MAX_HELD as MAX_HELD,
)
from secureim.client.room_events import (
    MAX_HELD_PER_SENDER as MAX_HELD_PER_SENDER,
)
from secureim.client.room_events import (
    SEND_TIMEOUT_S as SEND_TIMEOUT_S,
)
from secureim.client.room_events import (
    STALE_RETRIES,
    Stale,
    clean,
)
from secureim.client.room_events import (
    RoomMessageReceived as RoomMessageReceived,
)
from secureim.client.room_events import (
    RoomNotice as RoomNotice,
)
from secureim.client.room_events import (
    RoomSent as RoomSent,
)
from secureim.client.room_events import (
    RoomWarning as RoomWarning,
)
from secureim.client.room_messaging import RoomMessaging
from secureim.e2e import rooms as R
from secureim.errors import (
    ChangeRefused,
    ConnectionClosed,
    MessageRefused,
    RoomError,
    SecureIMError,
)

log = logging.getLogger("secureim.rooms")

MAX_LEFT = 1024  # rooms whose end of membership is remembered (an older add is a replay)
REPLY_TIMEOUT_S = 30.0


class RoomsClient:
    def __init__(self, client: RoomsHost) -> None:
        self.client = client
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.rooms: dict[str, R.RoomSession] = {}
        self._results: queue.Queue = queue.Queue(maxsize=8)
        self._op_lock = threading.Lock()  # one membership request in flight at a time
        self.left: dict[str, int] = {}  # b64(uid) -> the epoch at which this client's membership ended
        self.messaging = RoomMessaging(client, self)

    @property
    def _username(self) -> str:
        return logged_in_name(self.client)

    @property
    def _identity(self) -> cu.IdentityKey:
        return logged_in_identity(self.client)

    # -- state at rest ------------------------------------------------------------------
    def load(self) -> None:
        store = self.client.mailbox.store
        if store is None:
            return
        with self.lock:
            self.rooms = R.load_rooms(self._username, store.rooms)
            self.left = {k: int(v) for k, v in store.rooms_left.items()}

    def save(self) -> None:
        mailbox = self.client.mailbox
        if mailbox.store is None:
            return
        with mailbox.lock, self.lock:
            mailbox.store.rooms = {name: room.to_dict() for name, room in self.rooms.items()}
            mailbox.store.rooms_left = dict(self.left)
            mailbox.store.save()

    def by_id(self, room_id: int) -> R.RoomSession | None:
        return next((r for r in self.rooms.values() if r.room_id == room_id and room_id), None)

    # -- what the user asks ---------------------------------------------------------------
    def my_rooms(self) -> list[str]:
        with self.lock:
            return sorted(self.rooms)

    def members(self, name: str) -> tuple[str, ...]:
        return self.room(name).members

    def summary(self) -> list[tuple[str, int]]:
        """(room, member count) of every room, in one look (a change cannot slip between)."""
        with self.lock:
            return [(name, len(self.rooms[name].members)) for name in sorted(self.rooms)]

    def admin_of(self, name: str) -> str:
        return self.room(name).admin

    def room(self, name: str) -> R.RoomSession:
        name = R.normalize_room(name)
        with self.lock:
            room = self.rooms.get(name)
        if room is None:
            raise RoomError(f"You are not in {name} (/rooms lists yours; /create {name} makes it).")
        return room

    def create(self, name: str) -> None:
        name = R.normalize_room(name)
        with self.lock:
            if name in self.rooms:
                raise RoomError(f"You are in {name} already.")
            if len(self.rooms) >= R.MAX_ROOMS:
                raise RoomError(f"You are in {R.MAX_ROOMS} rooms; leave one first.")
        change = R.make_change(
            self._identity,
            action=R.CREATE,
            uid=cu.random_bytes(R.UID_BYTES),
            room=name,
            epoch=1,
            at_ms=int(time.time() * 1000),
            prev_head=R.ZERO_HEAD,
            actor=self._username,
            target="",
            admin=self._username,
            roster=[(self._username, cu.public_bytes(self._identity))],
        )
        result = self._request(P.RoomCreate(change=change.blob), name)
        suite = self.suite(result.suite, result.key)
        with self.lock:
            if name not in self.rooms:  # (the queued copy of the creation may have come first)
                room = R.RoomSession.first_contact(
                    self._username, change, cu.public_bytes(self._identity), result.suite
                )
                self.rooms[name] = room
            room = self.rooms[name]
            room.room_id = result.room_id
            if suite is not None:
                room.set_kdc_key(1, result.key)
        self.save()

    def invite(self, name: str, user: str) -> None:
        user = P.normalize_username(user)
        room = self.room(name)
        if user in room.members:
            raise RoomError(f"{user} is in {room.name} already.")
        if room.admin != self._username:
            raise RoomError(f"Only {room.name}'s admin ({room.admin}) can do that.")
        self._change(room, R.ADD, user, self._identity_for(user))

    def _identity_for(self, user: str) -> bytes:
        """The identity key this client vouches for when it adds ``user``: the one pinned for them,
        or (first contact) the one the server's KDC gives with their prekeys, pinned now."""
        client = self.client
        pinned = client.peer_trust.pinned(user) if client.peer_trust is not None else None
        if pinned is None:
            try:
                client.mailbox.forget_outbound(user)
                client.mailbox.outbound_for(user)  # OfflineOpen: checked and pinned on its way in
            except MessageRefused as exc:
                if client.presence(user) == "unknown":
                    raise RoomError(f"There is no user {user}.") from None
                raise RoomError(f"{user} cannot be added: {clean(str(exc))}") from None
            assert client.peer_trust is not None  # logged in
            pinned = client.peer_trust.pinned(user)
        if pinned is None or client.has_refused_key(user):
            raise RoomError(
                f"{user}'s identity key changed; compare safety numbers (/verify {user}) and "
                f"/accept {user} first."
            )
        return pinned

    def remove(self, name: str, user: str) -> None:
        user = P.normalize_username(user)
        room = self.room(name)
        if user not in room.members:
            raise RoomError(f"{user} is not a member of {room.name}.")
        if user == self._username:
            raise RoomError(f"Use /leave {room.name} to leave it.")
        self._change(room, R.REMOVE, user)

    def leave(self, name: str) -> str:
        """Leave the room; its admin closes it (for everyone).  Returns what happened."""
        room = self.room(name)
        if room.admin == self._username:
            self._change(room, R.CLOSE, "")
            return f"You closed {room.name}: it is gone for every member."
        self._change(room, R.LEAVE, self._username)
        return f"You left {room.name}."

    def leave_all(self) -> list[str]:
        """Leave every room (closing those this client administers): before the account is deleted."""
        said = []
        for name in self.my_rooms():
            try:
                said.append(self.leave(name))
            except RoomError as exc:
                said.append(f"{name}: {exc}")
        return said

    def _change(
        self, room: R.RoomSession, action: int, target: str, target_identity: bytes | None = None
    ) -> None:
        me = self._username
        if action in (R.ADD, R.REMOVE, R.CLOSE) and room.admin != me:
            raise RoomError(f"Only {room.name}'s admin ({room.admin}) can do that.")
        for _attempt in range(STALE_RETRIES):
            with self.lock:
                try:
                    change = room.next_change(
                        self._identity, action, target, int(time.time() * 1000), target_identity
                    )
                except ChangeRefused as exc:
                    raise RoomError(str(exc)) from None
                room_id, epoch = room.room_id, room.epoch
            try:
                result = self._request(P.RoomChange(room_id=room_id, change=change.blob), room.name)
            except Stale as stale:
                self.wait_epoch(room, stale.epoch)
                if room.epoch == epoch:
                    raise RoomError(
                        f"{room.name} changed on the server and this client has not seen the change "
                        "yet; try again in a moment."
                    ) from None
                continue
            with self.lock:
                gone = room.name not in self.rooms
                if not gone and room.epoch < change.epoch:
                    applied = room.apply(change, result.key if self.suite(result.suite, result.key) else None)
                    if applied is not None and applied.me_gone:
                        self.rooms.pop(room.name, None)
                        self._left(room, change.epoch)
                    else:
                        room.set_kdc_key(change.epoch, result.key)
                    self.changed.notify_all()
            self.save()
            return
        raise RoomError(f"{room.name} kept changing; try again.")

    def wait_epoch(self, room: R.RoomSession, epoch: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self.lock:
            while room.epoch < epoch and room.name in self.rooms:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.changed.wait(left)

    def _request(self, msg: P.Message, name: str) -> P.RoomResult:
        """Send ``msg`` and wait for the server's answer about room ``name`` (others are stale: ignored)."""
        with self._op_lock:
            while not self._results.empty():
                self._results.get_nowait()
            self.client.send_frame(msg)
            deadline = time.monotonic() + REPLY_TIMEOUT_S
            while True:
                try:
                    result = self._results.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise ConnectionClosed("The server did not answer in time.") from None
                if result.room == name:
                    break
        if result.status == P.RoomStatus.STALE:
            raise Stale(result.epoch)
        if result.status != P.RoomStatus.OK:
            raise RoomError(clean(result.reason) or "The server refused that.")
        return result

    @staticmethod
    def suite(suite_id: int, key: bytes):
        try:
            suite = cu.suite_by_id(suite_id)
        except SecureIMError:
            return None
        return suite if len(key) == suite.key_bytes else None

    def on_result(self, msg: P.RoomResult) -> None:
        try:
            self._results.put_nowait(msg)
        except queue.Full:
            log.warning("an unasked room answer was ignored")

    # -- receiving -------------------------------------------------------------------------
    def on_changed(self, msg: P.RoomChanged) -> None:
        """A membership change from the queue (receiver thread): verify, apply, show; then Ack.
        Every key it is checked with comes from this client's verified roster (or, for a room it
        joins, from the add itself, whose admin key is then held to the key pinned for the admin);
        ``msg.actor_identity`` (the server's word) decides nothing."""
        client = self.client
        me, my_key = self._username, cu.public_bytes(self._identity)
        try:
            change = R.parse_change(msg.change)
        except ChangeRefused as exc:
            client.emit(RoomWarning("", f"WARNING: {exc}"))
            self.client.mailbox.ack(msg.queue_id)
            return
        kdc = msg.key if self.suite(msg.suite, msg.key) else None
        with self.lock:
            room = self.rooms.get(change.room)
            joining = room is None
            left_at = self.left.get(cu.b64encode(change.uid), 0)
            count = len(self.rooms)
        try:
            if joining:
                if change.action in (R.CLOSE, R.REMOVE, R.LEAVE):
                    self.client.mailbox.ack(msg.queue_id)  # about a room this client is no longer in
                    return
                if count >= R.MAX_ROOMS:
                    raise ChangeRefused(
                        f"You are in {R.MAX_ROOMS} rooms: an add to {change.room} was refused "
                        "(leave a room first)."
                    )
                room = R.RoomSession.first_contact(me, change, my_key, msg.suite, left_at)
                # Verified with the key the add gives the admin: it must be the one pinned for them (or
                # is pinned now, on first contact), outside our lock (trust takes the mailbox's).
                if change.admin != me and not client.trust_peer(change.admin, room.admin_identity):
                    raise ChangeRefused(
                        f"The add to {change.room} is signed with a key for {change.admin} other "
                        f"than the one you know; it was refused (see /verify {change.admin})."
                    )
                room.room_id = msg.room_id
                if kdc:
                    room.set_kdc_key(change.epoch, kdc)
                with self.lock:
                    if change.room in self.rooms:  # came in meanwhile (our own creation's answer)
                        self.client.mailbox.ack(msg.queue_id)
                        return
                    self.rooms[change.room] = room
                    self.changed.notify_all()
                notice = (
                    f"{change.actor} added you to {change.room} (members: {', '.join(room.members)})."
                    if change.action == R.ADD
                    else None
                )
                gone, joined = False, change.action == R.ADD
            else:
                assert room is not None  # not joining: it was found above
                with self.lock:
                    if room.uid != change.uid:
                        raise ChangeRefused(
                            f"A change to another room named {change.room} was refused: this "
                            f"client is in {change.room} already (the server may be trying to "
                            "swap it)."
                        )
                    if msg.room_id and room.room_id and msg.room_id != room.room_id:
                        log.info("a change named another handle for a room; the first one is kept")
                    applied = room.apply(change, kdc)
                    notice, gone, joined = None, False, False
                    if applied is not None and change.actor != me:  # (our own: the command said it)
                        notice = applied.text
                        if applied.me_gone:
                            self.rooms.pop(room.name, None)
                            self._left(room, change.epoch)
                            gone = True
                        if change.action == R.REMOVE and change.target == me:
                            notice = f"{change.actor} removed you from {change.room}."
                    elif applied is not None and applied.me_gone:  # our own leave or close, queued first
                        self.rooms.pop(room.name, None)
                        self._left(room, change.epoch)
                    self.changed.notify_all()
        except ChangeRefused as exc:
            client.emit(RoomWarning(change.room, f"WARNING: {exc}"))
            self.client.mailbox.ack(msg.queue_id)
            return
        self.save()
        self.client.mailbox.ack(msg.queue_id)
        if notice:
            client.emit(RoomNotice(change.room, notice, gone=gone, joined=joined))
        assert room is not None  # joined or found
        with self.lock:
            early = room.take_pending() if room.name in self.rooms else []
        for sender, content, identity in early:
            self.on_sender_key(sender, content, identity)

    def _left(self, room: R.RoomSession, epoch: int) -> None:
        """Remember where this client's membership of ``room`` ended (an older add is a replay)."""
        self.left[cu.b64encode(room.uid)] = epoch
        while len(self.left) > MAX_LEFT:
            self.left.pop(next(iter(self.left)))

    # -- room messages (room_messaging.py) ------------------------------------------------------
    def send(self, name: str, text: str) -> RoomSent:
        """Seal ``text`` for the room and hand it to the server (its sender key first, where due)."""
        return self.messaging.send(name, text)

    def on_key_stored(self, msg: P.StoreResult) -> None:
        self.messaging.on_key_stored(msg)

    def on_send_result(self, msg: P.RoomSendResult) -> None:
        self.messaging.on_send_result(msg)

    def on_sender_key(self, sender: str, content: bytes, identity: bytes | None) -> None:
        self.messaging.on_sender_key(sender, content, identity)

    def on_message(self, msg: P.RoomMessage) -> None:
        self.messaging.on_message(msg)
