"""A stateless client puzzle (design 002's DoS defence), issued before any costly work.

When the server is under load (or told to always ask), it answers a ClientHello
that carries no valid solution with a Puzzle: a challenge MACed under a rotating
server secret and bound to the client's address and the time.  The client must
find a ``solution`` so that

    SHA-256("secureim/v1 puzzle" || challenge || client DH public value || solution)

starts with ``difficulty`` zero bits, and send the ClientHello again with both.
The server checks the MAC, the address, the age and the hash (microseconds)
before it spends a DH exponentiation or a bcrypt check.  The only state is a
bounded cache of solutions already used, so one solution cannot be replayed.
Difficulty adapts to the number of half-open connections (like Tor's onion
service proof of work: nothing asked when the server is calm).
"""

from __future__ import annotations

import hashlib
import struct
from typing import Protocol

PUZZLE_LABEL = b"secureim/v1 puzzle"
CHALLENGE = struct.Struct(">BIIB16s")  # version, epoch, issued_at (s), difficulty, mac
CHALLENGE_VERSION = 1
LIFETIME_S = 60  # a challenge must be solved within this
EPOCH_S = 300  # the MAC secret rotates this often
MAX_DIFFICULTY = 22  # the server never asks for more
CLIENT_MAX_DIFFICULTY = 24  # a client refuses to work harder than this
SOLUTION_BYTES = 8
REPLAY_CACHE_MAX = 100_000


def leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def digest_prefix(challenge: bytes, client_public: bytes):
    h = hashlib.sha256(PUZZLE_LABEL)
    h.update(challenge)
    h.update(client_public)
    return h


def solve(challenge: bytes, client_public: bytes, difficulty: int, max_tries: int | None = None) -> bytes:
    """Find a solution (expected 2^difficulty hashes; bounded)."""
    if difficulty > CLIENT_MAX_DIFFICULTY:
        raise ValueError(
            f"The server asks for a {difficulty}-bit puzzle; at most {CLIENT_MAX_DIFFICULTY} is done."
        )
    prefix = digest_prefix(challenge, client_public)
    limit = max_tries if max_tries is not None else 1 << (difficulty + 6)
    for counter in range(limit):
        solution = counter.to_bytes(SOLUTION_BYTES, "big")
        h = prefix.copy()
        h.update(solution)
        if leading_zero_bits(h.digest()) >= difficulty:
            return solution
    raise ValueError("No puzzle solution found within the work bound.")


class PuzzleChecker(Protocol):
    """What the server's handshake needs of the puzzle gate (``server.puzzle_gate.PuzzleGate``)."""

    def difficulty(self) -> int: ...
    def issue(self, source: str, difficulty: int) -> bytes: ...
    def check(
        self, source: str, challenge: bytes, client_public: bytes, solution: bytes, required: int
    ) -> str | None: ...
