"""Sending: live (relay or direct link), stored for an offline peer, and confirmed sends.

Every message that leaves goes through here and into the one outbox (offline.Mailbox's table of
``Outgoing`` entries: live and stored, until receipted); lines that cannot leave yet wait in
``waiting.WaitingLines``.
"""

from __future__ import annotations

import logging
import time

from secureim import proto as P
from secureim.client import history as H
from secureim.client import offline as offline
from secureim.client.connection import REPLY_TIMEOUT_S, Barrier
from secureim.client.conversations import (
    KEY_EXCHANGE_WAIT_S,
    PRESENCE_OFFLINE,
    PRESENCE_REFUSED,
    PRESENCE_UNKNOWN,
)
from secureim.client.display import sanitize
from secureim.client.events import MessageDelivered, MessageNotStored, MessageStored
from secureim.client.ports import SenderConversations, SenderDirect, SenderHost, SenderLink, SenderMailbox
from secureim.e2e import sessions as e2e
from secureim.errors import ConnectionClosed, HistoryError, MessageRefused

log = logging.getLogger("secureim.client")


class Sender:
    def __init__(
        self,
        host: SenderHost,
        link: SenderLink,
        conversations: SenderConversations,
        direct: SenderDirect,
        mailbox: SenderMailbox,
    ) -> None:
        self._host = host
        self._link = link
        self._conversations = conversations
        self._direct = direct
        self._mailbox = mailbox
        self.last_sent: offline.Outgoing | None = None

    def send_live_body(self, peer: str, body_type: int, content: bytes) -> bool:
        """Seal in the live conversation with ``peer`` and relay; False when there is none ready."""
        sealed = self._conversations.seal_body(peer, body_type, content)
        if sealed is None:
            return False
        payload, cid = sealed
        # Over the direct link, as the messages it answers: the server sees none.
        if self._direct.is_direct(peer):
            self._direct.send(peer, payload, None)  # a receipt: nothing to say if it is lost
            return True
        self._link.send_frame(P.Relay(conversation_id=cid, payload=payload))
        return True

    def pending(self) -> list[offline.Outgoing]:
        """Messages sent this session with no delivery receipt yet, oldest first."""
        return self._mailbox.pending()

    def send_message(self, peer: str, text: str) -> int | None:
        """Seal ``text`` end to end for ``peer``: directly over UDP if that link is up, else via the relay.

        Returns the history row of the message (None without a history).  The server gives no
        positive answer: a refusal comes later as a ServerNotice; :meth:`send_confirmed` waits
        for it.
        """
        return self.send_sealed(peer, text, None)

    def send_offline(self, peer: str, text: str) -> int | None:
        """Seal ``text`` for ``peer`` from their prekeys and hand it to the server's queue
        (docs/PROTOCOL.md section 15): a MessageStored or MessageNotStored event answers it,
        a MessageDelivered follows once their client has opened it."""
        peer = P.normalize_username(peer)
        if peer == self._host.username:
            raise MessageRefused("That is you; messages go to someone else.")
        if self._conversations.presence(peer) in (PRESENCE_UNKNOWN, PRESENCE_REFUSED):
            raise MessageRefused(f"Not sent to {peer}: {self._conversations.why_not_ready(peer)}.")
        entry = self.last_sent = self._mailbox.send_text(peer, text, e2e.new_msg_id())
        return self.record_sent(entry, at=entry.at)

    def record_sent(self, entry: offline.Outgoing, *, at: float) -> int | None:
        """Write a message that has gone into the history, dated ``at`` (when it was sent: a reply
        that arrives before this write is still shown after it).  Its receipt may have come
        meanwhile (on another thread): whichever of the two sees the other's write marks the row
        delivered."""
        entry.row = (
            self._host.history.record(entry.peer, H.OUTGOING, entry.text, state=H.STATE_SENT, at=at)
            if self._host.history
            else None
        )
        if entry.state == offline.DELIVERED and entry.row is not None:
            self.delivered_event(entry, emit=False)
        return entry.row

    def send_sealed(
        self, peer: str, text: str, barrier: Barrier | None, *, resend: offline.Outgoing | None = None
    ) -> int | None:
        """Seal and send live; the outbox entry and the history row are written only once the
        message has gone (a line that never left is queued by the terminal and written then).
        ``resend``: the same message again, under its own id (the peer shows it once)."""
        msg_id = resend.msg_id if resend is not None else e2e.new_msg_id()
        sent_at = time.time()  # before it leaves: the peer's answer is later
        payload, cid = self._conversations.seal_live(peer, text, msg_id)
        if self._direct.is_direct(peer):
            self._direct.send(peer, payload, text)
            if barrier is not None:
                barrier.done.set()  # nothing to wait for: the direct link acknowledges by itself
        elif barrier is None:
            self._link.send_frame(P.Relay(conversation_id=cid, payload=payload))
        else:
            # the barrier is queued before the message goes: its refusal cannot come first
            self._link.barrier_after(P.Relay(conversation_id=cid, payload=payload), barrier)
        if resend is not None:
            return None
        entry = self.last_sent = self._mailbox.sent_live(peer, text, msg_id)
        return self.record_sent(entry, at=sent_at)

    def send_confirmed(
        self, peer: str, text: str, timeout_s: float = KEY_EXCHANGE_WAIT_S + REPLY_TIMEOUT_S
    ) -> offline.Outgoing:
        """Open the conversation if needed, send, and return once the server has accepted the message
        (relayed to the peer's connection) or, the peer being offline, stored it for them.

        A relayed message has no positive answer, only an Error frame when it is refused.  So a
        WhoRequest follows it as a barrier: the server handles one session's frames in order, so
        once the WhoResponse is in, any refusal has arrived.  A stored message is answered by a
        StoreResult.  :class:`MessageRefused` with the server's reason if there was one (or if
        the conversation cannot be opened); :class:`ConnectionClosed` on a lost connection or no
        answer in time.  The returned entry's ``receipted`` event is set once the peer's client
        sends its end-to-end receipt (``state`` is then "delivered").
        """
        peer = P.normalize_username(peer)
        if peer == self._host.username:
            raise MessageRefused("That is you; messages go to someone else.")
        deadline = time.monotonic() + timeout_s
        if not self._conversations.has(peer):
            if (
                self._conversations.presence(peer) == PRESENCE_REFUSED
            ):  # asking again would only start a key exchange we refuse
                raise MessageRefused(f"Not sent to {peer}: {self._conversations.why_not_ready(peer)}.")
            self._conversations.open(peer)
            if not self._conversations.wait(peer, min(KEY_EXCHANGE_WAIT_S, timeout_s)):
                if self._conversations.presence(peer) != PRESENCE_OFFLINE:
                    raise MessageRefused(f"Not sent to {peer}: {self._conversations.why_not_ready(peer)}.")
                return self._store_confirmed(peer, text, deadline)
        barrier = Barrier()
        row = self.send_sealed(peer, text, barrier)
        entry = self.last_sent
        if not barrier.done.wait(max(0.0, deadline - time.monotonic())):
            raise ConnectionClosed(f"The server at {self._host.node_id} did not answer in time.")
        if row is not None and self._host.history is not None:
            self._host.history.set_state(row, H.STATE_REFUSED if barrier.refusals else H.STATE_ACCEPTED)
        if barrier.refusals:
            raise MessageRefused(f"Not sent to {peer}: {barrier.refusals[0]}")
        assert entry is not None
        return entry

    def _store_confirmed(self, peer: str, text: str, deadline: float) -> offline.Outgoing:
        row = self.send_offline(peer, text)
        entry = self.last_sent
        assert entry is not None
        if not entry.answered.wait(max(0.0, deadline - time.monotonic())):
            raise ConnectionClosed(f"The server at {self._host.node_id} did not answer in time.")
        entry = self._mailbox.entry(entry.msg_id) or entry
        if row is not None and self._host.history is not None:  # a row already 'delivered' stays so (History)
            self._host.history.set_state(
                row, H.STATE_REFUSED if entry.state == offline.REFUSED else H.STATE_ACCEPTED
            )
        if entry.state == offline.REFUSED:
            raise MessageRefused(f"Not sent to {peer}: {entry.reason}")
        return entry

    def stored_event(self, entry: offline.Outgoing) -> None:
        if entry.state == offline.REFUSED:  # the server's reason, or our own
            self._host.emit(MessageNotStored(entry.peer, entry.text, sanitize(entry.reason, 512)))
        else:
            self._host.emit(MessageStored(entry.peer, entry.text, online=entry.state == offline.HANDED))

    def delivered_event(self, entry: offline.Outgoing, *, emit: bool = True) -> None:
        if self._host.history is not None and entry.row is not None:
            try:
                self._host.history.set_state(entry.row, H.STATE_DELIVERED)
            except HistoryError as exc:
                log.info("the history could not mark a message delivered: %s", exc)
        if emit:
            self._host.emit(MessageDelivered(entry.peer, entry.text, entry.stored))
