"""Presence: who came and went, who is told, and /who."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from secureim import proto as P
from secureim.errors import DatabaseError
from secureim.server.cluster.local import SIGNED_IN_ELSEWHERE
from secureim.server.ports import PresenceRuntime, PresenceTable, SessionStore

if TYPE_CHECKING:
    from secureim.server.registry import Session

log = logging.getLogger("secureim.server")


class Presence:
    def __init__(
        self,
        registry: PresenceTable,
        storage: SessionStore,
        runtime: PresenceRuntime,
        announce: Callable[[str], None],
    ) -> None:
        self.registry = registry
        self.storage = storage
        self._runtime = runtime
        self._announce = announce

    def disconnected(self, session: Session) -> None:
        was_online, peers = self.registry.remove(session)
        if not was_online or session.username is None:
            return
        username = session.username
        self._announce(f"[SERVER]: {username} disconnected. ({self.registry.online_count()} online)")
        self._runtime.cluster.user_offline(username, session.login_at)
        self._runtime.run_slow(self.session_ended, username)
        self.notify(username, peers, online=False)

    def notify(self, username: str, peers: Iterable[str], *, online: bool) -> None:
        """Tell each of ``peers`` online here that ``username`` came or went (a notice: they re-open)."""
        for peer in peers:
            peer_session = self.registry.session_of(peer)
            if peer_session is not None:
                peer_session.send(P.PeerStatus(peer=username, online=online, known=True, notice=True))

    def session_ended(self, username: str) -> None:
        try:
            self.storage.session_ended(self._runtime.node, username)
        except DatabaseError as exc:
            log.warning("session bookkeeping failed: %s", exc)

    def replaced_elsewhere(self, session: Session) -> None:
        """``session``'s user logged in on another node: end it here (the cluster announces the new one)."""
        session.gone = True  # this bookkeeping instead of disconnected(): the user is not offline
        self.registry.remove(session)
        self._runtime.run_slow(self.session_ended, session.username)
        session.close(SIGNED_IN_ELSEWHERE)

    def learn_conversation(self, cid: int, members: tuple[str, str], generation: int) -> None:
        """Another node's KDC keyed a conversation with one of our users: relay it from here too."""
        self.registry.keyed(cid, members, generation)

    def who(self, session: Session, msg: P.WhoRequest) -> None:
        users = sorted(set(self.registry.online_users()) | set(self._runtime.cluster.remote_users()))
        session.send(P.WhoResponse(users=tuple(users[: P.MAX_WHO_USERS]), total=len(users)))
