"""The client's side of store and forward (docs/PROTOCOL.md section 15): one per ChatClient.

- **Sending** to a peer with no live conversation: an offline session from the peer's prekey
  bundle (``prekeys.OutboundSession``), one Store per message.  The server answers each with a
  StoreResult; a resend after a reconnect repeats the same bytes and the same reference, which
  the server does not store twice.
- **Receiving** StoredMessage frames: the sender's identity is checked against the pinned key
  (a change holds the messages, unacknowledged, until ``/accept``), the payload is opened with
  this client's private prekeys, and only then is it acknowledged (the server deletes it).
  A redelivered payload (the same bytes again) is acknowledged and not shown twice.
- **Receipts**: every text message that opens, live or stored, is answered with an end-to-end
  receipt (its 16-byte id, sealed in the conversation), so the sender sees "delivered" from the
  recipient's client, never from the server.  Receipts are sent by a thread of their own: the
  receiver thread never waits for the server.

Everything is bounded: the outbox (``MAX_OUTBOX``), the held messages (``MAX_HELD``), the
receipt queue (``MAX_RECEIPT_JOBS``).
"""

from __future__ import annotations

import collections
import logging
import threading
import time

import crypto_utils as cu
from secureim import proto as P
from secureim.client.courier import Courier
from secureim.client.inbox import MAX_HELD as MAX_HELD
from secureim.client.inbox import Inbox
from secureim.client.outgoing import DELIVERED as DELIVERED
from secureim.client.outgoing import HANDED as HANDED
from secureim.client.outgoing import REFUSED as REFUSED
from secureim.client.outgoing import SENDING as SENDING
from secureim.client.outgoing import SENT as SENT
from secureim.client.outgoing import STORED as STORED
from secureim.client.outgoing import Outgoing as Outgoing
from secureim.client.ports import MailboxHost, logged_in_identity, logged_in_name
from secureim.e2e import prekeys as K
from secureim.e2e import sessions as e2e
from secureim.errors import ConnectionClosed, MessageRefused, SecureIMError

log = logging.getLogger("secureim.offline")

OPEN_TIMEOUT_S = 15.0  # waiting for an offline key (a database write and a prekey take on the server)
MAX_OUTBOX = 1000  # sent messages remembered until delivered (oldest delivered ones go first)
MAX_RECEIPT_JOBS = 10000
MAX_EARLY_RECEIPTS = 256  # receipts that overtook the bookkeeping of the message they answer
MAX_SEEN_IDS = K.MAX_SEEN_IDS  # ids of messages shown, so a resend after a reconnect is shown once
OUTBOUND_MAX_AGE_S = 24 * 3600.0  # an offline session to a peer is used this long at most, then a new one


def _keep_bounded(kept: collections.OrderedDict, key, value, limit: int) -> None:
    """Add ``key`` to an insertion-ordered memory of at most ``limit`` items: the oldest go."""
    kept[key] = value
    while len(kept) > limit:
        kept.popitem(last=False)


def _mark_delivered(entry: Outgoing) -> None:
    entry.state = DELIVERED
    entry.receipted.set()


class Mailbox:
    def __init__(self, client: MailboxHost) -> None:
        self.client = client
        self.lock = threading.RLock()
        self.store: K.PrekeyStore | None = None
        self.inbound: K.InboundSessions | None = None
        self.outbound: dict[str, tuple[K.OutboundSession, float]] = {}  # peer -> (session, made at)
        self.outbox: collections.OrderedDict[bytes, Outgoing] = collections.OrderedDict()
        self._open_failure: dict[str, str] = {}
        self._answered: dict[str, K.OutboundSession] = {}  # the answer to the OfflineOpen in flight
        # One OfflineOpen in flight per peer: a second one's answer would overwrite the first's in
        # _answered.  Another thread that wants the same peer waits for it and takes its session.
        self._opening: set[str] = set()
        self._open_done = threading.Condition(self.lock)
        self.courier = Courier(client, self, max_jobs=MAX_RECEIPT_JOBS)
        self.inbox = Inbox(client, self)
        self.published: threading.Event = (
            threading.Event()
        )  # the server holds a current bundle of ours (tests wait on it)
        self._seen: collections.OrderedDict[tuple[str, bytes], None] = collections.OrderedDict()
        # A live message is written into the outbox once it has gone; over a fast link (direct UDP on
        # one machine) its receipt can come back first.  Such receipts wait here, bounded, for sent_live.
        self._early: collections.OrderedDict[tuple[str, bytes], None] = collections.OrderedDict()

    # -- setup ------------------------------------------------------------------------

    @property
    def _username(self) -> str:
        return logged_in_name(self.client)

    @property
    def _identity(self) -> cu.IdentityKey:
        return logged_in_identity(self.client)

    def open_store(self, home, username: str, server_id: str, password: str) -> None:
        self.store = K.PrekeyStore(home, username, server_id, password)
        self.inbound = K.InboundSessions(self.store)
        with self.lock:
            for item in self.store.seen_ids:
                peer, _, text = item.partition("|")
                try:
                    self._seen[(peer, cu.b64decode(text))] = None
                except SecureIMError:
                    continue

    def change_password(self, password: str) -> None:
        if self.store is not None:
            with self.lock:
                self.store.change_password(password)

    def save(self) -> None:
        """At close: what only memory knew (the ids of messages shown) goes into the sealed store."""
        if self.store is not None:
            with self.lock:
                self.store.save()

    def forget_outbound(self, peer: str) -> None:
        """A live conversation is up, or the peer's identity was changed or accepted: the next
        offline message starts from a fresh bundle (and a fresh identity check)."""
        with self.lock:
            self.outbound.pop(peer, None)

    def on_prekey_status(self, msg: P.PrekeyStatus) -> None:
        """Top up one-time prekeys and renew the signed prekey when due (the receiver thread)."""
        if self.store is None or self.client.identity is None:
            return
        with self.lock:
            plan = self.store.plan_publish(self._identity, msg.one_time_left, msg.signed_prekey_id)
        if plan is None:
            self.published.set()
            return
        signed, one_time, replace = plan
        self.client.send_frame(P.PublishPrekeys(signed_prekey=signed, one_time=one_time, replace=replace))

    # -- sending ----------------------------------------------------------------------
    def outbound_for(self, peer: str) -> K.OutboundSession:
        deadline = time.monotonic() + OPEN_TIMEOUT_S
        with self.lock:
            while True:
                held = self.outbound.get(peer)
                if held is not None and time.monotonic() - held[1] < OUTBOUND_MAX_AGE_S:
                    return held[0]
                if peer not in self._opening:
                    break
                left = deadline - time.monotonic()  # another thread's open to this peer: wait for it
                if left <= 0:
                    raise ConnectionClosed(f"The server at {self.client.node_id} did not answer in time.")
                self._open_done.wait(left)
            self.outbound.pop(peer, None)
            self._answered.pop(peer, None)  # a late answer to an open that timed out is not ours
            self._open_failure.pop(peer, None)
            self._opening.add(peer)
        try:
            barrier = self.client.barrier_after(P.OfflineOpen(peer=peer))
            if not barrier.done.wait(OPEN_TIMEOUT_S):
                raise ConnectionClosed(f"The server at {self.client.node_id} did not answer in time.")
            with self.lock:
                # This request's own answer: a live conversation that came up meanwhile may have
                # dropped the cached session already (forget_outbound), but this one was asked for.
                out = self._answered.pop(peer, None)
                failure = self._open_failure.pop(peer, None)
        finally:
            with self.lock:
                self._opening.discard(peer)
                self._open_done.notify_all()
        if out is None:
            raise MessageRefused(
                failure
                or (
                    barrier.refusals[0]
                    if barrier.refusals
                    else f"no offline conversation with {peer} could be opened"
                )
            )
        return out

    def send_text(self, peer: str, text: str, msg_id: bytes, *, retried: bool = False) -> Outgoing:
        """Seal ``text`` for offline ``peer`` and hand it to the server's queue (answered by a StoreResult)."""
        content = text.encode("utf-8")
        if len(content) > e2e.MAX_TEXT_BYTES:
            raise ValueError(f"Messages are limited to {e2e.MAX_TEXT_BYTES} bytes.")
        out = self.outbound_for(peer)
        with self.lock:
            payload = out.seal(e2e.BODY_TEXT, msg_id, content)
            entry = Outgoing(msg_id, peer, text, time.time(), SENDING, stored=True, retried=retried)
            entry.store = P.Store(
                conversation_id=out.id, generation=out.generation, msg_ref=msg_id, payload=payload
            )
            self._remember(entry)
        self.client.send_frame(entry.store)
        return entry

    def sent_live(self, peer: str, text: str, msg_id: bytes) -> Outgoing:
        """A live message has gone: remembered until its receipt, or delivered at once when the
        receipt overtook it (see on_receipt)."""
        entry = Outgoing(msg_id, peer, text, time.time(), SENT)
        with self.lock:
            early = (peer, msg_id) in self._early
            if early:
                del self._early[(peer, msg_id)]
                _mark_delivered(entry)
            else:
                self._remember(entry)
        if early:
            self.client.delivered_event(entry)
        return entry

    def _remember(self, entry: Outgoing) -> None:
        _keep_bounded(self.outbox, entry.msg_id, entry, MAX_OUTBOX)  # delivered ones are gone already

    def resend_unanswered(self) -> int:
        """After a reconnect: every Store the server did not answer goes again, byte for byte."""
        with self.lock:
            again = [e.store for e in self.outbox.values() if e.state == SENDING and e.store is not None]
        for store in again:
            self.client.send_frame(store)
        return len(again)

    def entry(self, msg_id: bytes) -> Outgoing | None:
        """The newest state of a sent message (a reseal replaces its entry)."""
        with self.lock:
            return self.outbox.get(msg_id)

    def seen_before(self, peer: str, msg_id: bytes) -> bool:
        """Whether ``peer``'s message ``msg_id`` was shown already (then it is not shown again)."""
        key = (peer, msg_id)
        with self.lock:
            if key in self._seen:
                return True
            _keep_bounded(self._seen, key, None, MAX_SEEN_IDS)
            if self.store is not None:  # saved with the store's next write (and at close)
                self.store.seen_ids.append(f"{peer}|{cu.b64encode(msg_id)}")
            return False

    def after_reconnect(self) -> None:
        """Live messages with no receipt may have died with the connection: each goes again, under
        its own id, once its conversation is keyed again (or stored, the peer being offline)."""
        with self.lock:
            for entry in self.outbox.values():
                if entry.state == SENT:
                    entry.resend_due = True

    def resend_due(self, peer: str, *, live: bool) -> None:
        with self.lock:
            due = [e for e in self.outbox.values() if e.peer == peer and e.resend_due and e.state == SENT]
            for entry in due:
                entry.resend_due = False
        for entry in due:
            if live:
                self.courier.resend_live(entry)  # now, before anything typed after the reconnect
            else:
                self.courier.resend(entry)

    def pending(self) -> list[Outgoing]:
        with self.lock:
            return [e for e in self.outbox.values() if e.state not in (DELIVERED, REFUSED)]

    def on_offline_key(self, msg: P.OfflineKey) -> None:
        """The server's answer to OfflineOpen (receiver thread): check everything, then keep the session."""
        client = self.client
        peer = msg.peer
        try:
            P.normalize_username(peer)
            suite = cu.suite_by_id(msg.suite)
        except SecureIMError:
            return
        if not client.trust_peer(peer, msg.peer_identity):
            with self.lock:
                self._open_failure[peer] = client.why_not_ready(peer)
            return
        try:
            bundle = K.verify_bundle(peer, msg.peer_identity, msg.signed_prekey, msg.one_time_prekey)
            out = K.OutboundSession(
                self._username,
                self._identity,
                peer,
                msg.peer_identity,
                msg.conversation_id,
                msg.generation,
                msg.key,
                suite,
                bundle,
            )
        except (K.BundleRejected, SecureIMError) as exc:
            with self.lock:
                self._open_failure[peer] = str(exc)
            client.warn(peer, str(exc))
            return
        with self.lock:
            self.outbound[peer] = (out, time.monotonic())
            self._answered[peer] = out

    def on_store_result(self, msg: P.StoreResult) -> None:
        with self.lock:
            entry = self.outbox.get(msg.msg_ref)
            if entry is None:
                self.client.on_room_key_stored(msg)  # a room's sender key (or a receipt): not in the outbox
                return
            if entry.state != SENDING:
                return  # the answer to a resend that was answered already
            entry.store = None
            # A receipt that came first is the peer's word that it has the message: final.
            retry = msg.status == P.StoreStatus.NO_KEY and not entry.retried and not entry.receipt_early
            if retry:
                self.outbound.pop(entry.peer, None)
            elif msg.status == P.StoreStatus.STORED:
                entry.state = STORED
            elif msg.status == P.StoreStatus.HANDED_OVER:
                entry.state = HANDED
            else:
                entry.state, entry.reason = REFUSED, msg.reason
        if retry:
            self.courier.resend(entry)
            return
        if entry.receipt_early:  # both are said, in their order: stored (or handed over), delivered
            if entry.state != REFUSED:
                self.client.stored_event(entry)
            with self.lock:
                _mark_delivered(entry)
                self.outbox.pop(entry.msg_id, None)
            self.client.delivered_event(entry)
            entry.answered.set()
            return
        entry.answered.set()
        self.client.stored_event(entry)

    # -- receiving (inbox.py) ---------------------------------------------------------
    def on_stored(self, msg: P.StoredMessage) -> None:
        self.inbox.on_stored(msg)

    def release_held(self, peer: str) -> int:
        return self.inbox.release_held(peer)

    def defer(self, queue_id: int) -> None:
        self.inbox.defer(queue_id)

    def ack(self, queue_id: int) -> None:
        self.inbox.ack(queue_id)

    def on_receipt(self, peer: str, ids: tuple[bytes, ...]) -> None:
        """An authenticated receipt from ``peer``: only their own messages are marked."""
        delivered = []
        with self.lock:
            for msg_id in ids:
                entry = self.outbox.get(msg_id)
                if entry is None:  # perhaps not written yet (sent_live): kept a while, bounded
                    _keep_bounded(self._early, (peer, msg_id), None, MAX_EARLY_RECEIPTS)
                elif entry.peer == peer and entry.state == SENDING:
                    entry.receipt_early = True  # its StoreResult is still on the way and says it
                elif entry.peer == peer and entry.state != DELIVERED:
                    _mark_delivered(entry)
                    delivered.append(entry)
                    del self.outbox[msg_id]  # done: the outbox keeps what may still need us
        for entry in delivered:
            self.client.delivered_event(entry)

    # -- receipts and retries, off the receiver thread (courier.py) ------------------------
    def receipt(self, peer: str, msg_id: bytes) -> None:
        self.courier.receipt(peer, msg_id)

    def send_body(
        self, peer: str, body_type: int, content: bytes, *, expect_identity: bytes | None = None
    ) -> bytes:
        """Seal ``content`` in the offline session with ``peer`` and Store it (a receipt, a room's
        sender key): kept by the server until the peer's client acknowledges it.  Its reference.
        ``expect_identity``: only if the session is with that identity key (a room's roster)."""
        out = self.outbound_for(peer)
        if expect_identity is not None and not cu.constant_time_equal(out.peer_identity, expect_identity):
            raise MessageRefused(f"{peer}'s identity key is not the one the room's admin vouched for")
        with self.lock:
            msg_id = e2e.new_msg_id()
            payload = out.seal(body_type, msg_id, content)
        self.client.send_frame(
            P.Store(conversation_id=out.id, generation=out.generation, msg_ref=msg_id, payload=payload)
        )
        return msg_id

    def refuse(self, entry: Outgoing, reason: str) -> None:
        """A message that cannot be stored after all (its reseal failed): said, and answered."""
        with self.lock:
            entry.state, entry.reason = REFUSED, reason
        entry.answered.set()
        self.client.stored_event(entry)
