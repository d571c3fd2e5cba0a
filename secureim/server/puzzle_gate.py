"""The server's puzzle gate: issues and checks the client puzzles of ``proto.puzzle``.

It holds the rotating MAC secret and the bounded cache of solutions already used, shared by
every connection, so it lives with the server (it takes a lock) and not in the sans-IO core.
"""

from __future__ import annotations

import math
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import crypto_utils as cu
from secureim.proto.puzzle import (
    CHALLENGE,
    CHALLENGE_VERSION,
    EPOCH_S,
    LIFETIME_S,
    MAX_DIFFICULTY,
    REPLAY_CACHE_MAX,
    SOLUTION_BYTES,
    digest_prefix,
    leading_zero_bits,
)


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
        h = digest_prefix(challenge, client_public)
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
