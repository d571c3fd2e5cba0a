"""One message in the outbox: ``Outgoing``, and the states it goes through until its receipt.

A leaf of the client package: the outbox (``offline``), its worker (``courier``), the sender and
the Protocols of ``ports`` all name it, so it imports none of them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from secureim import proto as P

# Outgoing states
SENDING, SENT, STORED, HANDED, DELIVERED, REFUSED = (
    "sending",
    "sent",
    "stored",
    "handed over",
    "delivered",
    "refused",
)


@dataclass
class Outgoing:
    msg_id: bytes
    peer: str
    text: str
    at: float
    state: str
    stored: bool = False  # went through the server's queue
    reason: str = ""
    retried: bool = False  # resealed once after its offline key expired
    resend_due: bool = False  # live, no receipt when the connection dropped: send it again
    row: int | None = None  # its row in the local history (marked delivered on the receipt)
    receipt_early: bool = False  # the peer's receipt came before the server's StoreResult
    answered: threading.Event = field(default_factory=threading.Event, repr=False)  # stored or refused
    receipted: threading.Event = field(default_factory=threading.Event, repr=False)  # delivered
    store: P.Store | None = None  # kept until the server answers: a resend repeats it exactly
