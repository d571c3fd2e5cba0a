"""The server's relay path in process, without sockets: what one relayed message costs the loop thread.

    python bench/relay_path.py [--messages 5000] [--batch 1 8] [--cipher 3des]

Two established sessions on a real ``server.Server`` (not started: no listener, no
threads); the sender's Relay records are fed to its ``Link.data_received`` as a
socket would deliver them (``--batch`` records per read), and the loop's queued
callbacks (the per-turn flush) run after each read; writes go to a counting
transport.  The figure is the best of five rounds, in microseconds per relayed
message: open the record, check the conversation, re-seal the Deliver for the
recipient, queue and flush it.  docs/PERFORMANCE.md section 0 quotes it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from secureim import proto as P
from secureim.server import config as SC
from secureim.server import net as S
from secureim.server import registry as SR


class CountingTransport:
    def __init__(self) -> None:
        self.bytes_written = 0

    def write(self, data: bytes) -> None:
        self.bytes_written += len(data)

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class TurnLoop:
    """Just enough of an event loop: call_soon queues, run_turn runs what was queued."""

    def __init__(self) -> None:
        self.queued: list = []

    def call_soon(self, fn, *args) -> None:
        self.queued.append((fn, args))

    def run_turn(self) -> None:
        queued, self.queued = self.queued, []
        for fn, args in queued:
            fn(*args)


def session(srv: S.Server, loop: TurnLoop, name: str, cipher: str):
    proto, client = P.ServerProtocol(srv.identity, suite=cipher), P.ClientProtocol(suites=(cipher,))
    proto.receive_data(client.initiate())
    client.receive_data(proto.data_to_send())
    proto.receive_data(client.data_to_send())
    proto.state = client.state = P.State.AUTHENTICATED  # as after a login
    link = S.Link(srv)
    link.loop = loop
    link.transport = CountingTransport()
    s = SR.Session(proto, link, "127.0.0.1")
    link.session = s
    s.username, s.identity_key = name, b"\x01" * 32
    srv.service.registry.online[name] = s
    return s, client, link


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="records per read")
    p.add_argument("--cipher", choices=["3des", "aes256"], default="3des")
    p.add_argument("--payload", type=int, default=180, help="bytes of end-to-end payload per message")
    args = p.parse_args(argv)
    srv = S.Server(
        SC.ServerConfig(
            data_dir=Path(tempfile.mkdtemp(prefix="secureim-relay-path-")),
            cipher=args.cipher,
            rekey_after_messages=10**9,
        )
    )
    loop = TurnLoop()
    srv.loop = loop
    srv.loop_thread_id = srv.service.loop_thread_id = threading.get_ident()
    _alice, alice_client, alice_link = session(srv, loop, "alice", args.cipher)
    session(srv, loop, "bob", args.cipher)
    srv.service.registry.keyed(1, ("alice", "bob"), 1)
    payload = b"x" * args.payload
    for batch in args.batch:
        best = float("inf")
        for _round in range(5):
            records = [
                alice_client.send(P.Relay(conversation_id=1, payload=payload)) for _ in range(args.messages)
            ]
            reads = [b"".join(records[i : i + batch]) for i in range(0, len(records), batch)]
            started = time.perf_counter()
            for data in reads:
                alice_link.data_received(data)
                loop.run_turn()
            best = min(best, (time.perf_counter() - started) / args.messages * 1e6)
            srv.service.registry.conversations[1].bytes_relayed = 0  # no rekey inside the measurement
        print(f"{args.cipher}, {batch} record(s) per read: {best:.1f} us per relayed message")
    srv.storage.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
