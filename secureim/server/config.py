"""The server's settings, and the names of its files and formats."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import crypto_utils as cu
from secureim import proto as P
from secureim.e2e import rooms as R
from secureim.server.accounts import DEFAULT_BCRYPT_COST
from secureim.server.moderation import (
    DEFAULT_AUDIT_RETENTION_DAYS,
)

log = logging.getLogger("secureim.server")


DEFAULT_PORT = P.DEFAULT_PORT
DEFAULT_DATA_DIR = "secureim-data"
IDENTITY_FILE = "server_identity.key"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    db_url: str | None = None  # default: sqlite under data_dir
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    cipher: str = cu.DEFAULT_SUITE
    bcrypt_cost: int = DEFAULT_BCRYPT_COST
    login_grace_s: float = 120.0  # OpenSSH LoginGraceTime; the terminal client says at once when it ends
    max_auth_tries: int = 6  # OpenSSH MaxAuthTries
    rekey_after_messages: int = 1000  # conversation key lifetime, in relayed messages
    rekey_after_s: float = 3600.0  # ... and in time
    min_rekey_interval_s: float = 1.0  # never faster: key shares count as relays too, so rekeys could cascade
    outbox_limit_bytes: int = 1 << 20  # a client that stops reading is dropped past this
    max_connections: int = 20000
    max_unauthenticated: int = 256  # OpenSSH MaxStartups-style cap on half-open sessions
    max_unauthenticated_per_source: int = 32
    connections_per_source_per_s: float = 20.0  # token bucket per source address...
    connection_burst_per_source: int = 60  # ...and its burst
    puzzle_mode: str = "auto"  # off | auto (under load) | always
    puzzle_bits: int = 16  # base difficulty; grows with load up to puzzle.MAX_DIFFICULTY
    puzzle_load_threshold: int = 64  # half-open connections before "auto" asks for work
    allowed_groups: frozenset[str] | None = None
    tdes_backend: str | None = None
    max_failures: int = 5
    lock_s: float = 60.0
    metrics_port: int | None = None  # Prometheus /metrics and /healthz on 127.0.0.1 (0 = any free port)
    audit_retention_days: float = DEFAULT_AUDIT_RETENTION_DAYS
    node_name: str = ""  # default: hostname:port (the admin `sessions` list shows it)
    worker_threads: int = 4  # threads for slow work: handshakes, logins, the database
    reuse_port: bool = False  # SO_REUSEPORT: worker processes share the port (--workers)
    cluster_url: str | None = None  # nats://HOST:PORT: several nodes, one service (cluster.py)
    cluster_prefix: str = "secureim"  # NATS subjects start with this (tests use one per run)
    identity_key_file: Path | None = None  # the service's identity (all nodes): else data_dir's
    # Store and forward (docs/PROTOCOL.md section 15): each recipient's queue is bounded.
    queue_max_messages: int = 1000
    queue_max_bytes: int = 10 << 20
    queue_max_age_s: float = 30 * 86400.0
    offline_opens_per_minute: int = (
        300  # each takes one of the peer's one-time prekeys (per session: a room's
    )
    #                                      sender key goes to every member, so a room of 256 is one burst)...
    offline_opens_per_recipient_per_minute: int = 300  # ...and per recipient, whoever asks (per node): every
    #                                      member of a new room opens one to each other (the signed prekey
    #                                      serves once the one-time prekeys run out, as in Signal)
    room_max_members: int = R.DEFAULT_MAX_MEMBERS  # docs/PROTOCOL.md section 16
    room_sends_per_s: float = 50.0  # room messages one session may send (a token bucket, burst x4):
    #                                      each one is a copy for every other member

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{Path(self.data_dir) / 'secureim.db'}"


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
