"""Direct mode's datagram channel (sans-IO): reliable, ordered, authenticated messages over UDP.

UDP loses, duplicates and reorders datagrams.  A :class:`DatagramChannel` is one
direction pair between two clients, keyed from their end-to-end session (the
payloads it carries are already sealed end to end; this layer adds what UDP
lacks).  It never touches a socket: ``send()`` and ``poll()`` return datagrams
to write, ``receive()`` returns events.

- Every datagram carries a fresh sequence number and a timestamp, both under the
  MAC (AEAD associated data).  A datagram from anyone without the key, a
  tampered one, one older than the freshness window, or a sequence number seen
  before (a bounded bitmap window, RFC 6479 style, as WireGuard) is dropped.
- Messages are split into fragments of at most ``MAX_FRAGMENT_BYTES`` (well below
  a path MTU), each acknowledged; unacknowledged fragments are sent again with
  exponential backoff (retransmissions use new sequence numbers); after
  ``MAX_RETRIES`` the message is reported as not delivered.
- The receiver reassembles (bounded: messages in progress, bytes buffered) and
  delivers messages once each, in order.

:class:`DirectLinks` adds the rest of direct mode (tickets, the HELLO, one link
per peer); clientlib owns the UDP socket.  docs/PROTOCOL.md section 12.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import crypto_utils as cu
from secureim.errors import DecryptionFailed

VERSION = 1
TYPE_DATA, TYPE_ACK = 1, 2
HEADER = struct.Struct(">BBQQ")  # version, type, sequence number, timestamp (ms)
DATA = struct.Struct(">IHH")  # message id, fragment index, fragment count
ACK_ITEM = struct.Struct(">IH")  # message id, fragment index

MAX_FRAGMENT_BYTES = 1024  # plus ~60 bytes of header and tag: under 1280 (IPv6 minimum MTU)
MAX_MESSAGE_BYTES = 64 * 1024
MAX_FRAGMENTS = -(-MAX_MESSAGE_BYTES // MAX_FRAGMENT_BYTES)
MAX_ACK_ITEMS = 64
REPLAY_WINDOW = 8192  # WireGuard's window, in sequence numbers
FRESHNESS_MS = 60_000  # datagrams older (or further ahead) than this are dropped
INITIAL_RTO_MS = 200
MAX_RTO_MS = 2_000
MAX_RETRIES = 8
MAX_IN_FLIGHT_MESSAGES = 256  # sender: unacknowledged messages
MAX_PENDING_MESSAGES = 256  # receiver: messages being reassembled or waiting for order
MAX_PENDING_BYTES = 1 << 20


@dataclass(frozen=True)
class Delivered:
    message_id: int
    payload: bytes


@dataclass(frozen=True)
class Acknowledged:
    message_id: int


@dataclass(frozen=True)
class DeliveryFailed:
    message_id: int
    reason: str


class ReplayWindow:
    """Accept each sequence number once, within ``size`` of the highest seen (RFC 6479)."""

    def __init__(self, size: int = REPLAY_WINDOW) -> None:
        self.size = size
        self.highest = -1
        self._bits = 0  # bit i set: sequence number (highest - i) was seen

    def check(self, seq: int) -> bool:
        """True if ``seq`` is new and inside the window (does not record it)."""
        if seq > self.highest:
            return True
        offset = self.highest - seq
        return offset < self.size and not (self._bits >> offset) & 1

    def record(self, seq: int) -> None:
        if seq > self.highest:
            shift = seq - self.highest
            self._bits = ((self._bits << shift) | 1) & ((1 << self.size) - 1)
            self.highest = seq
        else:
            self._bits |= 1 << (self.highest - seq)


@dataclass
class _Outgoing:
    fragments: list[bytes]
    unacked: set[int]
    retries: dict[int, int] = field(default_factory=dict)
    due_ms: dict[int, int] = field(default_factory=dict)


@dataclass
class _Incoming:
    count: int
    parts: dict[int, bytes] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.parts.values())


class DatagramChannel:
    """One end of a direct channel.  ``send_key`` and ``recv_key`` are the two directions' keys."""

    def __init__(self, suite: cu.Suite, send_key: bytes, recv_key: bytes) -> None:
        self._send = suite.cipher(suite.key_from_material(send_key))
        self._recv = suite.cipher(suite.key_from_material(recv_key))
        self._seq = 0
        self._window = ReplayWindow()
        self._next_message_id = 1
        self._outgoing: dict[int, _Outgoing] = {}
        self._incoming: dict[int, _Incoming] = {}
        self._complete: dict[int, bytes] = {}
        self._next_to_deliver = 1
        self._acks: list[tuple[int, int]] = []
        self.dropped = 0  # datagrams refused (stranger, tampered, replayed, stale, malformed)

    # -- sealing ------------------------------------------------------------------------
    def _seal(self, kind: int, body: bytes, now_ms: int) -> bytes:
        if self._seq >= (1 << 64) - 1:
            raise DecryptionFailed("The direct channel used up its sequence numbers.")
        header = HEADER.pack(VERSION, kind, self._seq, now_ms)
        self._seq += 1
        return header + self._send.seal(body, header)

    def _open(self, datagram: bytes, now_ms: int) -> tuple[int, bytes] | None:
        if len(datagram) < HEADER.size:
            return None
        version, kind, seq, ts = HEADER.unpack_from(datagram)
        if version != VERSION or kind not in (TYPE_DATA, TYPE_ACK) or abs(now_ms - ts) > FRESHNESS_MS:
            return None
        if not self._window.check(seq):
            return None  # replayed, or too far behind the window
        try:
            body = self._recv.open(datagram[HEADER.size :], datagram[: HEADER.size])
        except DecryptionFailed:
            return None  # a stranger's or a tampered datagram
        self._window.record(seq)  # only authentic datagrams move the window
        return kind, body

    # -- sending ------------------------------------------------------------------------
    def send(self, payload: bytes, now_ms: int) -> tuple[int, list[bytes]]:
        """Queue one message; returns its id and the datagrams to write now."""
        if len(payload) > MAX_MESSAGE_BYTES:
            raise ValueError(f"Direct messages are limited to {MAX_MESSAGE_BYTES} bytes.")
        if len(self._outgoing) >= MAX_IN_FLIGHT_MESSAGES:
            raise ValueError("Too many direct messages waiting for acknowledgement.")
        message_id = self._next_message_id
        self._next_message_id += 1
        chunks = [
            payload[i : i + MAX_FRAGMENT_BYTES] for i in range(0, len(payload), MAX_FRAGMENT_BYTES)
        ] or [b""]
        out = _Outgoing(chunks, set(range(len(chunks))))
        self._outgoing[message_id] = out
        datagrams = []
        for index in range(len(chunks)):
            out.retries[index] = 0
            out.due_ms[index] = now_ms + INITIAL_RTO_MS
            datagrams.append(self._data(message_id, index, out, now_ms))
        return message_id, datagrams

    def _data(self, message_id: int, index: int, out: _Outgoing, now_ms: int) -> bytes:
        body = DATA.pack(message_id, index, len(out.fragments)) + out.fragments[index]
        return self._seal(TYPE_DATA, body, now_ms)

    def poll(self, now_ms: int) -> tuple[list[bytes], list]:
        """Retransmissions and pending ACKs due now, and failure events."""
        datagrams, events = [], []
        for message_id, out in list(self._outgoing.items()):
            for index in sorted(out.unacked):
                if out.due_ms[index] > now_ms:
                    continue
                if out.retries[index] >= MAX_RETRIES:
                    del self._outgoing[message_id]
                    events.append(DeliveryFailed(message_id, "The peer did not acknowledge it."))
                    break
                out.retries[index] += 1
                out.due_ms[index] = now_ms + min(MAX_RTO_MS, INITIAL_RTO_MS << out.retries[index])
                datagrams.append(self._data(message_id, index, out, now_ms))
        datagrams += self.flush_acks(now_ms)
        return datagrams, events

    def next_timeout_ms(self) -> int | None:
        dues = [due for out in self._outgoing.values() for i, due in out.due_ms.items() if i in out.unacked]
        return min(dues) if dues else None

    def flush_acks(self, now_ms: int) -> list[bytes]:
        out = []
        while self._acks:
            batch, self._acks = self._acks[:MAX_ACK_ITEMS], self._acks[MAX_ACK_ITEMS:]
            out.append(self._seal(TYPE_ACK, b"".join(ACK_ITEM.pack(m, i) for m, i in batch), now_ms))
        return out

    # -- receiving ------------------------------------------------------------------------
    def receive(self, datagram: bytes, now_ms: int) -> list:
        """Events from one datagram (nothing, for anything refused)."""
        opened = self._open(datagram, now_ms)
        if opened is None:
            self.dropped += 1
            return []
        kind, body = opened
        return self._on_ack(body) if kind == TYPE_ACK else self._on_data(body)

    def _on_ack(self, body: bytes) -> list:
        events: list[Acknowledged] = []
        if len(body) % ACK_ITEM.size:
            return events
        for pos in range(0, len(body), ACK_ITEM.size):
            message_id, index = ACK_ITEM.unpack_from(body, pos)
            out = self._outgoing.get(message_id)
            if out is None:
                continue
            out.unacked.discard(index)
            if not out.unacked:
                del self._outgoing[message_id]
                events.append(Acknowledged(message_id))
        return events

    def _on_data(self, body: bytes) -> list:
        if len(body) < DATA.size:
            return []
        message_id, index, count = DATA.unpack_from(body)
        chunk = body[DATA.size :]
        if not 0 < count <= MAX_FRAGMENTS or index >= count or len(chunk) > MAX_FRAGMENT_BYTES:
            return []
        self._acks.append((message_id, index))  # acknowledge even duplicates: the first ACK may be lost
        if message_id < self._next_to_deliver or message_id in self._complete:
            return []  # already delivered or complete: a duplicate
        if message_id >= self._next_to_deliver + MAX_PENDING_MESSAGES:
            self._acks.pop()  # too far ahead: not accepted, so not acknowledged
            return []
        incoming = self._incoming.setdefault(message_id, _Incoming(count))
        if incoming.count != count:
            return []
        if self._pending_bytes() + len(chunk) > MAX_PENDING_BYTES:
            self._acks.pop()
            return []
        incoming.parts[index] = chunk
        if len(incoming.parts) == count:
            del self._incoming[message_id]
            self._complete[message_id] = b"".join(incoming.parts[i] for i in range(count))
        events = []
        while self._next_to_deliver in self._complete:  # in order, once each
            events.append(Delivered(self._next_to_deliver, self._complete.pop(self._next_to_deliver)))
            self._next_to_deliver += 1
        return events

    def _pending_bytes(self) -> int:
        return sum(i.size for i in self._incoming.values()) + sum(len(p) for p in self._complete.values())


# =============================================================================
# Finding the peer: tickets and links (section 12.2)
# =============================================================================
TYPE_HELLO = 3
HELLO = struct.Struct(">BBIH")  # version, type 3, e2e generation, ticket length
HELLO_PAYLOAD = b"\x00secureim/v1 direct hello"
KIND_CHAT = b"\x01"
TICKET_LIFETIME_S = 30
HELLO_TIMEOUT_MS = 3_000  # no answer by then: fall back to the relay
_TICKET = struct.Struct(">16sQQQ")  # ticket id, issued_at, expires_at, conversation id
_TICKET_LABEL = "direct ticket"  # the associated data: "secureim/v1 direct ticket"
MAX_SEEN_TICKETS = 10_000


@dataclass(frozen=True)
class DirectTicket:
    ticket_id: bytes
    conversation_id: int
    initiator: str
    host: str
    port: int
    expires_at: int


def seal_ticket(
    key: bytes, *, initiator: str, host: str, port: int, conversation_id: int, now_s: float
) -> bytes:
    """Made by the server for the *peer*, under the key only the peer and the server share."""
    now = int(now_s)
    plain = (
        _TICKET.pack(cu.random_bytes(16), now, now + TICKET_LIFETIME_S, conversation_id)
        + bytes([len(initiator)])
        + initiator.encode()
        + bytes([len(host)])
        + host.encode()
        + port.to_bytes(2, "big")
    )
    return cu.SealedBox(key, _TICKET_LABEL).seal(plain)


def open_ticket(key: bytes, ticket: bytes, now_s: float) -> DirectTicket:
    try:
        plain = cu.SealedBox(key, _TICKET_LABEL).open(ticket)
        tid, _issued, expires, cid = _TICKET.unpack_from(plain)
        pos = _TICKET.size
        n = plain[pos]
        initiator = plain[pos + 1 : pos + 1 + n].decode("ascii")
        pos += 1 + n
        m = plain[pos]
        host = plain[pos + 1 : pos + 1 + m].decode("ascii")
        port = int.from_bytes(plain[pos + 1 + m : pos + 3 + m], "big")
    except (DecryptionFailed, ValueError, IndexError, struct.error, UnicodeDecodeError):
        raise DecryptionFailed("A direct-mode ticket was refused.") from None
    if expires < now_s:
        raise DecryptionFailed("An expired direct-mode ticket was refused.")
    return DirectTicket(tid, cid, initiator, host, port, expires)


@dataclass(frozen=True)
class LinkUp:
    peer: str


@dataclass(frozen=True)
class LinkFailed:
    peer: str
    reason: str


@dataclass(frozen=True)
class LinkMessage:
    peer: str
    payload: bytes


@dataclass(frozen=True)
class LinkUndelivered:
    peer: str
    message_id: int


@dataclass
class _Link:
    peer: str
    addr: tuple
    channel: DatagramChannel
    up: bool
    started_ms: int
    hello_id: int = 0


class DirectLinks:
    """All of one client's direct links (sans-IO).  Datagrams out are (bytes, address) pairs."""

    def __init__(self, ticket_key: bytes, me: str = "") -> None:
        self._ticket_key = ticket_key
        self.me = me
        self._links: dict[str, _Link] = {}
        self._by_addr: dict[tuple, str] = {}
        self._seen_tickets: dict[bytes, int] = {}
        self.refused = 0

    def is_up(self, peer: str) -> bool:
        link = self._links.get(peer)
        return link is not None and link.up

    def start(
        self, peer: str, addr: tuple, channel: DatagramChannel, generation: int, ticket: bytes, now_ms: int
    ) -> list[tuple[bytes, tuple]]:
        """Initiator: the HELLO (the peer's ticket, then a first sealed datagram)."""
        self._drop(peer)
        hello_id, (first,) = channel.send(HELLO_PAYLOAD, now_ms)
        link = _Link(peer, addr, channel, up=False, started_ms=now_ms, hello_id=hello_id)
        self._links[peer] = link
        self._by_addr[addr] = peer
        return [(HELLO.pack(VERSION, TYPE_HELLO, generation, len(ticket)) + ticket + first, addr)]

    def _drop(self, peer: str) -> None:
        old = self._links.pop(peer, None)
        if old is not None and self._by_addr.get(old.addr) == peer:
            del self._by_addr[old.addr]

    def receive(self, datagram: bytes, addr: tuple, now_ms: int, channel_for) -> tuple[list, list]:
        """(datagrams to send, events).  ``channel_for(initiator, conversation_id, generation)``
        returns a channel keyed from that end-to-end session, or None."""
        if len(datagram) >= HELLO.size and datagram[1] == TYPE_HELLO:
            return self._on_hello(datagram, addr, now_ms, channel_for)
        peer = self._by_addr.get(addr)
        link = self._links.get(peer) if peer else None
        if link is None:
            self.refused += 1  # a stranger: nobody we set up a link with
            return [], []
        events: list[LinkUp | LinkMessage] = []
        out: list[tuple[bytes, tuple]] = []
        for ev in link.channel.receive(datagram, now_ms):
            if isinstance(ev, Acknowledged) and ev.message_id == link.hello_id and not link.up:
                link.up = True
                events.append(LinkUp(link.peer))
            elif isinstance(ev, Delivered) and ev.payload[:1] == KIND_CHAT:
                events.append(LinkMessage(link.peer, ev.payload[1:]))
        out += [(d, link.addr) for d in link.channel.flush_acks(now_ms)]
        return out, events

    def _on_hello(self, datagram: bytes, addr: tuple, now_ms: int, channel_for) -> tuple[list, list]:
        _v, _t, generation, n = HELLO.unpack_from(datagram)
        ticket, first = datagram[HELLO.size : HELLO.size + n], datagram[HELLO.size + n :]
        try:
            t = open_ticket(self._ticket_key, ticket, now_ms / 1000)
        except DecryptionFailed:
            self.refused += 1
            return [], []
        if t.ticket_id in self._seen_tickets:
            self.refused += 1  # a replayed ticket
            return [], []
        pending = self._links.get(t.initiator)
        if pending is not None and not pending.up and self.me < t.initiator:
            return [], []  # both dialled at once: the smaller name's hello wins, so ours
        channel = channel_for(t.initiator, t.conversation_id, generation)
        if channel is None:
            self.refused += 1
            return [], []
        events = channel.receive(first, now_ms)
        if events != [Delivered(1, HELLO_PAYLOAD)]:
            self.refused += 1  # the sender does not hold the end-to-end keys
            return [], []
        self._seen_tickets[t.ticket_id] = t.expires_at
        self._expire_tickets(now_ms / 1000)
        # The caller is who the ticket says, proven by the sealed datagram; replies go where it came from.
        self._drop(t.initiator)
        link = _Link(t.initiator, addr, channel, up=True, started_ms=now_ms)
        self._links[t.initiator] = link
        self._by_addr[addr] = t.initiator
        return [(d, addr) for d in channel.flush_acks(now_ms)], [LinkUp(t.initiator)]

    def _expire_tickets(self, now_s: float) -> None:
        for tid in [tid for tid, exp in self._seen_tickets.items() if exp < now_s]:
            del self._seen_tickets[tid]
        while len(self._seen_tickets) > MAX_SEEN_TICKETS:
            del self._seen_tickets[next(iter(self._seen_tickets))]

    def send(self, peer: str, payload: bytes, now_ms: int) -> tuple[int, list[tuple[bytes, tuple]]]:
        link = self._links[peer]
        message_id, datagrams = link.channel.send(KIND_CHAT + payload, now_ms)
        return message_id, [(d, link.addr) for d in datagrams]

    def poll(self, now_ms: int) -> tuple[list, list]:
        out: list[tuple[bytes, tuple]] = []
        events: list[LinkFailed | LinkUndelivered] = []
        for peer, link in list(self._links.items()):
            if not link.up and now_ms - link.started_ms > HELLO_TIMEOUT_MS:
                self._drop(peer)
                events.append(LinkFailed(peer, "no direct path (a firewall or NAT in the way?)"))
                continue
            datagrams, failures = link.channel.poll(now_ms)
            out += [(d, link.addr) for d in datagrams]
            for f in failures:
                if f.message_id == link.hello_id and not link.up:
                    continue
                events.append(LinkUndelivered(peer, f.message_id))
        return out, events

    def close(self, peer: str) -> None:
        self._drop(peer)
