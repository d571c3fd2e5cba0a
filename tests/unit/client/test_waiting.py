"""WaitingLines (secureim/client/waiting.py) driven through its Protocol: no sockets, no threads."""

from __future__ import annotations

from secureim.client import events as E
from secureim.client.conversations import PRESENCE_OFFLINE, PRESENCE_UNKNOWN
from secureim.client.waiting import (
    DROPPED,
    FULL,
    QUEUED_AWAY,
    QUEUED_NOT_READY,
    REFUSED,
    SENT,
    TOO_LONG,
    LineOutcome,
    WaitingLines,
)
from secureim.errors import ConnectionClosed, MessageRefused


class Host:
    """A WaitingHost: records what was sent; ``fail`` maps a text to the exception its send raises."""

    def __init__(self) -> None:
        self.reconnecting = False
        self.sent: list[tuple[str, str, str]] = []  # (how, peer, text)
        self.fail: dict[str, Exception] = {}
        self.ready: set[str] = set()
        self.presences: dict[str, str] = {}

    def _send(self, how: str, peer: str, text: str) -> int | None:
        if text in self.fail:
            raise self.fail[text]
        self.sent.append((how, peer, text))
        return None

    def send_message(self, peer: str, text: str) -> int | None:
        return self._send("live", peer, text)

    def send_offline(self, peer: str, text: str) -> int | None:
        return self._send("stored", peer, text)

    def has_conversation(self, peer: str) -> bool:
        return peer in self.ready

    def wait_conversation(self, peer: str, timeout_s: float = 0.0) -> bool:
        return peer in self.ready

    def presence(self, peer: str) -> str | None:
        return self.presences.get(peer)

    def why_not_ready(self, peer: str) -> str:
        return f"no conversation with {peer}"


def _lines() -> tuple[Host, WaitingLines, list[LineOutcome]]:
    host = Host()
    said: list[LineOutcome] = []
    return host, WaitingLines(host, limit=3), said


def test_lines_typed_while_away_wait_and_go_in_order_once_the_conversation_is_keyed_again():
    host, waiting, said = _lines()
    waiting.note_lost()
    assert waiting.must_queue("bob")
    for text in ("one", "two"):
        assert waiting.queue("bob", text, said.append).kind == QUEUED_AWAY
    waiting.note_reconnected("bob")
    assert waiting.must_queue("bob")  # rekeying: not keyed yet
    assert waiting.hand_over("bob", "three", said.append).kind == QUEUED_NOT_READY
    assert host.sent == []
    waiting.after_event(E.ConversationReady("bob", 1, False, False), said.append)
    assert host.sent == [("live", "bob", "one"), ("live", "bob", "two"), ("live", "bob", "three")]
    assert [o.kind for o in said[-3:]] == [SENT, SENT, SENT]
    assert waiting.unsent() == 0 and not waiting.must_queue("bob")


def test_the_limit_is_the_shared_policy_and_a_full_queue_refuses_the_line():
    _host, waiting, said = _lines()
    waiting.note_lost()
    kinds = [waiting.queue("bob", str(i), said.append).kind for i in range(4)]
    assert kinds == [QUEUED_AWAY, QUEUED_AWAY, QUEUED_AWAY, FULL]
    assert waiting.unsent() == 3


def test_a_peer_gone_offline_gets_its_lines_stored_and_an_unknown_peer_drops_them():
    host, waiting, said = _lines()
    waiting.note_lost()
    waiting.queue("bob", "b1")
    waiting.queue("eve", "e1")
    waiting.queue("eve", "e2")
    waiting.after_event(E.PeerOffline("bob"), said.append)
    assert host.sent == [("stored", "bob", "b1")]
    waiting.after_event(E.PeerUnknown("eve"), said.append)
    assert said[-1] == LineOutcome(DROPPED, "eve", count=2)
    assert waiting.unsent() == 0


def test_a_line_lost_again_stays_first_and_a_refused_one_is_said():
    host, waiting, said = _lines()
    waiting.note_lost()
    waiting.queue("bob", "lost")
    waiting.queue("bob", "after")
    host.fail["lost"] = ConnectionClosed("gone")
    waiting.flush("bob", said.append)
    assert host.sent == [] and waiting.lines == [("bob", "lost"), ("bob", "after")]
    host.fail = {"lost": MessageRefused("no")}
    waiting.flush("bob", said.append)
    assert said[0] == LineOutcome(REFUSED, "bob", "no")
    assert host.sent == [("live", "bob", "after")]


def test_send_or_queue_sends_live_stores_for_an_offline_peer_and_says_why_not():
    host, waiting, said = _lines()
    host.ready.add("bob")
    assert waiting.send_or_queue("bob", "hi", said.append).kind == SENT
    host.presences["carol"] = PRESENCE_OFFLINE
    assert waiting.send_or_queue("carol", "later", said.append).kind == SENT
    host.presences["dan"] = PRESENCE_UNKNOWN
    assert waiting.send_or_queue("dan", "x", said.append) == LineOutcome(
        REFUSED, "dan", "no conversation with dan"
    )
    host.fail["long"] = ValueError("Messages are limited")
    assert waiting.send_or_queue("bob", "long", said.append).kind == TOO_LONG
    assert host.sent == [("live", "bob", "hi"), ("stored", "carol", "later")]


def test_a_new_login_takes_over_the_waiting_lines():
    _host, old, _said = _lines()
    old.note_lost()
    old.queue("bob", "one")
    new = WaitingLines(Host())
    assert new.take_over(old, "carol") == ["bob", "carol"]
    assert new.lines == [("bob", "one")] and not new.away
