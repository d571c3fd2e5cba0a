"""Direct mode (docs/PROTOCOL.md section 12): a UDP socket, the links to peers, and the "direct" thread.

``lock`` guards ``links`` and ``sent``; the conversation keys are read through the conversations
part (its lock is never held while this one is).
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from secureim import proto as P
from secureim.client.display import sanitize
from secureim.client.events import (
    DirectFallback,
    DirectReady,
    DirectRequested,
    MessageRejected,
    MessageUndelivered,
)
from secureim.client.ports import DirectConversations, DirectHost
from secureim.e2e import datagrams as direct
from secureim.errors import InvalidUsername

log = logging.getLogger("secureim.client")


def _now_ms() -> int:
    return int(time.time() * 1000)


class DirectMode:
    """Off until :meth:`enable`."""

    def __init__(self, host: DirectHost, conversations: DirectConversations) -> None:
        self._host = host
        self._conversations = conversations
        self.udp: socket.socket | None = None
        self.links: direct.DirectLinks | None = None
        self.lock = threading.Lock()
        self.sent: dict[tuple[str, int], str | None] = {}  # None: a receipt
        self.thread: threading.Thread | None = None

    def enable(self) -> int:
        """Listen on UDP (on the address the server sees) and tell the server; returns the port."""
        sock, key = self._host.connection.sock, self._host.connection.proto.direct_ticket_key
        assert sock is not None and key is not None
        if self.udp is None:
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind((sock.getsockname()[0], 0))
            self.udp.settimeout(0.05)
            self.thread = threading.Thread(target=self.udp_loop, name="direct", daemon=True)
            self.thread.start()
        with self.lock:
            self.links = direct.DirectLinks(key, self._host.username or "")
        port = self.udp.getsockname()[1]
        self._host.send_frame(P.RegisterEndpoint(port=port))
        return port

    def open(self, peer: str) -> None:
        """Ask the server for ``peer``'s endpoint and a ticket; DirectReady or DirectFallback follows."""
        if self.links is None:
            self.enable()
        peer = P.normalize_username(peer)
        if self.is_direct(peer):
            self._host.emit(DirectReady(peer))
            return
        self._host.send_frame(P.DirectRequest(peer=peer))

    def is_direct(self, peer: str) -> bool:
        with self.lock:
            return self.links is not None and self.links.is_up(peer)

    def on_offer(self, msg: P.DirectOffer) -> None:
        if self.is_direct(msg.peer):
            return  # the peer dialled us meanwhile and that link is up: never replace a working link
        conv, keys, generation = self._conversations.direct_offer(msg.peer)
        if conv is None or keys is None or self.links is None or not 1 <= msg.port <= 65535:
            self._host.emit(DirectFallback(msg.peer, "the conversation is not secured yet"))
            return
        channel = direct.DatagramChannel(conv.suite, *keys)
        with self.lock:
            if self.links.is_up(msg.peer):
                return  # checked again under the lock: the peer's HELLO may have brought it up just now
            datagrams = self.links.start(
                msg.peer, (msg.host, msg.port), channel, generation or 0, msg.ticket, _now_ms()
            )
        self.sendto(datagrams)

    def sendto(self, datagrams) -> None:
        for data, addr in datagrams:
            try:
                if self.udp is not None:
                    self.udp.sendto(data, addr)
            except OSError:
                pass  # UDP is lossy anyway: retransmission or the hello timeout handles it

    def udp_loop(self) -> None:
        while not (self._host.closed.is_set() and self._host.connection.sock is None):
            udp = self.udp
            if udp is None:
                return
            try:
                data, addr = udp.recvfrom(2048)
            except TimeoutError:
                data, addr = None, None
            except OSError:
                return
            now = _now_ms()
            with self.lock:
                if self.links is None:
                    continue
                out, events = (
                    self.links.receive(data, addr, now, self._conversations.channel_for) if data else ([], [])
                )
                more, later = self.links.poll(now)
            self.sendto(out + more)
            for event in events + later:
                self.on_link_event(event)

    def on_link_event(self, event) -> None:
        if isinstance(event, direct.LinkUp):
            self._host.emit(DirectReady(event.peer))
        elif isinstance(event, direct.LinkFailed):
            self._host.emit(DirectFallback(event.peer, event.reason))
        elif isinstance(event, direct.LinkUndelivered):
            with self.lock:
                text = self.sent.pop((event.peer, event.message_id), "")
            if text is not None:
                self._host.emit(MessageUndelivered(event.peer, text))
        elif isinstance(event, direct.LinkMessage):
            opened, identity = self._conversations.open_link_message(event.peer, event.payload)
            if opened is None:
                self._host.emit(
                    MessageRejected(event.peer, f"A direct message from {event.peer} was discarded.")
                )
            else:
                self._host.on_opened(event.peer, opened, direct=True, identity=identity)

    def on_asked(self, msg: P.DirectAsked) -> None:
        try:
            self._host.emit(DirectRequested(P.normalize_username(msg.peer)))
        except InvalidUsername:
            log.debug("a direct-link request named an invalid user")

    def on_unavailable(self, msg: P.DirectUnavailable) -> None:
        self._host.emit(DirectFallback(msg.peer, sanitize(msg.reason, 512)))

    def send(self, peer: str, payload: bytes, text: str | None) -> None:
        """Over the direct link to ``peer``; ``text`` is said undelivered if the link loses it
        (None: a receipt, nothing to say)."""
        with self.lock:
            assert self.links is not None
            message_id, datagrams = self.links.send(peer, payload, _now_ms())
            self.sent[(peer, message_id)] = text
        self.sendto(datagrams)

    def close_link(self, peer: str) -> None:
        with self.lock:
            if self.links is not None:
                self.links.close(peer)

    def close(self) -> None:
        """After the connection: stop the "direct" thread and close the UDP socket."""
        if self.udp is not None:
            if self.thread is not None and self.thread is not threading.current_thread():
                self.thread.join(timeout=2)
            self.udp.close()
            self.udp = None
