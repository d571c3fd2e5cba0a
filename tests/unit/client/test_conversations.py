"""Conversations (secureim/client/conversations.py) driven through ConversationsHost: no sockets."""

from __future__ import annotations

import threading

from secureim import proto as P
from secureim.client import events as E
from secureim.client.conversations import (
    PRESENCE_OFFLINE,
    PRESENCE_ONLINE,
    PRESENCE_REFUSED,
    PRESENCE_UNKNOWN,
    Conversations,
)


class Host:
    """A ConversationsHost that records what the part asks of the rest of the client."""

    def __init__(self) -> None:
        self.username = "alice"
        self.identity = None
        self.closed = threading.Event()
        self.node_id = "localhost:1"
        self.events: list[object] = []
        self.frames: list[P.Message] = []
        self.calls: list[tuple[str, str]] = []

    def emit(self, event: object) -> None:
        self.events.append(event)

    def send_frame(self, msg: P.Message) -> None:
        self.frames.append(msg)

    def trust_peer(self, peer: str, key: bytes) -> bool:
        return True

    def has_refused_key(self, peer: str) -> bool:
        return False

    def is_verified(self, peer: str) -> bool:
        return False

    def on_opened(self, sender, opened, *, stored_at=None, direct=False, identity=None) -> None:
        self.calls.append(("opened", sender))

    def close_direct_link(self, peer: str) -> None:
        self.calls.append(("close_direct_link", peer))

    def forget_outbound(self, peer: str) -> None:
        self.calls.append(("forget_outbound", peer))

    def resend_due(self, peer: str, *, live: bool) -> None:
        self.calls.append(("resend_due", f"{peer} live={live}"))


def test_a_peer_going_offline_drops_its_link_and_hands_what_died_to_the_store():
    host = Host()
    chats = Conversations(host)
    chats.open("bob")
    assert host.frames == [P.OpenConversation(peer="bob")]
    chats.on_peer_status(P.PeerStatus(peer="bob", online=False, known=True))
    assert chats.presence("bob") == PRESENCE_OFFLINE
    assert host.events == [E.PeerOffline("bob")]
    assert host.calls == [("close_direct_link", "bob"), ("resend_due", "bob live=False")]
    assert not chats.wait("bob", 0.0)
    assert "offline" in chats.why_not_ready("bob")


def test_an_unknown_peer_is_not_wanted_any_more_and_a_waiter_is_told_at_once():
    host = Host()
    chats = Conversations(host)
    chats.open("bob")
    chats.on_peer_status(P.PeerStatus(peer="bob", online=False, known=False))
    assert chats.presence("bob") == PRESENCE_UNKNOWN
    assert chats.wanted_peers() == set()
    assert host.events == [E.PeerUnknown("bob")]
    assert not chats.wait("bob", 5.0)  # no sleep: it cannot become ready


def test_an_unasked_notice_reopens_a_wanted_conversation_and_its_answer_is_not_said_twice():
    host = Host()
    chats = Conversations(host)
    chats.open("bob")
    chats.on_peer_status(P.PeerStatus(peer="bob", online=True, known=True))  # the answer
    chats.reset()  # (as a keyed conversation would be: no longer being opened)
    chats.on_peer_status(P.PeerStatus(peer="bob", online=True, known=True, notice=True))  # bob again
    chats.on_peer_status(P.PeerStatus(peer="bob", online=True, known=True))  # the reopen's answer
    assert host.events == [E.PeerOnline("bob"), E.PeerOnline("bob")]
    assert host.frames == [P.OpenConversation(peer="bob"), P.OpenConversation(peer="bob")]
    assert chats.presence("bob") == PRESENCE_ONLINE


def test_a_refused_key_is_warned_about_once_and_cleared_on_accept():
    chats = Conversations(Host())
    assert chats.refuse("bob", b"k" * 32) is False
    assert chats.refuse("bob", b"k" * 32) is True  # the same key again: said already
    assert chats.presence("bob") == PRESENCE_REFUSED and chats.has_refused_key("bob")
    assert chats.changed_key("bob") == b"k" * 32
    chats.clear_refused("bob")
    assert chats.presence("bob") is None and not chats.has_refused_key("bob")
