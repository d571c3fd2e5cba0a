"""Stored messages coming in (docs/PROTOCOL.md section 15): each is checked against the sender's
pinned identity key, opened with this client's prekeys (the mailbox's sealed store), shown once, then
acknowledged; one from a sender whose key changed is held, unacknowledged, until /accept."""

from __future__ import annotations

import crypto_utils as cu
from secureim import proto as P
from secureim.client.ports import InboxHost, PrekeyHolder, logged_in_identity, logged_in_name
from secureim.e2e import prekeys as K
from secureim.errors import ConnectionClosed, DecryptionFailed, SecureIMError

MAX_HELD = 1000  # stored messages held while their sender's changed identity waits for /accept


class Inbox:
    def __init__(self, client: InboxHost, box: PrekeyHolder) -> None:
        self.client = client
        self._box = box
        self.lock = box.lock  # the mailbox's: the store is one
        self.held: dict[str, list[P.StoredMessage]] = {}

    @property
    def store(self) -> K.PrekeyStore | None:
        return self._box.store

    @property
    def inbound(self) -> K.InboundSessions | None:
        return self._box.inbound

    @property
    def _username(self) -> str:
        return logged_in_name(self.client)

    @property
    def _identity(self) -> cu.IdentityKey:
        return logged_in_identity(self.client)

    def on_stored(self, msg: P.StoredMessage) -> None:
        """A stored message (receiver thread, or the caller of /accept for held ones)."""
        if msg.queue_id == 0:
            return
        client = self.client
        try:
            sender = P.normalize_username(msg.sender)
            suite = cu.suite_by_id(msg.suite)
        except SecureIMError:
            client.reject(msg.sender, "A stored message with a malformed header was discarded.")
            self.ack(msg.queue_id)
            return
        if self.store is None or self.inbound is None:
            return  # no prekeys on this client (it cannot open anything stored): leave it on the server
        digest = K.payload_digest(msg.payload)
        with self.lock:
            seen = self.store.already_processed(digest)
        if seen:
            self.ack(msg.queue_id)  # delivered again (a lost acknowledgement, or a replay): shown once only
            return
        if not client.trust_peer(sender, msg.sender_identity):
            with self.lock:  # held, unacknowledged, until /accept (or the next login)
                held = self.held.setdefault(sender, [])
                if len(held) < MAX_HELD:
                    held.append(msg)
            self.defer(msg.queue_id)  # it stays on the server, and the messages behind it come on
            return
        if len(msg.key) != suite.key_bytes:  # the server lost its key: nothing to decide here
            client.reject(
                sender,
                f"A stored message from {sender} came without its key; it "
                "stays on the server for the next login.",
            )
            self.defer(msg.queue_id)
            return
        ctx = K.StoredContext(
            self._username,
            self._identity,
            sender,
            msg.sender_identity,
            msg.conversation_id,
            msg.generation,
            msg.key,
            suite,
        )
        with self.lock:
            try:
                opened = self.inbound.open(ctx, msg.payload, digest=digest)
                failure = None
            except DecryptionFailed as exc:  # it will never open: said, and not asked for again
                opened, failure = None, str(exc)
                self.store.mark_processed(digest)
        self.ack(msg.queue_id)
        if opened is None:
            client.reject(sender, failure or "A stored message could not be opened.")
            return
        client.on_opened(sender, opened, stored_at=msg.stored_at_ms / 1000.0, identity=msg.sender_identity)

    def release_held(self, peer: str) -> int:
        with self.lock:
            held = self.held.pop(peer, [])
        for msg in held:
            self.on_stored(msg)
        return len(held)

    def defer(self, queue_id: int) -> None:
        """Keep queued row ``queue_id`` on the server, for the next login (a room's held messages too)."""
        try:
            self.client.send_frame(P.Defer(queue_id=queue_id))
        except ConnectionClosed:
            pass

    def ack(self, queue_id: int) -> None:
        """Queued row ``queue_id`` reached this client: the server deletes it (0: a live frame, nothing)."""
        if not queue_id:
            return
        try:
            self.client.send_frame(P.Ack(queue_id=queue_id))
        except ConnectionClosed:
            pass  # not acknowledged: it comes again after the reconnect, and is recognised then
