"""Store and forward (docs/PROTOCOL.md section 15): prekeys, offline conversation keys, the queue.

(Not named queue.py or mailbox.py: both shadow stdlib names in tracebacks and greps.)"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

import crypto_utils as cu
from secureim import proto as P
from secureim import storage as D
from secureim.server.config import ServerConfig
from secureim.server.ports import KdcRuntime, KeyMaker, MailboxStore, RoomRows, SessionLookup

if TYPE_CHECKING:
    from secureim.server.registry import Session

log = logging.getLogger("secureim.server")

QUEUE_WINDOW = 64  # stored messages in flight to one session (unacknowledged) at most
QUEUE_EXPIRY_EVERY_S = 3600.0
MAX_ONE_TIME_PREKEYS = 200  # kept per user on the server
MAX_DB_ID = 2**63 - 1  # row ids in SQLite and MySQL are signed 64-bit: a larger u64 names nothing
MAX_TRACKED_RECIPIENTS = 100_000  # recipients whose recent offline opens are counted (oldest forgotten)


class Mailbox:
    def __init__(
        self,
        storage: MailboxStore,
        registry: SessionLookup,
        runtime: KdcRuntime,
        keys: KeyMaker,
        rows: RoomRows,
        offline_keys: cu.SealedBox,
        config: ServerConfig,
    ) -> None:
        self.storage = storage
        self.registry = registry
        self.config = config
        self._runtime = runtime
        self._keys = keys
        self._rows = rows
        # The KDC keys of offline conversations wait in the database sealed under this (every node has it).
        self._offline_keys = offline_keys
        self._opens_for: dict[str, deque] = {}  # recipient -> times of recent OfflineOpens for them
        self._opens_lock = threading.Lock()

    # -- expiry ------------------------------------------------------------------------------
    def expire_soon(self, delay_s: float) -> None:
        """Stored messages older than the queue's age bound go, now and every hour."""
        self._runtime.call_later(delay_s, self._runtime.run_slow, self.expire)

    def expire(self) -> None:
        try:
            gone = self.storage.expire_queue(time.time() - self.config.queue_max_age_s)
            if gone:
                log.info("%d stored messages expired unread", gone)
        finally:
            self._runtime.on_loop(self.expire_soon, QUEUE_EXPIRY_EVERY_S)

    # -- prekeys and offline keys --------------------------------------------------------------
    def _wrap_aad(self, recipient: str, cid: int, generation: int) -> bytes:
        return (  # after the box's label, "secureim/v1 offline kdc key"
            recipient.encode() + b"\x00" + cid.to_bytes(8, "big") + generation.to_bytes(4, "big")
        )

    def send_prekey_status(self, session: Session) -> None:
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

    def publish_prekeys(self, session: Session, msg: P.PublishPrekeys) -> None:
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
        self.send_prekey_status(session)

    def offline_open(self, session: Session, msg: P.OfflineOpen) -> None:
        """The peer's prekey bundle (one one-time prekey taken) and a fresh KDC key for an offline
        conversation; the key also waits, sealed, for the peer (docs/PROTOCOL.md section 15)."""
        me = session.username
        assert me is not None
        peer = self._keys.peer_named(session, msg.peer, "You cannot write to yourself.")
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
        generation, key = self._keys.fresh_key(cid)
        wrapped = self._offline_keys.seal(key, self._wrap_aad(peer, cid, generation))
        self.storage.put_offline_key(peer, cid, generation, me, wrapped, time.time())
        session.send(
            P.OfflineKey(
                conversation_id=cid,
                peer=peer,
                suite=self._runtime.suite.suite_id,
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

    # -- the queue ----------------------------------------------------------------------------
    def store(self, session: Session, msg: P.Store) -> None:
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
            handed = self.nudge(recipient)
            result, reason = (P.StoreStatus.HANDED_OVER if handed else P.StoreStatus.STORED), ""
        session.send(
            P.StoreResult(
                conversation_id=msg.conversation_id, msg_ref=msg.msg_ref, status=result, reason=reason
            )
        )

    def nudge(self, recipient: str) -> bool:
        """The recipient is online (here or on another node): hand them what waits now."""
        local = self.registry.session_of(recipient)
        if local is not None:
            self.push_queue(local)
            return True
        cluster = self._runtime.cluster
        if cluster.is_remote(recipient):
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
            self._runtime.on_loop(cluster.deliver, recipient, nudge)  # that node reads the queue
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
                    self._rows.row_message(me, row) if row.kind else self._stored_message(me, row)
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
            suite=self._runtime.suite.suite_id,
            generation=row.generation,
            key=key,
            sender_identity=row.sender_identity,
            stored_at_ms=int(row.stored_at * 1000),
            payload=row.payload,
        )

    def defer(self, session: Session, msg: P.Defer) -> None:
        """The client keeps the message for later (a changed identity awaiting /accept): it stays
        stored, comes again at the next login, and no longer holds up the messages behind it."""
        with session.queue_lock:
            if 0 < msg.queue_id <= session.queue_sent_upto:
                session.queue_in_flight = max(0, session.queue_in_flight - 1)
        self.push_queue(session)

    def ack(self, session: Session, msg: P.Ack) -> None:
        me = session.username
        assert me is not None
        if msg.queue_id <= MAX_DB_ID and self.storage.ack_queued(me, msg.queue_id):
            with session.queue_lock:
                session.queue_in_flight = max(0, session.queue_in_flight - 1)
            self.push_queue(session)
