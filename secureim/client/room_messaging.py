"""Room messages: this client's sender key to each verified member, sealing and sending, and
opening what members send (held, bounded, while their sender key is on its way)."""

from __future__ import annotations

import logging
import queue
import time

from secureim import proto as P
from secureim.client.ports import RoomMessagingHost, RoomRegistry
from secureim.client.room_events import (
    HELD_FOR_S,
    MAX_HELD,
    MAX_HELD_PER_SENDER,
    SEND_TIMEOUT_S,
    STALE_RETRIES,
    RoomMessageReceived,
    RoomSent,
    RoomWarning,
    clean,
)
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


class RoomMessaging:
    def __init__(self, host: RoomMessagingHost, rooms: RoomRegistry) -> None:
        self._host = host
        self._rooms = rooms
        self._sends: dict[bytes, queue.Queue] = {}
        self._key_refs: dict[bytes, tuple[str, int, str]] = {}  # Store ref -> (room, epoch, member)
        self._held: list[tuple[str, P.RoomMessage, float]] = []  # (room, message, held since)

    def send(self, name: str, text: str) -> RoomSent:
        """Seal ``text`` for the room and hand it to the server (its sender key first, where due)."""
        room = self._rooms.room(name)
        if len(text.encode("utf-8")) > e2e.MAX_TEXT_BYTES:
            raise ValueError(f"Messages are limited to {e2e.MAX_TEXT_BYTES} bytes.")
        msg_id = e2e.new_msg_id()
        note = ""
        for _attempt in range(STALE_RETRIES + 2):
            note, own = self._distribute(room)
            with self._rooms.lock:
                if room.name not in self._rooms.rooms:
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
                self._host.send_frame(send)
                try:
                    result = waiter.get(timeout=SEND_TIMEOUT_S)
                except queue.Empty:
                    raise ConnectionClosed("The server did not answer in time.") from None
            finally:
                with self._rooms.lock:
                    self._sends.pop(msg_id, None)
            if result.status == P.RoomStatus.STALE:
                self._rooms.wait_epoch(room, result.epoch)  # sealed again for the members as they are now
                if room.epoch < result.epoch:
                    raise RoomError(
                        f"the server's {room.name} has a membership change this client refused or "
                        "has not received (see any warning above); nothing was sent to members "
                        "this client cannot vouch for."
                    )
                continue
            if result.status != P.RoomStatus.OK:
                raise RoomError(clean(result.reason) or "The server refused the message.")
            return RoomSent(room.name, text, result.online, result.stored, clean(result.reason) or note)
        raise RoomError(f"{room.name} kept changing while the message was sent; it was not sent.")

    def _distribute(self, room: R.RoomSession):
        """This epoch's sender key to every verified member who does not have it yet, each over
        a pairwise session with the identity key the roster gives them.  (a note, the key sent)."""
        with self._rooms.lock:
            content, missing = room.distribution()
            own, roster = room.own, dict(room.roster)
        failed = []
        for peer in missing:
            try:
                ref = self._host.mailbox.send_body(
                    peer, e2e.BODY_SENDER_KEY, content, expect_identity=roster[peer]
                )
            except (MessageRefused, ValueError, SecureIMError) as exc:
                if isinstance(exc, ConnectionClosed):
                    raise
                log.info("a room sender key was not sent: %s", exc)
                failed.append(peer)
                continue
            with self._rooms.lock:
                assert own is not None  # distribution() made this epoch's key
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
        with self._rooms.lock:
            entry = self._key_refs.pop(msg.msg_ref, None)
            if entry is None or msg.status in (P.StoreStatus.STORED, P.StoreStatus.HANDED_OVER):
                return
            name, epoch, peer = entry
            room = self._rooms.rooms.get(name)
            if room is not None and room.own is not None and room.own.epoch == epoch:
                room.own.sent_to.discard(peer)
        if msg.status == P.StoreStatus.NO_KEY:  # that offline session's key is gone: a new one next time
            self._host.mailbox.forget_outbound(peer)

    def on_send_result(self, msg: P.RoomSendResult) -> None:
        with self._rooms.lock:
            waiter = self._sends.get(msg.msg_ref)
        if waiter is not None:
            try:
                waiter.put_nowait(msg)
            except queue.Full:
                pass

    def on_sender_key(self, sender: str, content: bytes, identity: bytes | None) -> None:
        """A member's sender key, opened from the pairwise session with ``sender`` (``identity``)."""
        try:
            name = R.distribution_room(content)
        except ChangeRefused as exc:
            log.info("%s", exc)
            return
        warning = None
        with self._rooms.lock:
            room = self._rooms.rooms.get(name)
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
            self._host.emit(RoomWarning(name, warning))
            return
        self._rooms.save()
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
        client = self._host
        try:
            sender = P.normalize_username(msg.sender)
        except SecureIMError:
            self._host.mailbox.ack(msg.queue_id)
            return
        stored_at = msg.stored_at_ms / 1000.0 if msg.queue_id else None
        with self._rooms.lock:
            room = self._rooms.by_id(msg.room_id)
            if room is None:
                self._host.mailbox.ack(
                    msg.queue_id
                )  # a room this client left (or never verified): nothing to open it with
                return
            kdc = msg.key if self._rooms.suite(room.suite_id, msg.key) else None
            try:
                opened, failure = (
                    room.open(sender, msg.payload, now=time.time(), stored_at=stored_at, kdc_key=kdc),
                    "",
                )
            except DecryptionFailed as exc:
                opened, failure = None, str(exc)
                if self._hold(room, msg):
                    if msg.queue_id:
                        self._host.mailbox.defer(msg.queue_id)  # the server keeps it until it opens here
                    return
        if opened is None:
            self._host.mailbox.ack(msg.queue_id)
            client.emit(RoomWarning(room.name, failure))
            return
        self._rooms.save()
        self._host.mailbox.ack(msg.queue_id)
        client.emit(RoomMessageReceived(room.name, sender, opened.text, opened.sent_at, stored_at))
