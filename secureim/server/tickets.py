"""Resumption tickets: log in again after a reconnect without the password or bcrypt.

At every login the server issues a ticket: the username, the identity key, an
expiry and the account's ticket epoch, sealed with AES-256-GCM under a ticket key that lives in the server's
data directory (mode 0600), so tickets survive a restart.  The client keeps its
ticket in memory only (never on disk) and presents it with Resume inside the
encrypted session; the server opens it (microseconds, no bcrypt, no database)
and answers with a fresh ticket.  docs/PROTOCOL.md section 7.1 states what a
ticket does and does not protect.  The epoch is the one thing the server checks
in its database: a password change increments it (section 13), which ends every
ticket issued before.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import crypto_utils as cu
from secureim.errors import ConfigError, InvalidCredentials
from secureim.proto.limits import TICKET_LIFETIME_S

TICKET_VERSION = 2
_HEADER = struct.Struct(">BQQI")  # version, issued_at, expires_at, the account's ticket epoch
_LABEL = "ticket"  # the associated data: "secureim/v1 ticket"
KEY_FILE = "ticket.key"


def load_or_create_ticket_key(data_dir: Path) -> bytes:
    path = Path(data_dir) / KEY_FILE
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise ConfigError(f"Ticket key {path} is accessible by others; run: chmod 600 {path}")
        key = path.read_bytes()
        if len(key) != 32:
            raise ConfigError(f"Ticket key {path} is not 32 bytes.")
        return key
    key = cu.random_bytes(32)
    cu.write_private_file(path, key, exclusive=True)
    return key


class TicketIssuer:
    def __init__(self, key: bytes, *, lifetime_s: int = TICKET_LIFETIME_S, clock=time.time) -> None:
        self._box = cu.SealedBox(key, _LABEL)
        self.lifetime_s = lifetime_s
        self._clock = clock

    def issue(self, username: str, identity_key: bytes, epoch: int = 0) -> bytes:
        now = int(self._clock())
        plain = (
            _HEADER.pack(TICKET_VERSION, now, now + self.lifetime_s, epoch)
            + bytes([len(username)])
            + username.encode("ascii")
            + identity_key
        )
        return self._box.seal(plain)

    def redeem(self, ticket: bytes, identity_key: bytes) -> str:
        """The username in a valid, unexpired ticket issued to this identity key."""
        return self.redeem_with_epoch(ticket, identity_key)[0]

    def redeem_with_epoch(self, ticket: bytes, identity_key: bytes) -> tuple[str, int]:
        """The username and ticket epoch in a valid, unexpired ticket issued to this identity key;
        the caller compares the epoch with the account's (a password change increments it)."""
        invalid = InvalidCredentials("The session ticket is invalid or expired; log in with your password.")
        if len(ticket) < cu.SEALED_BOX_OVERHEAD + _HEADER.size:
            raise invalid
        try:
            plain = self._box.open(ticket)
        except cu.DecryptionFailed:
            raise invalid from None
        version, _issued, expires, epoch = _HEADER.unpack_from(plain)
        n = plain[_HEADER.size]
        username = plain[_HEADER.size + 1 : _HEADER.size + 1 + n].decode("ascii", "replace")
        bound_key = plain[_HEADER.size + 1 + n :]
        if (
            version != TICKET_VERSION
            or expires < self._clock()
            or not cu.constant_time_equal(bound_key, identity_key)
        ):
            raise invalid
        return username, epoch
