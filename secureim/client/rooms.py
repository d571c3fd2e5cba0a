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
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import crypto_utils as cu
from secureim import proto as P
from secureim.client.display import sanitize
from secureim.client.ports import RoomsHost
from secureim.e2e import rooms as R
from secureim.e2e import sessions as e2e
from secureim.errors import (
    ChangeRefused,
    ConnectionClosed,
    DecryptionFailed,
    MessageRefused,
    RoomError,
    SecureIMError,
)

log = logging.getLogger("secureim.rooms")

MAX_HELD = 200  # room messages waiting for their sender key...
MAX_HELD_PER_SENDER = 20  # ...at most this many from one member...
HELD_FOR_S = 600.0  # ...for at most this long (the freshness window)
MAX_LEFT = 1024  # rooms whose end of membership is remembered (an older add is a replay)
SEND_TIMEOUT_S = 30.0
STALE_RETRIES = 3
REPLY_TIMEOUT_S = 30.0


def _clean(text: str, max_chars: int = 512) -> str:
    return sanitize(text, max_chars)


@dataclass(frozen=True)
class RoomMessageReceived:
    room: str
    sender: str
    text: str
    sent_at: float
    stored_at: float | None = None


@dataclass(frozen=True)
class RoomNotice:
    """A verified membership change (or what happened to this client's own membership)."""

    room: str
    text: str
    gone: bool = False  # this client is no longer in the room (removed, or the room closed)
    joined: bool = False  # this client was just added


@dataclass(frozen=True)
class RoomWarning:
    """A membership change or room message that did not verify: refused, shown loudly."""

    room: str
    text: str


@dataclass(frozen=True)
class RoomSent:
    room: str
    text: str
    online: int
    stored: int
    note: str = ""


class RoomsClient:
    def __init__(self, client: RoomsHost) -> None:
        self.client = client
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.rooms: dict[str, R.RoomSession] = {}
        self._results: queue.Queue = queue.Queue(maxsize=8)
        self._op_lock = threading.Lock()  # one membership request in flight at a time
        self._sends: dict[bytes, queue.Queue] = {}
        self._key_refs: dict[bytes, tuple[str, int, str]] = {}  # Store ref -> (room, epoch, member)
        self._held: list[tuple[str, P.RoomMessage, float]] = []  # (room, message, held since)
        self.left: dict[str, int] = {}  # b64(uid) -> the epoch at which this client's membership ended

    @property
    def _username(self) -> str:
        name = self.client.username
        assert name is not None  # only used once logged in
        return name

    @property
    def _identity(self) -> Ed25519PrivateKey:
        key = self.client.identity
        assert key is not None  # only used once logged in
        return key

    # -- state at rest ------------------------------------------------------------------
    def load(self) -> None:
        store = self.client.mailbox.store
        if store is None:
            return
        with self.lock:
            self.rooms = R.load_rooms(self._username, store.rooms)
            self.left = {k: int(v) for k, v in store.rooms_left.items()}

    def _save(self) -> None:
        mailbox = self.client.mailbox
        if mailbox.store is None:
            return
        with mailbox.lock, self.lock:
            mailbox.store.rooms = {name: room.to_dict() for name, room in self.rooms.items()}
            mailbox.store.rooms_left = dict(self.left)
            mailbox.store.save()

    def _by_id(self, room_id: int) -> R.RoomSession | None:
        return next((r for r in self.rooms.values() if r.room_id == room_id and room_id), None)

    # -- what the user asks ---------------------------------------------------------------
    def my_rooms(self) -> list[str]:
        with self.lock:
            return sorted(self.rooms)

    def members(self, name: str) -> tuple[str, ...]:
        return self._room(name).members

    def summary(self) -> list[tuple[str, int]]:
        """(room, member count) of every room, in one look (a change cannot slip between)."""
        with self.lock:
            return [(name, len(self.rooms[name].members)) for name in sorted(self.rooms)]

    def admin_of(self, name: str) -> str:
        return self._room(name).admin

    def _room(self, name: str) -> R.RoomSession:
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
        suite = self._suite(result.suite, result.key)
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
        self._save()

    def invite(self, name: str, user: str) -> None:
        user = P.normalize_username(user)
        room = self._room(name)
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
                raise RoomError(f"{user} cannot be added: {_clean(str(exc))}") from None
            pinned = client.peer_trust.pinned(user)
        if pinned is None or client.has_refused_key(user):
            raise RoomError(
                f"{user}'s identity key changed; compare safety numbers (/verify {user}) and "
                f"/accept {user} first."
            )
        return pinned

    def remove(self, name: str, user: str) -> None:
        user = P.normalize_username(user)
        room = self._room(name)
        if user not in room.members:
            raise RoomError(f"{user} is not a member of {room.name}.")
        if user == self._username:
            raise RoomError(f"Use /leave {room.name} to leave it.")
        self._change(room, R.REMOVE, user)

    def leave(self, name: str) -> str:
        """Leave the room; its admin closes it (for everyone).  Returns what happened."""
        room = self._room(name)
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
            except _Stale as stale:
                self._wait_epoch(room, stale.epoch)
                if room.epoch == epoch:
                    raise RoomError(
                        f"{room.name} changed on the server and this client has not seen the change "
                        "yet; try again in a moment."
                    ) from None
                continue
            with self.lock:
                gone = room.name not in self.rooms
                if not gone and room.epoch < change.epoch:
                    applied = room.apply(
                        change, result.key if self._suite(result.suite, result.key) else None
                    )
                    if applied is not None and applied.me_gone:
                        self.rooms.pop(room.name, None)
                        self._left(room, change.epoch)
                    else:
                        room.set_kdc_key(change.epoch, result.key)
                    self.changed.notify_all()
            self._save()
            return
        raise RoomError(f"{room.name} kept changing; try again.")

    def _wait_epoch(self, room: R.RoomSession, epoch: int, timeout_s: float = 10.0) -> None:
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
            raise _Stale(result.epoch)
        if result.status != P.RoomStatus.OK:
            raise RoomError(_clean(result.reason) or "The server refused that.")
        return result

    @staticmethod
    def _suite(suite_id: int, key: bytes):
        try:
            suite = cu.suite_by_id(suite_id)
        except SecureIMError:
            return None
        return suite if len(key) == suite.key_bytes else None

    # -- sending ---------------------------------------------------------------------------
    def send(self, name: str, text: str) -> RoomSent:
        """Seal ``text`` for the room and hand it to the server (its sender key first, where due)."""
        room = self._room(name)
        if len(text.encode("utf-8")) > e2e.MAX_TEXT_BYTES:
            raise ValueError(f"Messages are limited to {e2e.MAX_TEXT_BYTES} bytes.")
        msg_id = e2e.new_msg_id()
        note = ""
        for _attempt in range(STALE_RETRIES + 2):
            note, own = self._distribute(room)
            with self.lock:
                if room.name not in self.rooms:
                    raise RoomError(f"You are no longer in {room.name}.")
                if room.own is not own:  # the room changed while the key went out: the new one goes first
                    continue
                try:
                    payload = room.seal(text, msg_id, time.time())
                except SecureIMError as exc:
                    raise RoomError(str(exc)) from None
                send = P.RoomSend(room_id=room.room_id, epoch=room.epoch, msg_ref=msg_id, payload=payload)
                waiter: queue.Queue = queue.Queue(maxsize=1)
                self._sends[msg_id] = waiter
            try:
                self.client.send_frame(send)
                try:
                    result = waiter.get(timeout=SEND_TIMEOUT_S)
                except queue.Empty:
                    raise ConnectionClosed("The server did not answer in time.") from None
            finally:
                with self.lock:
                    self._sends.pop(msg_id, None)
            if result.status == P.RoomStatus.STALE:
                self._wait_epoch(room, result.epoch)  # sealed again for the members as they are now
                if room.epoch < result.epoch:
                    raise RoomError(
                        f"the server's {room.name} has a membership change this client refused or "
                        "has not received (see any warning above); nothing was sent to members "
                        "this client cannot vouch for."
                    )
                continue
            if result.status != P.RoomStatus.OK:
                raise RoomError(_clean(result.reason) or "The server refused the message.")
            return RoomSent(room.name, text, result.online, result.stored, _clean(result.reason) or note)
        raise RoomError(f"{room.name} kept changing while the message was sent; it was not sent.")

    def _distribute(self, room: R.RoomSession):
        """This epoch's sender key to every verified member who does not have it yet, each over
        a pairwise session with the identity key the roster gives them.  (a note, the key sent)."""
        with self.lock:
            content, missing = room.distribution()
            own, roster = room.own, dict(room.roster)
        failed = []
        for peer in missing:
            try:
                ref = self.client.mailbox.send_body(
                    peer, e2e.BODY_SENDER_KEY, content, expect_identity=roster[peer]
                )
            except (MessageRefused, ValueError, SecureIMError) as exc:
                if isinstance(exc, ConnectionClosed):
                    raise
                log.info("a room sender key was not sent: %s", exc)
                failed.append(peer)
                continue
            with self.lock:
                own.sent_to.add(peer)
                self._key_refs[ref] = (room.name, own.epoch, peer)
                while len(self._key_refs) > 4 * R.HARD_MAX_MEMBERS:
                    self._key_refs.pop(next(iter(self._key_refs)))
        if failed:
            return (
                f"{', '.join(failed)} cannot read it yet (no end-to-end session with the key the admin "
                "vouched for could be opened: they have never logged in, or changed their key); they get "
                "your key with your next message."
            ), own
        return "", own

    def on_key_stored(self, msg: P.StoreResult) -> None:
        """The server's answer to a Store of a sender key: refused (a full mailbox, an expired
        offline key) means that member lacks it, so the next message sends it again."""
        with self.lock:
            entry = self._key_refs.pop(msg.msg_ref, None)
            if entry is None or msg.status in (P.StoreStatus.STORED, P.StoreStatus.HANDED_OVER):
                return
            name, epoch, peer = entry
            room = self.rooms.get(name)
            if room is not None and room.own is not None and room.own.epoch == epoch:
                room.own.sent_to.discard(peer)
        if msg.status == P.StoreStatus.NO_KEY:  # that offline session's key is gone: a new one next time
            self.client.mailbox.forget_outbound(peer)

    def on_send_result(self, msg: P.RoomSendResult) -> None:
        with self.lock:
            waiter = self._sends.get(msg.msg_ref)
        if waiter is not None:
            try:
                waiter.put_nowait(msg)
            except queue.Full:
                pass

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
        kdc = msg.key if self._suite(msg.suite, msg.key) else None
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
        self._save()
        self.client.mailbox.ack(msg.queue_id)
        if notice:
            client.emit(RoomNotice(change.room, notice, gone=gone, joined=joined))
        with self.lock:
            early = room.take_pending() if room.name in self.rooms else []
        for sender, content, identity in early:
            self.on_sender_key(sender, content, identity)

    def _left(self, room: R.RoomSession, epoch: int) -> None:
        """Remember where this client's membership of ``room`` ended (an older add is a replay)."""
        self.left[cu.b64encode(room.uid)] = epoch
        while len(self.left) > MAX_LEFT:
            self.left.pop(next(iter(self.left)))

    def on_sender_key(self, sender: str, content: bytes, identity: bytes | None) -> None:
        """A member's sender key, opened from the pairwise session with ``sender`` (``identity``)."""
        try:
            name = R.distribution_room(content)
        except ChangeRefused as exc:
            log.info("%s", exc)
            return
        warning = None
        with self.lock:
            room = self.rooms.get(name)
            if room is None:
                return
            try:
                status = room.receive_distribution(sender, content, identity)
            except R.SplitHistory as exc:
                status, warning = "refused", str(exc)
            except ChangeRefused as exc:
                log.info("%s", exc)
                return
            retry = []
            if status == "ok":  # (a key for a later epoch: what is held waits for that change)
                retry = [m for r, m, _t in self._held if r == name and m.sender == sender]
                self._held = [h for h in self._held if not (h[0] == name and h[1].sender == sender)]
        if warning:
            self.client.emit(RoomWarning(name, warning))
            return
        self._save()
        for held in retry:
            self.on_message(held)

    def _hold(self, room: R.RoomSession, msg: P.RoomMessage) -> bool:
        """Keep a message whose sender key is on its way (bounded per sender and in time)."""
        now = time.monotonic()
        self._held = [h for h in self._held if now - h[2] < HELD_FOR_S]
        if (
            not room.awaiting_key(msg.sender, msg.payload)
            or sum(1 for h in self._held if h[1].sender == msg.sender) >= MAX_HELD_PER_SENDER
        ):
            return False
        self._held.append((room.name, msg, now))
        del self._held[:-MAX_HELD]
        return True

    def on_message(self, msg: P.RoomMessage) -> None:
        client = self.client
        try:
            sender = P.normalize_username(msg.sender)
        except SecureIMError:
            self.client.mailbox.ack(msg.queue_id)
            return
        stored_at = msg.stored_at_ms / 1000.0 if msg.queue_id else None
        with self.lock:
            room = self._by_id(msg.room_id)
            if room is None:
                self.client.mailbox.ack(
                    msg.queue_id
                )  # a room this client left (or never verified): nothing to open it with
                return
            kdc = msg.key if self._suite(room.suite_id, msg.key) else None
            try:
                opened, failure = (
                    room.open(sender, msg.payload, now=time.time(), stored_at=stored_at, kdc_key=kdc),
                    "",
                )
            except DecryptionFailed as exc:
                opened, failure = None, str(exc)
                if self._hold(room, msg):
                    if msg.queue_id:
                        self.client.mailbox.defer(msg.queue_id)  # the server keeps it until it opens here
                    return
        if opened is None:
            self.client.mailbox.ack(msg.queue_id)
            client.emit(RoomWarning(room.name, failure))
            return
        self._save()
        self.client.mailbox.ack(msg.queue_id)
        client.emit(RoomMessageReceived(room.name, sender, opened.text, opened.sent_at, stored_at))


class _Stale(Exception):
    def __init__(self, epoch: int) -> None:
        super().__init__(epoch)
        self.epoch = epoch
