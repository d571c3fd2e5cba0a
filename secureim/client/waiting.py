"""Lines that cannot leave yet: typed while the connection is away (auto-reconnect), or before a
conversation is keyed again after a reconnect, or behind such lines.  Part of the one outbox: a
line waits here, in order, until it goes (then it is an ``offline.Outgoing`` like any other).

The policy the terminal, ``client.py send``, scripts and library users share: at most
``MAX_QUEUED_LINES`` lines, memory only; each goes once, in the order typed, before anything typed
after it to the same peer; a peer that turns out not to exist drops its lines.

What happens to a line is an outcome (:class:`LineOutcome`), given to the caller's ``say``
callback at the moment it happens (so a terminal shows the lines in the order they went).
``order`` is held while a line goes out (the waiting ones first, each once); ``lock`` guards the
state.  Lock order: ``order`` -> ``lock``; neither is held by the library's own threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from secureim.client.conversations import PRESENCE_OFFLINE
from secureim.client.events import ConversationReady, PeerOffline, PeerUnknown, SecurityWarning
from secureim.client.ports import WaitingHost
from secureim.errors import ConnectionClosed, MessageRefused

MAX_QUEUED_LINES = 100  # lines typed while disconnected, each at most MAX_TEXT_BYTES

SENT, QUEUED_AWAY, QUEUED_NOT_READY, FULL, REFUSED, TOO_LONG, DROPPED = (
    "sent",
    "queued-away",
    "queued-not-ready",
    "full",
    "refused",
    "too-long",
    "dropped",
)


@dataclass(frozen=True)
class LineOutcome:
    kind: str  # one of SENT ... DROPPED
    peer: str
    text: str = ""  # the line (sent), or the reason (refused, too-long)
    count: int = 0  # dropped: how many lines


Say = Callable[[LineOutcome], None]


def _ignore(_outcome: LineOutcome) -> None:
    pass


class WaitingLines:
    def __init__(self, host: WaitingHost, *, limit: int = MAX_QUEUED_LINES) -> None:
        self._host = host
        self.limit = limit
        self.lock = threading.Lock()
        self.order = threading.Lock()  # held while a line goes out: the waiting ones first, each once
        self.away = False  # the connection is lost: until Reconnected
        self.rekeying: set[str] = set()  # after Reconnected: conversations not keyed again yet
        self.lines: list[tuple[str, str]] = []  # (peer, text), oldest first

    # -- the connection's state, as the consumer of events sees it ------------------------------
    def note_lost(self) -> None:
        """Reconnecting or Disconnected was shown: lines typed from now on wait."""
        with self.lock:
            self.away = True

    def note_reconnected(self, destination: str | None) -> None:
        """Reconnected was shown: the conversations are asked for again, each is keyed anew."""
        with self.lock:
            self.away = False
            self.rekeying = {
                p for p in [destination, *(p for p, _t in self.lines)] if p and not p.startswith("#")
            }

    def take_over(self, old: WaitingLines, destination: str | None) -> list[str]:
        """A new login after a refused ticket: the old client's waiting lines are this one's.
        The peers whose conversations must be opened again, sorted."""
        with old.lock:
            lines = list(old.lines)
        with self.lock:
            self.lines = lines
            self.away = False
            self.rekeying = {p for p in [destination, *(p for p, _t in self.lines)] if p}
            return sorted(self.rekeying)

    def unsent(self) -> int:
        with self.lock:
            return len(self.lines)

    # -- lines ---------------------------------------------------------------------------------
    def must_queue(self, peer: str) -> bool:
        """Not connected, or the conversation is not keyed again after a reconnect, or lines wait before it."""
        with self.lock:
            return (
                self.away
                or peer in self.rekeying
                or any(p == peer for p, _t in self.lines)
                or self._host.reconnecting
            )

    def queue(self, peer: str, text: str, say: Say = _ignore) -> LineOutcome:
        with self.lock:
            full = len(self.lines) >= self.limit
            if not full:
                self.lines.append((peer, text))
            away = self.away or self._host.reconnecting
        outcome = LineOutcome(FULL if full else QUEUED_AWAY if away else QUEUED_NOT_READY, peer, text)
        say(outcome)
        return outcome

    def hand_over(self, peer: str, text: str, say: Say = _ignore, *, offline: bool = False) -> LineOutcome:
        """Send now (live, or stored for an offline peer) after the lines already waiting; a line
        that never reached the server waits and goes after the reconnect, once."""
        send = self._host.send_offline if offline else self._host.send_message
        with self.order:
            if self.must_queue(peer):  # waiting lines go first
                return self.queue(peer, text, say)
            try:
                send(peer, text)
            except ValueError as exc:  # too long
                outcome = LineOutcome(TOO_LONG, peer, str(exc))
                say(outcome)
                return outcome
            except MessageRefused as exc:
                outcome = LineOutcome(REFUSED, peer, str(exc))
                say(outcome)
                return outcome
            except ConnectionClosed:
                return self.queue(peer, text, say)
        outcome = LineOutcome(SENT, peer, text)
        say(outcome)
        return outcome

    def send_or_queue(self, peer: str, text: str, say: Say = _ignore) -> LineOutcome:
        """A line for ``peer`` under the shared policy: it waits if it must; else it goes live once
        the conversation is keyed (bounded wait), or is stored when ``peer`` is offline."""
        if self.must_queue(peer):
            return self.queue(peer, text, say)
        client = self._host
        if not client.has_conversation(peer) and not client.wait_conversation(peer):
            if self.must_queue(peer):  # the connection dropped meanwhile
                return self.queue(peer, text, say)
            if client.presence(peer) == PRESENCE_OFFLINE:  # stored for them (sealed from their prekeys)
                return self.hand_over(peer, text, say, offline=True)
            outcome = LineOutcome(REFUSED, peer, client.why_not_ready(peer))
            say(outcome)
            return outcome
        return self.hand_over(peer, text, say)

    def flush(self, peer: str, say: Say = _ignore, *, offline: bool = False) -> None:
        """The conversation with ``peer`` is keyed (or ``peer`` is offline, so the lines are stored
        for them): its waiting lines go, in order, each once."""
        with self.order:
            with self.lock:
                self.rekeying.discard(peer)
            while True:
                with self.lock:
                    at = next((i for i, (p, _t) in enumerate(self.lines) if p == peer), None)
                    if at is None:
                        return
                    _peer, text = self.lines.pop(at)
                try:
                    if offline:
                        self._host.send_offline(peer, text)
                    else:
                        self._host.send_message(peer, text)
                except ConnectionClosed:  # lost again: it waits for the next reconnect, still first
                    with self.lock:
                        self.lines.insert(at, (peer, text))
                    return
                except MessageRefused as exc:
                    say(LineOutcome(REFUSED, peer, str(exc)))
                    continue
                say(LineOutcome(SENT, peer, text))

    def after_event(self, event: object, say: Say = _ignore) -> None:
        """Called by the consumer of events right after it has shown ``event``: a conversation that
        is keyed again takes its waiting lines; one that cannot be stops holding new ones."""
        peer = getattr(event, "peer", None)
        if isinstance(event, ConversationReady):
            self.flush(event.peer, say)
        elif isinstance(event, PeerOffline):
            self.flush(event.peer, say, offline=True)  # offline now: the waiting lines are stored for them
        elif isinstance(event, SecurityWarning):
            with self.lock:
                self.rekeying.discard(event.peer)  # "Not sent: ... refused" again; the lines wait
        elif isinstance(event, PeerUnknown):
            with self.lock:
                self.rekeying.discard(event.peer)
                dropped = [text for p, text in self.lines if p == peer]
                self.lines = [(p, text) for p, text in self.lines if p != peer]
            if dropped:
                say(LineOutcome(DROPPED, event.peer, count=len(dropped)))
