"""Group rooms: the events the rooms part emits, its bounds, and what its two halves share."""

from __future__ import annotations

from dataclasses import dataclass

from secureim.client.display import sanitize

MAX_HELD = 200  # room messages waiting for their sender key...
MAX_HELD_PER_SENDER = 20  # ...at most this many from one member...
HELD_FOR_S = 600.0  # ...for at most this long (the freshness window)
SEND_TIMEOUT_S = 30.0
STALE_RETRIES = 3


def clean(text: str, max_chars: int = 512) -> str:
    return sanitize(text, max_chars)


class Stale(Exception):
    def __init__(self, epoch: int) -> None:
        super().__init__(epoch)
        self.epoch = epoch


@dataclass(frozen=True)
class RoomMessageReceived:
    room: str
    sender: str
    text: str
    sent_at: float
    stored_at: float | None = None


@dataclass(frozen=True)
class RoomNotice:
    """A verified membership change (or what happened to this client's own membership)."""

    room: str
    text: str
    gone: bool = False  # this client is no longer in the room (removed, or the room closed)
    joined: bool = False  # this client was just added


@dataclass(frozen=True)
class RoomWarning:
    """A membership change or room message that did not verify: refused, shown loudly."""

    room: str
    text: str


@dataclass(frozen=True)
class RoomSent:
    room: str
    text: str
    online: int
    stored: int
    note: str = ""
