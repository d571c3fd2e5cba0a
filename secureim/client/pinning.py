"""Which servers this client trusts (pinned keys), and the client's home folder."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import crypto_utils as cu
from secureim.client import offline as offline
from secureim.errors import (
    ConfigError,
    SecureIMError,
)

log = logging.getLogger("secureim.client")


KNOWN_SERVERS_FILE = "known_servers"
MAX_SERVERS = 16  # --host a,b,c: more is a typo or a misuse, not a cluster
_HOST_CHARS = re.compile(r"[A-Za-z0-9._%:-]{1,253}")


# =============================================================================
# Trust in the server (TOFU, like ssh's known_hosts)
# =============================================================================
class KnownServers:
    """``<home>/known_servers``: one line per server, ``host:port base64(ed25519 key)``."""

    def __init__(self, home: Path) -> None:
        self.path = Path(home) / KNOWN_SERVERS_FILE

    def _load(self) -> dict[str, bytes]:
        entries: dict[str, bytes] = {}
        if not self.path.exists():
            return entries
        for line in self.path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and not line.startswith("#"):
                try:
                    entries[parts[0]] = cu.b64decode(parts[1])
                except SecureIMError:
                    continue
        return entries

    def lookup(self, server: str) -> bytes | None:
        return self._load().get(server)

    def remember(self, server: str, key: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as fh:
            fh.write(f"{server} {cu.b64encode(key)}\n")


class PendingKeys:
    """Changed identity keys of peers, refused and awaiting ``/accept`` (``<known_peers file>.changed``).

    Kept on disk so that ``/accept PEER`` accepts exactly the key that was refused and
    shown (with its safety number), even after this client was restarted.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, bytes]:
        entries: dict[str, bytes] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2:
                    try:
                        entries[parts[0]] = cu.b64decode(parts[1])
                    except SecureIMError:
                        continue
        return entries

    def _save(self, entries: dict[str, bytes]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lines = "".join(f"{peer} {cu.b64encode(key)}\n" for peer, key in sorted(entries.items()))
        cu.write_private_file(self.path, lines.encode())

    def get(self, peer: str) -> bytes | None:
        return self._load().get(peer)

    def put(self, peer: str, key: bytes) -> None:
        entries = self._load()
        if entries.get(peer) != key:
            entries[peer] = key
            self._save(entries)

    def remove(self, peer: str) -> None:
        entries = self._load()
        if entries.pop(peer, None) is not None:
            self._save(entries)


def check_home(home: Path) -> Path:
    """Make sure the client can keep its files in ``home`` (created if missing); one clear
    :class:`ConfigError` otherwise, before anything connects."""
    home = Path(home)
    if home.exists() and not home.is_dir():
        raise ConfigError(f"--home {home} is not a folder.")
    if not home.exists():
        parent = next((p for p in home.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise ConfigError(f"--home {home} cannot be created: {parent} is not a folder.")
        try:
            home.mkdir(parents=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"--home {home} cannot be created: {exc.strerror or exc}.") from None
    if not os.access(home, os.W_OK | os.X_OK):
        raise ConfigError(f"--home {home} is not writable.")
    return home


def _parse_port(text: str, entry: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(f"--host: {entry!r} has a bad port (a port is a number from 1 to 65535).")
    return int(text)


def parse_servers(text: str, default_port: int) -> list[tuple[str, int]]:
    """``a,b,c`` or ``h1:p1,h2:p2`` (``[v6]:port`` for IPv6) as (host, port) pairs, in order.

    A plain host uses ``default_port``; at most :data:`MAX_SERVERS` entries, none twice.
    """
    entries = [entry.strip() for entry in text.split(",")]
    if len(entries) > MAX_SERVERS:
        raise ConfigError(f"--host: at most {MAX_SERVERS} servers (got {len(entries)}).")
    servers: list[tuple[str, int]] = []
    for entry in entries:
        if not entry:
            raise ConfigError("--host: an empty entry (two commas, or one at an end).")
        if entry.startswith("["):
            host, closed, rest = entry[1:].partition("]")
            if not closed or (rest and not rest.startswith(":")):
                raise ConfigError(f"--host: {entry!r} is not [IPv6] or [IPv6]:port.")
            port = _parse_port(rest[1:], entry) if rest else default_port
        elif entry.count(":") == 1:
            host, _, port_text = entry.partition(":")
            port = _parse_port(port_text, entry)
        else:  # a name, an IPv4 address, or a bare IPv6 address (default port)
            host, port = entry, default_port
        if not _HOST_CHARS.fullmatch(host):
            raise ConfigError(f"--host: {entry!r} is not a host name or address.")
        if (host, port) in servers:
            raise ConfigError(f"--host: {host}:{port} is listed twice.")
        servers.append((host, port))
    return servers


def parse_fingerprint(text: str) -> str:
    if not text.startswith("SHA256:") or len(text) != 50:
        raise ConfigError("A server fingerprint looks like SHA256: followed by 43 base64 characters.")
    return text
