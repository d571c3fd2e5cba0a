"""Conversations: presence, the KDC keys, the end-to-end key shares, and sealing in a live session.

Every field below is guarded by ``lock`` (``changed`` is its condition: a waiter for a conversation
sleeps on it).  Nothing is sent or emitted while ``lock`` is held.
"""

from __future__ import annotations

import logging
import threading
import time

import crypto_utils as cu
from secureim import proto as P
from secureim.client.display import sanitize
from secureim.client.events import (
    ConversationReady,
    MessageRejected,
    PeerOffline,
    PeerOnline,
    PeerUnknown,
    SecurityWarning,
    ServerNotice,
)
from secureim.client.ports import ConversationsHost
from secureim.e2e import datagrams as direct
from secureim.e2e import sessions as e2e
from secureim.errors import ConnectionClosed, DecryptionFailed, SecureIMError

PRESENCE_ONLINE, PRESENCE_OFFLINE, PRESENCE_UNKNOWN, PRESENCE_REFUSED = (
    "online",
    "offline",
    "unknown",
    "refused",
)
log = logging.getLogger("secureim.client")

KEY_EXCHANGE_WAIT_S = 10.0  # how long a message waits for its conversation to be keyed


class Conversations:
    def __init__(self, host: ConversationsHost) -> None:
        self._host = host
        self.sessions: dict[str, e2e.E2ESession] = {}
        self.changed_identity: dict[str, bytes] = {}  # peer -> new key awaiting /accept
        self._opened_by_peer: dict[str, bool] = {}
        self._wanted: set[str] = set()
        self._pending_open: set[str] = set()
        self._auto_reopen: set[str] = set()  # reopened on a notice: its answer is not news
        self._presence: dict[str, str] = {}  # peer -> PRESENCE_* (what the server last said)
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)

    def on_peer_status(self, msg: P.PeerStatus) -> None:
        peer = msg.peer
        if not msg.known:
            with self.lock:
                self._wanted.discard(peer)
                self._pending_open.discard(peer)
                self._presence[peer] = PRESENCE_UNKNOWN
                self.changed.notify_all()
            self._host.emit(PeerUnknown(sanitize(peer, 64)))
            return
        if not msg.online:
            with self.lock:
                self.sessions.pop(peer, None)  # keys discarded
                self._pending_open.discard(peer)
                self._auto_reopen.discard(peer)
                self._presence[peer] = PRESENCE_OFFLINE
                self.changed.notify_all()
            self._host.close_direct_link(peer)
            self._host.emit(PeerOffline(peer))
            self._host.resend_due(peer, live=False)  # what died with a connection is stored for them
            return
        with self.lock:
            # Only an unasked notice means the peer (re)connected: a new session of the peer
            # has none of our keys, so start over.  An answer to our own request does not.
            reopen = msg.notice and peer in self._wanted and peer not in self._pending_open
            if reopen:
                self._pending_open.add(peer)
                self._auto_reopen.add(peer)
                self.sessions.pop(peer, None)
            # The answer to a reopen we made on a notice repeats what the notice said: once is enough.
            repeat = not msg.notice and peer in self._auto_reopen
            if repeat:
                self._auto_reopen.discard(peer)
            self._presence[peer] = PRESENCE_ONLINE
            self.changed.notify_all()
        if not repeat:
            self._host.emit(PeerOnline(peer))
        if reopen:  # told again automatically: open (and key) the conversation, no user action
            self._host.send_frame(P.OpenConversation(peer=peer))

    def on_key(self, msg: P.ConversationKey) -> None:
        """KDC key: check the peer's identity key, then send our signed DH share."""
        peer = msg.peer
        try:
            suite = cu.suite_by_id(msg.suite)
            P.normalize_username(peer)
            if len(msg.key) != suite.key_bytes or peer == self._host.username:
                raise DecryptionFailed()
        except SecureIMError:
            self._host.emit(ServerNotice("The server sent an unusable conversation key; it was ignored."))
            return
        username, identity = self._host.username, self._host.identity
        assert identity is not None and username is not None
        if not self._host.trust_peer(peer, msg.peer_identity):
            return
        with self.lock:
            conv = self.sessions.get(peer)
            if conv is None or conv.id != msg.conversation_id or conv.peer_identity != msg.peer_identity:
                conv = e2e.E2ESession(username, identity, peer, msg.peer_identity, msg.conversation_id, suite)
                self.sessions[peer] = conv
                self._opened_by_peer[peer] = peer not in self._wanted
            try:
                share = conv.new_generation(msg.generation, msg.key)
            except DecryptionFailed:
                return  # a stale generation
            self._wanted.add(peer)
            self._pending_open.discard(peer)
            self._presence[peer] = PRESENCE_ONLINE
            self.changed.notify_all()
        self._host.send_frame(P.Relay(conversation_id=msg.conversation_id, payload=share))

    def on_deliver(self, msg: P.Deliver) -> None:
        sender = msg.sender
        with self.lock:
            conv = self.sessions.get(sender)
            if conv is not None and conv.id != msg.conversation_id:
                conv = None
            refused = sender in self.changed_identity
        if conv is None or not msg.payload:
            if refused or msg.payload[:1] in (bytes([k]) for k in e2e.SHARE_KINDS):
                # the key share of a conversation we refused (the warning said what to do), or one
                # from before we dropped the conversation: a share carries no message
                log.debug("discarded a key share or message outside a conversation")
                return
            self._host.emit(
                MessageRejected(sanitize(sender, 64), "A message for an unknown conversation was discarded.")
            )
            return
        if msg.payload[0] in e2e.SHARE_KINDS:
            self.on_share(conv, msg.payload)
            return
        with self.lock:
            try:
                opened, failure = conv.open_message(msg.payload), ""
            except DecryptionFailed as exc:
                opened, failure = None, str(exc)
        if opened is None:
            self._host.emit(MessageRejected(sender, failure))
        else:
            self._host.on_opened(sender, opened, identity=conv.peer_identity)

    def on_share(self, conv: e2e.E2ESession, payload: bytes) -> None:
        peer = conv.peer
        with self.lock:
            was_ready = conv.ready
            reply = None
            try:
                reply = conv.receive_share(payload)  # a share is answered with our ML-KEM reply
                generation = conv.current
                warning = None
            except e2e.StaleShare:
                log.debug("a key share for an earlier generation was ignored")
                return
            except e2e.ShareRejected as exc:
                warning = str(exc)
                if self.sessions.get(peer) is conv:
                    del self.sessions[peer]
            self.changed.notify_all()
        if warning is not None:
            self._host.emit(SecurityWarning(peer, warning))
        elif reply is not None:
            self._host.send_frame(P.Relay(conversation_id=conv.id, payload=reply))
        elif not was_ready and generation is not None:
            self._host.forget_outbound(peer)  # live now: a later offline message starts afresh
            self._host.resend_due(peer, live=True)  # what may have died with the last connection goes first
            self._host.emit(
                ConversationReady(
                    peer, generation, self._opened_by_peer.get(peer, False), self._host.is_verified(peer)
                )
            )

    def open(self, peer: str) -> None:
        """Ask for ``peer``: answered by PeerOnline/PeerOffline/PeerUnknown, then ConversationReady."""
        peer = P.normalize_username(peer)
        with self.lock:
            self._wanted.add(peer)
            self._pending_open.add(peer)
            if self._presence.get(peer) != PRESENCE_REFUSED:
                self._presence.pop(peer, None)  # the answer says it again
        self._host.send_frame(P.OpenConversation(peer=peer))

    def presence(self, peer: str) -> str | None:
        """What the server last said about ``peer`` (a PRESENCE_* value), or None."""
        with self.lock:
            return self._presence.get(peer)

    def ready_peers(self) -> list[str]:
        with self.lock:
            return sorted(p for p, conv in self.sessions.items() if conv.ready)

    def wait(self, peer: str, timeout_s: float = KEY_EXCHANGE_WAIT_S) -> bool:
        """Wait (bounded) while the conversation with ``peer`` is being opened or keyed;
        True once it is ready, False as soon as it cannot be (offline, unknown, refused)."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while True:
                conv = self.sessions.get(peer)
                if conv is not None and conv.ready:
                    return True
                if self._host.closed.is_set() or self._presence.get(peer) in (
                    PRESENCE_OFFLINE,
                    PRESENCE_UNKNOWN,
                    PRESENCE_REFUSED,
                ):
                    return False
                if conv is None and peer not in self._pending_open:
                    return False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.changed.wait(remaining)

    def has(self, peer: str) -> bool:
        with self.lock:
            conv = self.sessions.get(peer)
            return conv is not None and conv.ready

    def why_not_ready(self, peer: str) -> str:
        """Why there is no conversation with ``peer``, in words (after :meth:`wait_conversation`)."""
        presence = self.presence(peer)
        if self._host.closed.is_set():
            return f"the connection to {self._host.node_id} is closed"
        if presence == PRESENCE_UNKNOWN:
            return f"{peer} does not exist"
        if presence == PRESENCE_OFFLINE:
            return f"{peer} is offline (a message to them is stored until they log in)"
        if presence == PRESENCE_REFUSED:
            return f"{peer}'s identity key changed and was refused (check the safety number, then accept it)"
        if presence == PRESENCE_ONLINE:
            return f"{peer}'s client did not complete the key exchange"
        return f"there is no conversation with {peer}"

    def channel_for(self, initiator: str, conversation_id: int, generation: int):
        with self.lock:
            conv = self.sessions.get(initiator)
            if conv is None or conv.id != conversation_id:
                return None
            try:
                keys = conv.direct_keys(generation)
            except SecureIMError:
                return None
            return direct.DatagramChannel(conv.suite, *keys)

    # -- for the other parts ------------------------------------------------------------------
    def refuse(self, peer: str, key: bytes) -> bool:
        """``peer`` presented ``key``, a changed identity key: drop the conversation until it is
        accepted.  True if that same key was refused already (warned about once)."""
        with self.lock:
            # The same refused key again (the peer reconnected, or we reopened): warned already.
            known = self.changed_identity.get(peer)
            again = known is not None and cu.constant_time_equal(known, key)
            self.changed_identity[peer] = key
            self.sessions.pop(peer, None)
            self._pending_open.discard(peer)
            self._presence[peer] = PRESENCE_REFUSED
            self.changed.notify_all()
        return again

    def clear_refused(self, peer: str) -> None:
        with self.lock:
            self.changed_identity.pop(peer, None)
            if self._presence.get(peer) == PRESENCE_REFUSED:
                del self._presence[peer]

    def changed_key(self, peer: str) -> bytes | None:
        with self.lock:
            return self.changed_identity.get(peer)

    def has_refused_key(self, peer: str) -> bool:
        return peer in self.changed_identity

    def wanted_peers(self) -> set[str]:
        """The conversations asked for (opened again after a resume)."""
        return set(self._wanted)

    def reset(self) -> None:
        """A new connection: the server knows none of our conversations any more."""
        with self.lock:
            self.sessions.clear()
            self._pending_open.clear()
            self._auto_reopen.clear()

    def wake_all(self) -> None:
        """Nobody waits for a conversation on a dead connection."""
        with self.changed:
            self.changed.notify_all()

    def seal_live(self, peer: str, text: str, msg_id: bytes) -> tuple[bytes, int]:
        """``text`` sealed in the ready conversation with ``peer``: (payload, conversation id)."""
        with self.lock:
            conv = self.sessions.get(peer)
            if conv is None or not conv.ready:
                raise ConnectionClosed(f"No open conversation with {peer}; they may be offline.")
            return conv.seal(text, msg_id), conv.id

    def seal_body(self, peer: str, body_type: int, content: bytes) -> tuple[bytes, int] | None:
        """A body (a receipt) sealed in the ready conversation with ``peer``; None when there is none."""
        with self.lock:
            conv = self.sessions.get(peer)
            if conv is None or not conv.ready:
                return None
            return conv.seal_body(body_type, e2e.new_msg_id(), content), conv.id

    def direct_offer(self, peer: str) -> tuple[e2e.E2ESession | None, tuple[bytes, bytes] | None, int | None]:
        """For a direct-link offer: the conversation, its direct keys if ready, its generation."""
        with self.lock:
            conv = self.sessions.get(peer)
            keys = conv.direct_keys() if conv is not None and conv.ready else None
            generation = conv.current if conv is not None else None
        return conv, keys, generation

    def open_link_message(self, peer: str, payload: bytes) -> tuple[e2e.Opened | None, bytes | None]:
        """A message that came over a direct link: (opened or None, the sender's identity key)."""
        with self.lock:
            conv = self.sessions.get(peer)
            try:
                opened = conv.open_message(payload) if conv else None
            except DecryptionFailed:
                opened = None
        return opened, conv.peer_identity if conv is not None else None
