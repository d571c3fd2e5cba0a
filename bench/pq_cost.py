"""What the post-quantum hybrid costs: frame sizes, handshake CPU and relay CPU, in process.

Runs the sans-IO protocol (no sockets, no server process) so the numbers are the
protocol's own cost, repeatable on a shared machine:

    python bench/pq_cost.py                 # x25519 against x25519-mlkem768
    python bench/pq_cost.py --rounds 300 --json out.json

* handshake: a full client + server handshake per round, each side timed alone;
* end to end: one rekey between two clients (shares, ML-KEM replies where the
  code has them, root derivation), and the bytes each client relays for it;
* relay: the server's open + re-seal of one relayed payload (a share, a reply,
  a 100-byte chat message), as ``ChatService`` does for every Relay.

It also runs against an older checkout (``--tree PATH``, e.g. a ``git archive``
of the commit before issue 18), whose end-to-end layer had no ML-KEM replies:
that gives the "before" column of docs/PERFORMANCE.md section 5.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _load(tree: Path):
    sys.path.insert(0, str(tree))
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    import crypto_utils as cu
    import diffiehellman
    from secureim import proto as P
    from secureim.e2e import sessions as e2e

    return P, e2e, cu, Ed25519PrivateKey, diffiehellman.GROUPS


def _split(P, data: bytes) -> list[bytes]:
    frames, pos = [], 0
    while pos < len(data):
        (n,) = P.FRAME_HEADER.unpack_from(data, pos)
        frames.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return frames


def handshake(P, Ed25519PrivateKey, group: str, rounds: int) -> dict:
    identity = Ed25519PrivateKey.generate()
    client_s = server_s = 0.0
    sizes = {}
    for _ in range(rounds):
        t0 = time.perf_counter()
        client = P.ClientProtocol(group=group)
        hello = client.initiate()
        t1 = time.perf_counter()
        server = P.ServerProtocol(identity)
        server.receive_data(hello)
        flight = server.data_to_send()
        t2 = time.perf_counter()
        client.receive_data(flight)
        finished = client.data_to_send()
        t3 = time.perf_counter()
        server.receive_data(finished)
        t4 = time.perf_counter()
        client_s += (t1 - t0) + (t3 - t2)
        server_s += (t2 - t1) + (t4 - t3)
        sh, sa = _split(P, flight)
        sizes = {
            "client_hello": len(hello) - 4,
            "server_hello": len(sh),
            "server_auth": len(sa),
            "client_finished": len(finished) - 4,
        }
    return {
        "group": group,
        "client_ms": 1000 * client_s / rounds,
        "server_ms": 1000 * server_s / rounds,
        "bytes": sizes,
        "bytes_total": sum(sizes.values()) + 4 * len(sizes),
    }


def rekey(e2e, cu, Ed25519PrivateKey, rounds: int) -> dict:
    ida, idb = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    suite = cu.get_suite("3des")
    elapsed, relayed = 0.0, []
    for _ in range(rounds):
        alice = e2e.E2ESession("alice", ida, "bob", cu.public_bytes(idb), 1, suite)
        bob = e2e.E2ESession("bob", idb, "alice", cu.public_bytes(ida), 1, suite)
        key = suite.generate_key()
        t0 = time.perf_counter()
        share_a, share_b = alice.new_generation(1, key), bob.new_generation(1, key)
        reply_a, reply_b = alice.receive_share(share_b), bob.receive_share(share_a)
        payloads = [share_a, share_b]
        if isinstance(reply_a, bytes):  # the hybrid exchange answers each share with an ML-KEM reply
            alice.receive_share(reply_b)
            bob.receive_share(reply_a)
            payloads += [reply_a, reply_b]
        elapsed += time.perf_counter() - t0
        assert alice.ready and bob.ready
        relayed = payloads
    return {
        "per_client_ms": 1000 * elapsed / rounds / 2,
        "relays": len(relayed),
        "bytes_per_client": sum(len(p) for p in relayed) // 2,
        "payload_sizes": sorted({len(p) for p in relayed}),
    }


def relay(P, Ed25519PrivateKey, payload_sizes: list[int], rounds: int) -> dict:
    """Server CPU for one relayed payload: open the client's record, re-seal a Deliver."""
    out = {}
    for size in payload_sizes:
        client = P.ClientProtocol(group="x25519")
        server = P.ServerProtocol(Ed25519PrivateKey.generate())
        server.receive_data(client.initiate())
        client.receive_data(server.data_to_send())
        server.receive_data(client.data_to_send())
        server.receive_data(client.send(P.Login(username="alice", password=b"pw", identity_key=bytes(32))))
        client.receive_data(server.send(P.AuthOk(username="alice", created=False)))
        payload = bytes(size)
        records = [client.send(P.Relay(conversation_id=1, payload=payload)) for _ in range(rounds)]
        t0 = time.perf_counter()
        for record in records:
            (msg,) = server.receive_data(record)
            server.send(P.Deliver(conversation_id=msg.conversation_id, sender="alice", payload=msg.payload))
        out[size] = 1e6 * (time.perf_counter() - t0) / rounds
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument(
        "--tree",
        type=Path,
        default=Path(__file__).resolve().parent.parent,
        help="the source tree to measure (default: this checkout)",
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    P, e2e, cu, Ed25519PrivateKey, all_groups = _load(args.tree)
    groups = [g for g in ("x25519", "x25519-mlkem768") if g in all_groups]
    result = {
        "tree": str(args.tree),
        "rounds": args.rounds,
        "handshake": [handshake(P, Ed25519PrivateKey, g, args.rounds) for g in groups],
        "rekey": rekey(e2e, cu, Ed25519PrivateKey, args.rounds),
    }
    result["relay_us"] = relay(
        P, Ed25519PrivateKey, [100, *result["rekey"]["payload_sizes"]], args.rounds * 5
    )
    for h in result["handshake"]:
        print(
            f"handshake {h['group']:16} client {h['client_ms']:.3f} ms  server {h['server_ms']:.3f} ms  "
            f"bytes {h['bytes']} (total with frame headers {h['bytes_total']})"
        )
    r = result["rekey"]
    print(
        f"e2e rekey: {r['per_client_ms']:.3f} ms per client, {r['relays']} relays, "
        f"{r['bytes_per_client']} bytes relayed per client, payloads {r['payload_sizes']}"
    )
    for size, us in result["relay_us"].items():
        print(f"relay of a {size}-byte payload: {us:.1f} µs server CPU (open + re-seal, 3des)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
