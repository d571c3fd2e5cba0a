"""The Key Distribution Center and the relay: conversations opened, keyed, re-keyed, relayed.

One class: the relay decides when a conversation is re-keyed and a re-key releases the
frames the relay held meanwhile."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from secureim import proto as P
from secureim.errors import AuthError
from secureim.proto import normalize_username
from secureim.server.config import ServerConfig
from secureim.server.metrics import ServerMetrics
from secureim.server.ports import ConversationTable, KdcRuntime, KdcStore

if TYPE_CHECKING:
    from secureim.server.registry import LiveConversation, Session

MAX_HELD_RELAYS = 1024  # frames of one conversation waiting for its new key (a database write away)
RELAY_SAMPLE_MASK = 15  # the relay latency histogram times one relayed message in 16


class Conversations:
    def __init__(
        self,
        registry: ConversationTable,
        storage: KdcStore,
        runtime: KdcRuntime,
        metrics: ServerMetrics,
        config: ServerConfig,
    ) -> None:
        self.registry = registry
        self.storage = storage
        self.metrics = metrics
        self.config = config
        self._runtime = runtime
        self._kdc_lock = threading.Lock()
        self.relayed = 0  # messages relayed (the loop thread counts; the metric reads it)

    @staticmethod
    def peer_named(session: Session, raw: str, refusal: str) -> str | None:
        """``raw`` as a username, or None once the session has been told why not (invalid, or itself)."""
        try:
            peer = normalize_username(raw)
        except AuthError:
            session.send(P.PeerStatus(peer=raw, online=False, known=False))
            return None
        if peer == session.username:
            session.send(P.Error(code=P.ErrorCode.BAD_REQUEST, reason=refusal))
            return None
        return peer

    def fresh_key(self, cid: int) -> tuple[int, bytes]:
        """The conversation's next generation and a fresh key for it, under the KDC lock."""
        with self._kdc_lock:
            generation = self.storage.record_key_generation(cid)
            key = self._runtime.suite.generate_key()
        return generation, key

    def open(self, session: Session, msg: P.OpenConversation) -> None:
        me = session.username
        assert me is not None
        peer = self.peer_named(session, msg.peer, "You cannot open a conversation with yourself.")
        if peer is None:
            return
        cluster = self._runtime.cluster
        peer_session = self.registry.session_of(peer)
        if peer_session is None and not cluster.is_remote(peer):
            known = self.storage.get_password_hash(peer) is not None
            if known:  # the peer may have logged in while the database answered
                peer_session = self.registry.watch_unless_online(me, peer)
            if peer_session is None and not cluster.is_remote(peer):
                session.send(P.PeerStatus(peer=peer, online=False, known=known))
                return
        session.send(P.PeerStatus(peer=peer, online=True, known=True))
        cid = self.storage.open_conversation(me, peer)
        self.distribute_key(cid, (me, peer) if me < peer else (peer, me))

    def distribute_key(self, cid: int, members: tuple[str, str], *, rekey: bool = False) -> None:
        """KDC: a fresh key for the conversation, sent to both members, then forgotten.

        The generation comes from the database (a worker's job); the hand-out runs on the
        loop thread, in one go, so no relayed frame of this conversation can slip between
        the two members' keys (a peer's share must never arrive before the key it answers)."""
        generation, key = self.fresh_key(cid)
        self._runtime.on_loop(self._hand_out_key, cid, members, generation, key, rekey)
        del key  # never stored (design 000)

    def _hand_out_key(
        self, cid: int, members: tuple[str, str], generation: int, key: bytes, rekey: bool = False
    ) -> None:
        if rekey and cid not in self.registry.conversations:
            return  # a member left while the key was made: the conversation is over, not re-created
        self._send_keys(cid, members, generation, key)
        self._release_held(cid)

    def _send_keys(self, cid: int, members: tuple[str, str], generation: int, key: bytes) -> None:
        self.registry.keyed(cid, members, generation)
        cluster, suite = self._runtime.cluster, self._runtime.suite
        sessions = {user: self.registry.session_of(user) for user in members}
        identities = {
            user: s.identity_key if s is not None else cluster.identity_of(user)
            for user, s in sessions.items()
        }
        for user in members:
            other = members[1] if user == members[0] else members[0]
            identity = identities[other]
            if identity is None:
                continue
            msg = P.ConversationKey(
                conversation_id=cid,
                peer=other,
                suite=suite.suite_id,
                generation=generation,
                key=key,
                peer_identity=identity,
            )
            receiver = sessions[user]
            if receiver is not None:
                receiver.send(msg)
            else:  # on another node: sealed for the cluster bus (cluster/nats_bus.py)
                cluster.send_key(user, members, generation, msg)
            del msg

    # -- relay -------------------------------------------------------------------------
    def relay(self, session: Session, msg: P.Relay) -> None:
        """The hot path, on the loop thread only: no lock shared by all sessions, no database.

        The conversation table is written under the registry lock by workers; a dict
        read is atomic, and the counters below are touched by this thread alone."""
        sampled = not self.relayed & RELAY_SAMPLE_MASK  # time one relay in 16: the histogram stays cheap
        started = time.perf_counter() if sampled else 0.0
        me = session.username
        conv = self.registry.conversations.get(msg.conversation_id)
        if conv is None or me not in conv.members:
            self.metrics.undelivered.inc()
            session.send(
                P.Error(code=P.ErrorCode.NOT_A_MEMBER, reason="No such conversation; open it again.")
            )
            return
        if conv.held is not None:  # its new key is on its way: this frame goes right after it
            if len(conv.held) >= MAX_HELD_RELAYS:
                session.send(
                    P.Error(
                        code=P.ErrorCode.UNAVAILABLE,
                        reason="The conversation is being re-keyed; try again in a moment.",
                    )
                )
            else:
                conv.held.append((session, msg))
            return
        conv.messages += 1
        conv.bytes_relayed += len(msg.payload)
        peer = conv.members[0] if conv.members[1] == me else conv.members[1]
        deliver = P.Deliver(conversation_id=msg.conversation_id, sender=me, payload=msg.payload)
        peer_session = self.registry.online.get(peer)
        if peer_session is not None:
            delivered = peer_session.send(deliver)
        else:
            delivered = self._runtime.cluster.deliver(peer, deliver)
        if not delivered:
            self.metrics.undelivered.inc()
            if peer_session is None and self._runtime.cluster.is_remote(peer):
                reason = (
                    f"{peer} is temporarily unreachable (the cluster link is down); message not delivered."
                )
            else:
                reason = f"{peer} is offline; message not delivered."
            session.send(P.Error(code=P.ErrorCode.PEER_OFFLINE, reason=reason))
            return
        self.relayed += 1
        if sampled:
            self.metrics.relay_latency.observe(time.perf_counter() - started)
        if (
            conv.messages >= self.config.rekey_after_messages
            or conv.rekey_pending
            or conv.bytes_relayed >= self._runtime.suite.max_bytes_per_key // 2
            or time.monotonic() - conv.keyed_at >= self.config.rekey_after_s
        ):
            self._maybe_rekey(conv)

    def _maybe_rekey(self, conv: LiveConversation) -> None:
        age = time.monotonic() - conv.keyed_at
        if age < self.config.min_rekey_interval_s:
            conv.rekey_pending = True  # due, but not faster than the minimum interval
            return
        conv.rekey_pending = False
        conv.messages, conv.bytes_relayed, conv.keyed_at = 0, 0, time.monotonic()
        conv.held = []  # as in a one-thread server: nothing of this conversation overtakes the new key
        self._runtime.run_slow(self._rekey, conv.id, conv.members)

    def _rekey(self, cid: int, members: tuple[str, str]) -> None:
        try:
            self.distribute_key(cid, members, rekey=True)
        except Exception:
            self._runtime.on_loop(self._release_held, cid)  # no new key after all: the held frames go now
            raise

    def _release_held(self, cid: int) -> None:
        conv = self.registry.conversations.get(cid)
        if conv is None or conv.held is None:
            return
        held, conv.held = conv.held, None
        for sender, msg in held:
            if not sender.closed.is_set():
                self.relay(sender, msg)
