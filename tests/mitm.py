"""An attacker in the middle, as a tool: a loopback TCP proxy that tampers per frame.

``tamper(direction, index, frame) -> list of frames`` sees every whole frame
(header included) in each direction ("c2s", "s2c"), numbered from 0 per
direction, and returns what to forward instead: [] drops it, [f, f] duplicates
it, a changed frame flips bits, and so on.  Every frame seen is recorded, so a
session can be replayed later.  Loopback only; every loop is bounded by the
sockets closing.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

from secureim import proto as P

Tamper = Callable[[str, int, bytes], list]


def passthrough(direction: str, index: int, frame: bytes) -> list:
    return [frame]


class MitmProxy:
    def __init__(self, target: tuple[str, int], tamper: Tamper = passthrough) -> None:
        self.target = target
        self.tamper = tamper
        self.recorded: list[tuple[str, bytes]] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()

    @property
    def address(self) -> tuple[str, int]:
        return self._listener.getsockname()[:2]

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=10)
            upstream.settimeout(None)
            with self._lock:
                self._socks += [client, upstream]
            for src, dst, direction in ((client, upstream, "c2s"), (upstream, client, "s2c")):
                t = threading.Thread(target=self._pump, args=(src, dst, direction), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        decoder = P.FrameDecoder(max_frame_bytes=1 << 31)  # the proxy forwards even oversized frames
        index = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                decoder.feed(data)
                while (body := decoder.next_frame()) is not None:
                    frame = P.FRAME_HEADER.pack(len(body)) + body  # any size: forward what came
                    with self._lock:
                        self.recorded.append((direction, frame))
                    for out in self.tamper(direction, index, frame):
                        dst.sendall(out)
                    index += 1
        except OSError:
            pass
        finally:
            for s in (dst, src):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def frames(self, direction: str) -> list[bytes]:
        with self._lock:
            return [f for d, f in self.recorded if d == direction]

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.close()
            except OSError:
                pass


def flip(frame: bytes, offset: int = -1, bit: int = 0x01) -> bytes:
    """Flip one bit of the body (default: its last byte)."""
    b = bytearray(frame)
    pos = offset if offset >= 0 else len(b) + offset
    b[max(pos, 4)] ^= bit
    return bytes(b)
