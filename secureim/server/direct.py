"""Direct mode: UDP endpoints and the tickets that let two clients talk without the relay
(docs/PROTOCOL.md section 12.2)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from secureim import proto as P
from secureim.e2e import datagrams as direct
from secureim.server.ports import ClusterSlot, DirectTable

if TYPE_CHECKING:
    from secureim.server.registry import Session


class DirectMode:
    def __init__(self, registry: DirectTable, runtime: ClusterSlot) -> None:
        self.registry = registry
        self._runtime = runtime

    def register_endpoint(self, session: Session, msg: P.RegisterEndpoint) -> None:
        if not 1 <= msg.port <= 65535:
            session.send(P.Error(code=P.ErrorCode.BAD_REQUEST, reason="A UDP port is between 1 and 65535."))
            return
        session.udp_port = msg.port

    def direct_request(self, session: Session, msg: P.DirectRequest) -> None:
        """Hand the initiator the peer's endpoint and a ticket only the peer can open."""
        me, peer = session.username, msg.peer
        assert me is not None
        cluster = self._runtime.cluster
        conv = self.registry.conversation_between(me, peer)
        answer: P.Message | str
        if conv is None:
            answer = (
                f"{peer} is offline."
                if self.registry.session_of(peer) is None and not cluster.is_remote(peer)
                else f"Open a conversation with {peer} first."
            )
        elif session.udp_port is None:
            answer = "Register a UDP port first."
        elif self.registry.session_of(peer) is None and cluster.is_remote(peer):
            answer = cluster.direct_offer(peer, me, session.source, session.udp_port, conv.id)
        else:
            answer = self.direct_offer_for(peer, me, session.source, session.udp_port, conv.id)
        if isinstance(answer, str):
            answer = P.DirectUnavailable(peer=peer, reason=answer)
        session.send(answer)

    def direct_offer_for(
        self, peer: str, initiator: str, host: str, port: int, conversation_id: int
    ) -> P.DirectOffer | str:
        """The offer for ``initiator`` to reach ``peer`` (online here), or why not.

        The ticket is sealed with the key only ``peer``'s session shares with this node,
        so another node asks this one for it (cluster/nats_bus.py, DIRECT)."""
        peer_session = self.registry.session_of(peer)
        if peer_session is None:
            return f"{peer} is offline."
        if peer_session.udp_port is None:
            peer_session.send(P.DirectAsked(peer=initiator))  # the peer has not opted in: tell them who asks
            return f"{peer} does not accept direct connections."
        key = peer_session.proto.direct_ticket_key
        assert key is not None
        ticket = direct.seal_ticket(
            key, initiator=initiator, host=host, port=port, conversation_id=conversation_id, now_s=time.time()
        )
        return P.DirectOffer(peer=peer, host=peer_session.source, port=peer_session.udp_port, ticket=ticket)
