"""Micro-benchmarks, in process and without sockets: the per-message and per-handshake costs in docs/PERFORMANCE.md.

    python bench/micro.py [--rounds N] [--json PATH]

- ``seal+open``: one suite seal and open of a 100-byte message (the cipher floor).
- ``relay``: what the server's protocol layer spends on one relayed message: open
  the sender's sealed Relay record, decode it, encode and seal the Deliver to the
  receiver (no sockets, no threads, no registry).
- ``dh``: the server's side of one key agreement: X25519, and ffdhe2048 with its
  public-value checks (the subgroup check is a second full-size pow()).

CPU time (time.process_time), the mean over ``--rounds``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import crypto_utils as cu
from diffiehellman import DiffieHellman
from secureim import proto as P

MESSAGE = b"m" * 100
IK = bytes(32)


def per_call_us(fn, rounds: int) -> float:
    fn()  # warm up
    t0 = time.process_time()
    for _ in range(rounds):
        fn()
    return (time.process_time() - t0) / rounds * 1e6


def seal_open_us(suite_name: str, rounds: int, backend: str | None = None) -> float:
    suite = cu.get_suite(suite_name, tdes_backend=backend)
    cipher = suite.cipher(suite.generate_key())
    return per_call_us(lambda: cipher.open(cipher.seal(MESSAGE, b"aad"), b"aad"), rounds)


def _authenticated_pair(suite: str, identity: Ed25519PrivateKey, name: str):
    server = P.ServerProtocol(identity, suite=suite)
    client = P.ClientProtocol()
    server.receive_data(client.initiate())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    server.receive_data(client.send(P.Login(username=name, password=b"password", identity_key=IK)))
    client.receive_data(server.send(P.AuthOk(username=name, created=False)))
    return client, server


def relay_us(suite: str, rounds: int) -> float:
    """Server side of one relayed message: open + decode the Relay, encode + seal the Deliver."""
    identity = Ed25519PrivateKey.generate()
    alice, at_server_a = _authenticated_pair(suite, identity, "alice")
    bob, at_server_b = _authenticated_pair(suite, identity, "bob")
    relay = P.Relay(conversation_id=1, payload=MESSAGE)
    frames = [alice.send(relay) for _ in range(rounds + 1)]  # sealed by the client, outside the timing
    out = []

    frame_iter = iter(frames)

    def one():
        (msg,) = at_server_a.receive_data(next(frame_iter))
        out.append(
            at_server_b.send(
                P.Deliver(conversation_id=msg.conversation_id, sender="alice", payload=msg.payload)
            )
        )

    us = per_call_us(one, rounds)
    assert all(bob.receive_data(frame) for frame in out[:3])  # the Delivers really open at bob
    return us


def dh_ms(group: str, rounds: int) -> float:
    """The server's share of a key agreement: its key pair, then the checked shared secret."""
    peers = iter([DiffieHellman(group).public_bytes for _ in range(rounds + 1)])
    return per_call_us(lambda: DiffieHellman(group).generate_shared_secret(next(peers)), rounds) / 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2000)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    n = args.rounds
    result = {
        "seal_open_100B_us": {
            "3des": round(seal_open_us("3des", n), 1),
            "aes256": round(seal_open_us("aes256", n), 1),
            "3des_pydes": round(seal_open_us("3des", max(3, n // 500), "pydes"), 1),
        },
        "server_relay_open_reseal_us": {
            "3des": round(relay_us("3des", n), 1),
            "aes256": round(relay_us("aes256", n), 1),
        },
        "server_dh_ms": {
            "x25519": round(dh_ms("x25519", n), 3),
            "ffdhe2048": round(dh_ms("ffdhe2048", max(3, n // 100)), 2),
        },
        "machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]},
    }
    print("secureim micro-benchmarks (CPU time per call)")
    for section, values in result.items():
        print(f"  {section}: {values}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
