"""Peers' identity keys: pinned on first use; a changed key is refused, loudly and once, until accepted."""

from __future__ import annotations

from pathlib import Path

import crypto_utils as cu
from secureim.client.events import SecurityWarning
from secureim.client.pinning import PendingKeys
from secureim.client.ports import RefusedKeys, TrustHost
from secureim.e2e import sessions as e2e


class PeerTrustKeeper:
    def __init__(self, host: TrustHost, refused: RefusedKeys) -> None:
        self._host = host
        self._refused = refused
        self.peer_trust: e2e.PeerTrust | None = None

    def start(self, home: Path, username: str, server_id: str) -> None:
        """At login: this user's pinned peer keys."""
        self.peer_trust = e2e.PeerTrust(home, username, server_id)

    def check(self, peer: str, key: bytes) -> bool:
        """Pin on first use; a changed key is refused loudly, once per key, until /accept."""
        assert self.peer_trust is not None
        try:
            self.peer_trust.check(peer, key)
            return True
        except e2e.IdentityChanged as exc:
            again = self._refused.refuse(peer, key)
            self.pending_keys().put(peer, key)  # so /accept works after a restart too
            self._host.forget_outbound(peer)
            if not again:
                self._host.emit(SecurityWarning(peer, str(exc)))
            return False

    def pending_keys(self) -> PendingKeys:
        assert self.peer_trust is not None
        return PendingKeys(self.peer_trust.path.with_name(self.peer_trust.path.name + ".changed"))

    def changed_key(self, peer: str) -> bytes | None:
        key = self._refused.changed_key(peer)
        return key if key is not None else self.pending_keys().get(peer)

    def safety_number(self, peer: str) -> str | None:
        """The safety number with ``peer``'s pinned (or newly presented) identity key."""
        username, identity = self._host.username, self._host.identity
        assert self.peer_trust is not None and identity is not None and username is not None
        key = self.changed_key(peer) or self.peer_trust.pinned(peer)
        if key is None:
            return None
        return e2e.safety_number(username, cu.public_bytes(identity), peer, key)

    def accept(self, peer: str, *, reopen: bool = True) -> bool:
        """Accept ``peer``'s changed identity key (the one last presented, remembered across
        restarts of this client), then open the conversation again (``reopen=False``: the caller
        does, once it has said so, so that its line comes before the ConversationReady)."""
        assert self.peer_trust is not None
        key = self.changed_key(peer)
        if key is None:
            return False
        self._refused.clear_refused(peer)
        self.peer_trust.accept(peer, key)
        self.pending_keys().remove(peer)
        self._host.forget_outbound(peer)
        self._host.release_held(peer)  # stored messages that waited for this decision
        if reopen:
            self._host.open_conversation(peer)
        return True

    def mark_verified(self, peer: str) -> bool:
        assert self.peer_trust is not None
        return self.peer_trust.mark_verified(peer)

    def is_verified(self, peer: str) -> bool:
        return self.peer_trust is not None and self.peer_trust.is_verified(peer)
