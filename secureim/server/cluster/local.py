"""What crosses server nodes: presence, relayed frames, KDC keys, replacements, direct-mode requests.

A single server (one process, no ``--cluster``) uses ``LocalCluster``: nobody is
remote, nothing is started.  ``--cluster nats://HOST:PORT`` uses ``NatsCluster``
(nats_bus.py).  The service asks the cluster only when a user is not online
on this node, so the one-node hot path never touches it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from secureim import proto as P

if TYPE_CHECKING:
    from secureim.server.cluster.host import ClusterHost

SIGNED_IN_ELSEWHERE = "You signed in from another place; this session was closed."


class Cluster:
    """The interface the chat service uses (it serves the cluster as a ``host.ClusterHost``).
    Every method is safe from any thread."""

    def start(self, host: ClusterHost) -> None:
        """Begin serving for ``host`` (its loop and pool are attached)."""

    def stop(self) -> None:
        """Leave the cluster: our users are announced offline where that is possible."""

    def health(self) -> str | None:
        """None when healthy, else what is wrong (the /healthz answer)."""
        return None

    # -- presence ---------------------------------------------------------------------
    def user_online(self, username: str, login_at: float, identity_key: bytes) -> None:
        """``username`` logged in on this node (other nodes drop an older session)."""

    def user_offline(self, username: str, login_at: float) -> None:
        """``username``'s session on this node ended."""

    def is_remote(self, username: str) -> bool:
        """Whether ``username`` is online on another node (as far as this node knows)."""
        return False

    def identity_of(self, username: str) -> bytes | None:
        """A remote user's identity key, as their node announced it."""
        return None

    def remote_users(self) -> list[str]:
        return []

    # -- delivery -----------------------------------------------------------------------
    def deliver(self, username: str, msg: P.Message) -> bool:
        """Send ``msg`` to ``username`` on their node; False if not remote or unreachable now."""
        return False

    def send_key(
        self, username: str, members: tuple[str, str], generation: int, msg: P.ConversationKey
    ) -> bool:
        """A KDC key for a remote member; their node learns the conversation too."""
        return False

    def direct_offer(
        self, peer: str, initiator: str, host: str, port: int, conversation_id: int
    ) -> P.DirectOffer | str:
        """Ask ``peer``'s node for a direct-mode offer; the offer, or why not."""
        return f"{peer} is offline."


class LocalCluster(Cluster):
    """One node: everyone is local."""
