"""An end-to-end message that opened (live, direct or stored): shown, or what it receipts marked."""

from __future__ import annotations

import logging

from secureim.client import history as H
from secureim.client.events import MessageReceived
from secureim.client.ports import IncomingHost, IncomingMailbox, SenderKeys
from secureim.e2e import sessions as e2e

log = logging.getLogger("secureim.client")


class Incoming:
    def __init__(
        self, host: IncomingHost, mailbox: IncomingMailbox, rooms: SenderKeys, *, receipts: bool
    ) -> None:
        self._host = host
        self.mailbox = mailbox
        self.rooms = rooms
        self.receipts = receipts  # answer every message that opens with an end-to-end receipt

    def on_opened(
        self,
        sender: str,
        opened: e2e.Opened,
        *,
        stored_at: float | None = None,
        direct: bool = False,
        identity: bytes | None = None,
    ) -> None:
        """An end-to-end message opened (live, direct or stored): show it, or mark what it receipts.
        ``identity``: the sender's identity key the session was with (a room checks it against its roster)."""
        if opened.kind == e2e.BODY_RECEIPT:
            self.mailbox.on_receipt(sender, opened.receipts)
            return
        if opened.kind == e2e.BODY_SENDER_KEY:  # a room's sender key (room_client.py): nothing to show
            self.rooms.on_sender_key(sender, opened.content, identity)
            return
        if self.mailbox.seen_before(sender, opened.msg_id):
            log.debug("a message resent after a reconnect was shown already")
        else:
            self._received(
                MessageReceived(sender, opened.text, opened.sent_at, direct=direct, stored_at=stored_at)
            )
        if self.receipts:
            self.mailbox.receipt(sender, opened.msg_id)

    def _received(self, event: MessageReceived) -> None:
        history = self._host.history
        if history is not None:
            history.record(event.peer, H.INCOMING, event.text, state=H.STATE_RECEIVED)
        self._host.emit(event)
