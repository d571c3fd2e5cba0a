"""Sender (secureim/client/sending.py) driven through its Protocols: no sockets, no threads."""

from __future__ import annotations

import time
from types import SimpleNamespace

from secureim import proto as P
from secureim.client import history as H
from secureim.client import offline
from secureim.client.sending import Sender


def _clock_moves_on() -> None:
    """Let the wall clock pass the current millisecond (the history dates rows in ms)."""
    start = time.time()
    while time.time() - start < 0.003:
        pass


class Link:
    """A SenderLink whose send is slow, and during which the peer's answer is written (as the
    receiver thread would) before the sender has written its own row."""

    def __init__(self, history: H.History) -> None:
        self.history = history
        self.frames: list[P.Message] = []

    def send_frame(self, msg: P.Message) -> None:
        self.frames.append(msg)
        _clock_moves_on()
        self.history.record("bob", H.INCOMING, "roger that, over", state=H.STATE_RECEIVED)
        _clock_moves_on()

    def barrier_after(self, msg: P.Message, barrier: object = None) -> object:
        raise AssertionError("not used here")


class Mailbox:
    def sent_live(self, peer: str, text: str, msg_id: bytes) -> offline.Outgoing:
        return offline.Outgoing(msg_id, peer, text, time.time(), offline.SENT)


def test_a_sent_message_is_dated_when_it_left_so_an_answer_written_first_shows_after_it(tmp_path):
    history = H.History.open(tmp_path, "alice", "127.0.0.1:5151", "alice-password")
    try:
        host = SimpleNamespace(username="alice", node_id="n", history=history, emit=lambda event: None)
        conversations = SimpleNamespace(seal_live=lambda peer, text, msg_id: (b"sealed", 7))
        direct = SimpleNamespace(is_direct=lambda peer: False)
        link = Link(history)
        sender = Sender(host, link, conversations, direct, Mailbox())  # type: ignore[arg-type]
        row = sender.send_sealed("bob", "the eagle lands at noon", None)
        assert row is not None and [type(f) for f in link.frames] == [P.Relay]
        shown = [(e.direction, e.text) for e in history.last("bob", 5).entries]
        assert shown == [("out", "the eagle lands at noon"), ("in", "roger that, over")]
    finally:
        history.close()
