"""The server's command line: every option, checked, and the ServerConfig it makes."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import crypto_utils as cu
from secureim.e2e import rooms as R
from secureim.errors import (
    ConfigError,
)
from secureim.server.accounts import DEFAULT_BCRYPT_COST
from secureim.server.cluster.nats_bus import check_prefix
from secureim.server.config import DEFAULT_DATA_DIR, DEFAULT_PORT, LOG_LEVELS, ServerConfig
from secureim.server.moderation import (
    DEFAULT_AUDIT_RETENTION_DAYS,
)

log = logging.getLogger("secureim.server")


# =============================================================================
# Command line
# =============================================================================


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"choose one of {', '.join(LOG_LEVELS)} (any case)")
    return level


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help; an option that states its own keeps its wording."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if "default:" in (action.help or "") else super()._get_help_string(action)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="secureim server: login, key distribution and relay.", formatter_class=_HelpWithDefaults
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (0 = any free port)")
    p.add_argument(
        "--db",
        dest="db_url",
        default=None,
        help="sqlite:///PATH or mysql://USER[:PASS]@HOST[:PORT]/DB. sqlite:///data/x.db is "
        "relative to the current folder, sqlite:////srv/x.db (four slashes) is absolute; "
        "the folder must exist. MySQL: the database is created if the account may "
        "(default: SQLite file secureim.db in the data dir)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("SECUREIM_DATA_DIR", DEFAULT_DATA_DIR)),
        help="where the identity key, ticket key and SQLite database live ($SECUREIM_DATA_DIR)",
    )
    p.add_argument(
        "--cipher",
        choices=cu.SUITE_NAMES,
        default=cu.DEFAULT_SUITE,
        help="cipher suite for sessions and conversations",
    )
    p.add_argument(
        "--bcrypt-cost", type=int, default=DEFAULT_BCRYPT_COST, help="bcrypt cost for new passwords (4-31)"
    )
    p.add_argument("--rekey-messages", type=int, default=1000, help="new conversation key after N messages")
    p.add_argument("--rekey-minutes", type=float, default=60.0, help="new conversation key after N minutes")
    p.add_argument("--login-grace", type=float, default=120.0, help="seconds from connect to logged in")
    p.add_argument(
        "--puzzle",
        choices=["off", "auto", "always"],
        default="auto",
        help="client puzzle before any DH work: auto = only under load",
    )
    p.add_argument("--puzzle-bits", type=int, default=16, help="base puzzle difficulty in bits (0-22)")
    p.add_argument(
        "--max-unauthenticated", type=int, default=256, help="half-open connections allowed at once"
    )
    p.add_argument(
        "--max-unauthenticated-per-source",
        type=int,
        default=32,
        help="half-open connections allowed per address",
    )
    p.add_argument(
        "--connections-per-second",
        type=float,
        default=20.0,
        help="new connections per second per address (burst: three times this)",
    )
    p.add_argument(
        "--log-level",
        type=_log_level,
        default="WARNING",
        metavar="LEVEL",
        help="log detail on stderr: DEBUG, INFO, WARNING or ERROR, in any case; WARNING shows "
        "failed logins and lockouts (never passwords)",
    )
    # Operating the server (admin.py, console.py, metrics.py); `python server.py admin --help` for the rest.
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics and /healthz on 127.0.0.1:PORT (0 = any free port)",
    )
    p.add_argument(
        "--audit-retention-days",
        type=float,
        default=DEFAULT_AUDIT_RETENTION_DAYS,
        help=f"keep audit rows this long (default {DEFAULT_AUDIT_RETENTION_DAYS:g})",
    )
    p.add_argument(
        "--console",
        choices=["auto", "on", "off"],
        default="auto",
        help="operator commands on stdin (/help): auto = only when stdin is a terminal",
    )
    # Scaling (docs/SCALING.md): worker processes on one machine, nodes on NATS.
    p.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="server processes sharing the port (SO_REUSEPORT); 'auto' = one per core. "
        "More than 1 needs --cluster: the workers talk over NATS",
    )
    p.add_argument(
        "--worker-threads",
        type=int,
        default=4,
        help="threads per process for slow work (handshakes, logins, the database)",
    )
    p.add_argument(
        "--cluster",
        dest="cluster_url",
        default=None,
        metavar="nats://HOST:PORT",
        help="join a cluster on this NATS server: several processes or machines, one service "
        "(needs a shared MySQL/MariaDB --db)",
    )
    p.add_argument("--cluster-prefix", default="secureim", help="NATS subject prefix of the cluster")
    p.add_argument(
        "--identity-key",
        type=Path,
        default=None,
        metavar="FILE",
        help="the service's Ed25519 identity (PEM, mode 0600), the same on every node; "
        "tickets and the cluster key derive from it (default: the data dir's own)",
    )
    p.add_argument(
        "--node-name",
        default="",
        help="this node's name in logs and `admin sessions` (default: hostname:port)",
    )
    p.add_argument(
        "--queue-max-messages",
        type=int,
        default=1000,
        metavar="N",
        help="stored messages kept for one offline user at most (then senders are told)",
    )
    p.add_argument(
        "--queue-max-mib",
        type=float,
        default=10.0,
        metavar="MIB",
        help="bytes of stored messages kept for one offline user at most, in MiB",
    )
    p.add_argument(
        "--queue-max-days",
        type=float,
        default=30.0,
        metavar="DAYS",
        help="stored messages unread this long are deleted",
    )
    p.add_argument(
        "--room-max-members",
        type=int,
        default=R.DEFAULT_MAX_MEMBERS,
        metavar="N",
        help=f"members one room may have (1-{R.HARD_MAX_MEMBERS})",
    )
    p.add_argument(
        "--room-sends-per-second",
        type=float,
        default=50.0,
        metavar="N",
        help="room messages one session may send a second (bursts of 4x); each is copied to every "
        "other member",
    )
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # set for each worker
    return p


def _workers(text: str) -> int:
    if text == "auto":
        return os.cpu_count() or 1
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a number of processes (1-256) or 'auto'") from None
    if not 1 <= n <= 256:
        raise argparse.ArgumentTypeError("a number of processes (1-256) or 'auto'")
    return n


def check_data_dir(path: Path) -> None:
    """The data directory must be (or become) a writable folder: one clear line otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--data-dir {path} is not a folder.")
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), Path("."))
        if not parent.is_dir():
            raise ConfigError(f"--data-dir {path} cannot be created: {parent} is not a folder.")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"--data-dir {path} cannot be created: {parent} is not writable.")
        return
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--data-dir {path} is not writable.")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    if not 4 <= args.bcrypt_cost <= 31:
        raise ConfigError("--bcrypt-cost must be between 4 and 31.")
    if not 0 <= args.port <= 65535:
        raise ConfigError("--port must be between 0 and 65535.")
    if args.rekey_messages < 1 or args.rekey_minutes <= 0 or args.login_grace <= 0:
        raise ConfigError("--rekey-messages, --rekey-minutes and --login-grace must be positive.")
    if not 0 <= args.puzzle_bits <= 22:
        raise ConfigError("--puzzle-bits must be between 0 and 22.")
    check_data_dir(args.data_dir)
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise ConfigError("--metrics-port must be between 0 and 65535.")
    if not 0 < args.audit_retention_days <= 36500:
        raise ConfigError("--audit-retention-days must be between 0 and 36500.")
    if not 1 <= args.worker_threads <= 256:
        raise ConfigError("--worker-threads must be between 1 and 256.")
    if (
        not 1 <= args.queue_max_messages <= 1_000_000
        or not 0 < args.queue_max_mib <= 4096
        or not 0 < args.queue_max_days <= 3650
    ):
        raise ConfigError(
            "--queue-max-messages is 1-1000000, --queue-max-mib 0-4096, --queue-max-days 0-3650."
        )
    if not 1 <= args.room_max_members <= R.HARD_MAX_MEMBERS:
        raise ConfigError(f"--room-max-members is 1-{R.HARD_MAX_MEMBERS}.")
    if not 0 < args.room_sends_per_second <= 100_000:
        raise ConfigError("--room-sends-per-second is more than 0 and at most 100000.")
    if args.cluster_url is not None:
        if not args.cluster_url.startswith(("nats://", "tls://")):
            raise ConfigError("--cluster takes a NATS URL: nats://HOST:PORT")
        check_prefix(args.cluster_prefix)
        if not (args.db_url or "").startswith(("mysql://", "mariadb://")):
            raise ConfigError(
                "--cluster needs a database every node shares: --db mysql://USER@HOST/DB "
                "(SQLite is one file on one machine)."
            )
    return ServerConfig(
        host=args.host,
        port=args.port,
        db_url=args.db_url,
        data_dir=args.data_dir,
        cipher=args.cipher,
        bcrypt_cost=args.bcrypt_cost,
        rekey_after_messages=args.rekey_messages,
        rekey_after_s=args.rekey_minutes * 60,
        login_grace_s=args.login_grace,
        puzzle_mode=args.puzzle,
        puzzle_bits=args.puzzle_bits,
        max_unauthenticated=args.max_unauthenticated,
        max_unauthenticated_per_source=args.max_unauthenticated_per_source,
        connections_per_source_per_s=args.connections_per_second,
        connection_burst_per_source=max(1, int(args.connections_per_second * 3)),
        metrics_port=args.metrics_port,
        audit_retention_days=args.audit_retention_days,
        worker_threads=args.worker_threads,
        reuse_port=args.reuse_port,
        cluster_url=args.cluster_url,
        cluster_prefix=args.cluster_prefix,
        identity_key_file=args.identity_key,
        node_name=args.node_name[:64],
        queue_max_messages=args.queue_max_messages,
        queue_max_bytes=int(args.queue_max_mib * (1 << 20)),
        queue_max_age_s=args.queue_max_days * 86400.0,
        room_max_members=args.room_max_members,
        room_sends_per_s=args.room_sends_per_second,
    )
