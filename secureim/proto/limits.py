"""Wire constants and limits, and the username rule both ends apply."""

from __future__ import annotations

import re
import struct

from diffiehellman import (
    GROUPS,
    share_length,
)
from secureim.errors import (
    InvalidUsername,
)

PROTOCOL_VERSION = 1
DEFAULT_PORT = 5151
FRAME_HEADER = struct.Struct(">I")
# Largest frame body accepted, checked from the 4-byte header before buffering.
MAX_FRAME_BYTES = 64 * 1024
NONCE_BYTES = 32
MAX_USERNAME_BYTES = 32
MAX_PASSWORD_BYTES = 1024
# Largest relayed end-to-end payload; with the record overhead it fits a frame.
MAX_PAYLOAD_BYTES = 60 * 1024
MAX_REASON_BYTES = 512
MAX_WHO_USERS = 1000
MAX_TICKET_BYTES = 256
TICKET_LIFETIME_S = 12 * 3600  # a resumption ticket's life; the terminal keeps reconnecting this long
# Key shares: 1,216 bytes from the client for x25519-mlkem768 (512 for 4096-bit groups), 1,120 back.
MAX_PUBLIC_VALUE_BYTES = max(share_length(g) for g in GROUPS.values())
MAX_RESPONSE_VALUE_BYTES = max(share_length(g, response=True) for g in GROUPS.values())
MAX_OFFERED_GROUPS = 8
SEQUENCE_LIMIT = (1 << 64) - 1  # a sequence number never wraps (TLS 1.3 section 5.3)

# Usernames: ASCII only (no Unicode look-alikes), case-insensitive, safe as file names.
USERNAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")
USERNAME_RULES = (
    "Usernames are 1 to 32 characters: letters a-z, digits, '_', '.' or '-', "
    "starting with a letter or digit (case does not matter)."
)


def normalize_username(raw: str) -> str:
    """Lower-case and check a username; raises :class:`InvalidUsername` with the rules."""
    if not isinstance(raw, str):
        raise InvalidUsername(USERNAME_RULES)
    name = raw.strip().lower() if raw.isascii() else raw
    if not USERNAME_RE.fullmatch(name):
        raise InvalidUsername(USERNAME_RULES)
    return name
