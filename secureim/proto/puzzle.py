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
import math
import struct
import threading
import time
from collections import OrderedDict
from typing import Callable

import crypto_utils as cu

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


def _digest_prefix(challenge: bytes, client_public: bytes):
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
    prefix = _digest_prefix(challenge, client_public)
    limit = max_tries if max_tries is not None else 1 << (difficulty + 6)
    for counter in range(limit):
        solution = counter.to_bytes(SOLUTION_BYTES, "big")
        h = prefix.copy()
        h.update(solution)
        if leading_zero_bits(h.digest()) >= difficulty:
            return solution
    raise ValueError("No puzzle solution found within the work bound.")


class PuzzleGate:
    """Issues and checks puzzles.  Thread-safe; one per server."""

    def __init__(
        self,
        mode: str = "auto",
        *,
        base_difficulty: int = 16,
        load_threshold: int = 64,
        load: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if mode not in ("off", "auto", "always"):
            raise ValueError("puzzle mode is off, auto or always")
        self.mode = mode
        self.base_difficulty = min(base_difficulty, MAX_DIFFICULTY)
        self.load_threshold = load_threshold
        self._load = load
        self._clock = clock
        self._master = cu.random_bytes(32)
        self._used: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def difficulty(self) -> int:
        """Bits asked of a new connection now (0 = no puzzle)."""
        if self.mode == "off":
            return 0
        load = self._load()
        if self.mode == "always":
            extra = 0
        elif load < self.load_threshold:
            return 0
        else:
            extra = 2 * int(math.log2(max(1, load // self.load_threshold)))
        return min(MAX_DIFFICULTY, self.base_difficulty + extra)

    def _secret(self, epoch: int) -> bytes:
        return cu.hmac_sha256(self._master, epoch.to_bytes(4, "big"))

    def _mac(self, epoch: int, issued_at: int, difficulty: int, source: str) -> bytes:
        data = struct.pack(">IB", issued_at, difficulty) + source.encode("utf-8", "replace")
        return cu.hmac_sha256(self._secret(epoch), data)[:16]

    def issue(self, source: str, difficulty: int) -> bytes:
        now = int(self._clock())
        epoch = now // EPOCH_S
        return CHALLENGE.pack(
            CHALLENGE_VERSION, epoch, now, difficulty, self._mac(epoch, now, difficulty, source)
        )

    def check(
        self, source: str, challenge: bytes, client_public: bytes, solution: bytes, required: int
    ) -> str | None:
        """None if the solution is good; otherwise why not."""
        try:
            version, epoch, issued_at, difficulty, mac = CHALLENGE.unpack(challenge)
        except struct.error:
            return "malformed puzzle challenge"
        now = int(self._clock())
        if version != CHALLENGE_VERSION or epoch not in (now // EPOCH_S, now // EPOCH_S - 1):
            return "expired puzzle challenge"
        if not 0 <= now - issued_at <= LIFETIME_S:
            return "expired puzzle challenge"
        if not cu.constant_time_equal(mac, self._mac(epoch, issued_at, difficulty, source)):
            return "puzzle challenge not issued to this address"
        if difficulty < required:
            return "puzzle too easy for the current load"
        if len(solution) != SOLUTION_BYTES:
            return "malformed puzzle solution"
        h = _digest_prefix(challenge, client_public)
        h.update(solution)
        if leading_zero_bits(h.digest()) < difficulty:
            return "wrong puzzle solution"
        token = cu.sha256(challenge + solution)
        with self._lock:
            if token in self._used:
                return "puzzle solution already used"
            self._used[token] = None
            while len(self._used) > REPLAY_CACHE_MAX:
                self._used.popitem(last=False)
        return None
