"""The operator's command line: ``python server.py admin COMMAND ...`` against the server's database.

Accounts (users, reset-password, delete-user, lockouts, unlock), who is connected
(sessions), moderation (kick, ban, unban, ban-address, unban-address, bans), the
audit log (audit) and a health probe (health).  ``AdminOps`` does the work and
is shared with the server console (console.py); ``main`` is the command line.

Kicks and bans reach running servers through the database (moderation.py): every
server sharing it acts within a second.  Exit codes: 0 done, 1 the database or
the server could not be reached, 2 bad input (unknown user, bad duration, bad
network, bad option), always with one clear line on stderr.
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from secureim.errors import ConfigError, InvalidUsername, SecureIMError
from secureim.proto import normalize_username
from secureim.server.accounts import DEFAULT_BCRYPT_COST, MIN_PASSWORD_BYTES, hash_password
from secureim.server.moderation import ban_message, describe_until, parse_duration, parse_network
from secureim.storage import Storage, open_storage

EXIT_OK, EXIT_UNAVAILABLE, EXIT_BAD_INPUT = 0, 1, 2
DEFAULT_DATA_DIR = "secureim-data"
TEMPORARY_PASSWORD_BYTES = 12  # 16 URL-safe characters, 96 bits
MAX_AUDIT_ROWS = 10_000


class BadInput(ConfigError):
    """The command was given something it cannot use (the message says what)."""


def _clean(text: object, max_chars: int = 200) -> str:
    """Names and reasons from the database, safe to print on a terminal (no control characters)."""
    return "".join(c if c.isprintable() else "?" for c in str(text)[:max_chars])


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    cells = [tuple(_clean(c) for c in header)] + [tuple(_clean(c) for c in row) for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in cells]


def parse_since(text: str, now: float | None = None) -> float:
    """``1h`` / ``7d`` (that long ago) or a UTC date ``2026-11-22`` / ``2026-11-22T10:30``."""
    now = time.time() if now is None else now
    try:
        return now - parse_duration(text)
    except ConfigError:
        pass
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadInput(
            f"Bad --since {text[:40]!r}: use a duration (1h, 7d) or a UTC date (2026-11-22T10:30)."
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


class AdminOps:
    """Every admin action, against one storage; the CLI and the server console both use it."""

    def __init__(self, storage: Storage, actor: str, *, bcrypt_cost: int = DEFAULT_BCRYPT_COST) -> None:
        self.storage = storage
        self.actor = actor[:64]  # recorded as the source of admin actions in the audit log
        self.bcrypt_cost = bcrypt_cost

    def existing_user(self, raw: str) -> str:
        try:
            name = normalize_username(raw)
        except InvalidUsername:
            raise BadInput(f"Bad username {_clean(raw, 40)!r}: no such user.") from None
        if self.storage.get_password_hash(name) is None:
            raise BadInput(f"No user named {name!r}.")
        return name

    def _audit(self, event: str, username: str = "", detail: str = "") -> None:
        self.storage.audit(event, username, self.actor, detail)

    # -- reading ----------------------------------------------------------------------
    def users(self) -> list[str]:
        now = time.time()
        online = {s.username for s in self.storage.list_sessions()}
        banned = {b.target for b in self.storage.active_bans(now, kind="user")}
        rows = [
            (
                u.username,
                _when(u.created_at),
                _when(u.last_login_at),
                "yes" if u.username in online else "no",
                "yes" if u.locked else "no",
                "yes" if u.username in banned else "no",
            )
            for u in self.storage.list_users(now)
        ]
        return _table(("USER", "CREATED (UTC)", "LAST LOGIN (UTC)", "ONLINE", "LOCKED", "BANNED"), rows)

    def sessions(self) -> list[str]:
        rows = [(s.username, s.source, _when(s.since), s.node) for s in self.storage.list_sessions()]
        return _table(("USER", "FROM", "SINCE (UTC)", "NODE"), rows)

    def bans(self) -> list[str]:
        rows = [
            (b.kind, b.target, describe_until(b.until), b.reason)
            for b in self.storage.active_bans(time.time())
        ]
        return _table(("KIND", "TARGET", "UNTIL", "REASON"), rows)

    def lockouts(self) -> list[str]:
        now = time.time()
        rows = [
            (x.username, x.source, x.failures, f"{max(0, int(x.locked_until - now))} s")
            for x in self.storage.list_lockouts(now)
        ]
        return _table(("USER", "FROM", "FAILURES", "LOCKED FOR"), rows)

    def audit(self, user: str | None, since: str | None, limit: int) -> list[str]:
        if not 1 <= limit <= MAX_AUDIT_ROWS:
            raise BadInput(f"Bad --limit {limit}: between 1 and {MAX_AUDIT_ROWS}.")
        name = None
        if user is not None:
            try:
                name = normalize_username(user)
            except InvalidUsername:
                raise BadInput(f"Bad username {_clean(user, 40)!r}.") from None
        start = parse_since(since) if since else 0.0
        rows = [
            (_when(e.at), e.event, e.username or "-", e.source or "-", e.detail)
            for e in self.storage.audit_events(name, start, limit)
        ]
        return _table(("TIME (UTC)", "EVENT", "USER", "SOURCE", "DETAIL"), rows)

    # -- acting -----------------------------------------------------------------------
    def kick(self, raw: str, reason: str = "") -> str:
        name = self.existing_user(raw)
        self.storage.post_admin_action(
            "kick", name, "An administrator disconnected you" + (f": {reason}." if reason else ".")
        )
        self._audit("kick", name, reason)
        return f"Kicked {name}: every server sharing this database ends their session within a second."

    def ban(self, raw: str, duration: str | None = None, reason: str = "") -> str:
        name = self.existing_user(raw)
        seconds = parse_duration(duration) if duration else 0.0
        until = time.time() + seconds if seconds else 0.0
        self.storage.set_ban("user", name, until, reason)
        ban = self.storage.user_ban(name, time.time())
        self.storage.post_admin_action("kick", name, ban_message(ban) if ban else "You were banned.")
        self._audit(
            "ban", name, (f"{int(seconds)} s" if seconds else "no end") + (f": {reason}" if reason else "")
        )
        return f"Banned {name} {describe_until(until)}; any session of theirs ends within a second."

    def unban(self, raw: str) -> str:
        name = self.existing_user(raw)
        lifted = self.storage.remove_ban("user", name)
        self._audit("unban", name)
        return f"Lifted the ban on {name}." if lifted else f"{name} was not banned."

    def ban_address(self, cidr: str, duration: str | None = None, reason: str = "") -> str:
        network = parse_network(cidr)
        seconds = parse_duration(duration) if duration else 0.0
        until = time.time() + seconds if seconds else 0.0
        self.storage.set_ban("address", network, until, reason)
        self.storage.post_admin_action("address", "", "")
        self._audit(
            "ban_address",
            "",
            f"{network} "
            + (f"{int(seconds)} s" if seconds else "no end")
            + (f": {reason}" if reason else ""),
        )
        return f"Banned {network} {describe_until(until)}; sessions from it end within a second."

    def unban_address(self, cidr: str) -> str:
        network = parse_network(cidr)
        lifted = self.storage.remove_ban("address", network)
        self._audit("unban_address", "", network)
        return f"Lifted the ban on {network}." if lifted else f"{network} was not banned."

    def reset_password(self, raw: str, new_password: str | None = None) -> tuple[str, str]:
        """Set a new password (given, or a random temporary one), end the user's tickets and session."""
        name = self.existing_user(raw)
        password = (
            new_password if new_password is not None else secrets.token_urlsafe(TEMPORARY_PASSWORD_BYTES)
        )
        if len(password.encode("utf-8")) < MIN_PASSWORD_BYTES:
            raise BadInput(f"Passwords must be at least {MIN_PASSWORD_BYTES} characters.")
        self.storage.set_password_hash(name, hash_password(password.encode("utf-8"), self.bcrypt_cost))
        self.storage.bump_ticket_epoch(name)  # every resumption ticket issued so far is void
        self.storage.clear_all_login_failures(name)
        self.storage.post_admin_action(
            "kick", name, "An administrator reset your password; log in again with the new one."
        )
        self._audit("reset_password", name)
        return name, password

    def delete_user(self, raw: str) -> str:
        name = self.existing_user(raw)
        self.storage.delete_user(name)
        self.storage.post_admin_action("kick", name, "Your account was deleted by an administrator.")
        self._audit("delete_user", name)
        return (
            f"Deleted {name}: the account, its conversations, lockouts, tickets and session rows. "
            "(This version keeps no offline message queue or group memberships.)"
        )

    def unlock(self, raw: str) -> str:
        name = self.existing_user(raw)
        n = self.storage.clear_all_login_failures(name)
        self._audit("unlock", name)
        return f"Unlocked {name} ({n} address{'es' if n != 1 else ''} cleared)."


# =============================================================================
# Command line
# =============================================================================
class _OneLineParser(argparse.ArgumentParser):
    """Bad options give one clear line and exit 2 (not a usage dump)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def build_arg_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="server.py admin", description="Operate a secureim server through its database.")
    p.add_argument(
        "--db", dest="db_url", default=None, help="the server's --db URL (default: SQLite in the data dir)"
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("SECUREIM_DATA_DIR", DEFAULT_DATA_DIR)),
        help=f"the server's --data-dir (default ./{DEFAULT_DATA_DIR})",
    )
    p.add_argument(
        "--bcrypt-cost", type=int, default=DEFAULT_BCRYPT_COST, help="bcrypt cost for reset passwords"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("users", help="every account: created, last login, online, locked, banned")
    sub.add_parser("sessions", help="who is connected, from where, since when, on which node")
    sub.add_parser("bans", help="active bans")
    sub.add_parser("lockouts", help="accounts locked for an address after failed logins")
    c = sub.add_parser("kick", help="end USER's session now")
    c.add_argument("user")
    c.add_argument("--reason", default="", help="shown to the user")
    c = sub.add_parser("ban", help="ban USER (ends their session; refuses their logins)")
    c.add_argument("user")
    c.add_argument(
        "--for", dest="duration", default=None, metavar="DURATION", help="30m, 1h, 7d, 2w (default: no end)"
    )
    c.add_argument("--reason", default="", help="shown to the user")
    c = sub.add_parser("unban", help="lift USER's ban")
    c.add_argument("user")
    c = sub.add_parser("ban-address", help="ban a network (CIDR): its connections cannot log in")
    c.add_argument("cidr")
    c.add_argument("--for", dest="duration", default=None, metavar="DURATION")
    c.add_argument("--reason", default="")
    c = sub.add_parser("unban-address", help="lift a network ban")
    c.add_argument("cidr")
    c = sub.add_parser("reset-password", help="give USER a new password; ends their tickets and session")
    c.add_argument("user")
    c.add_argument(
        "--ask", action="store_true", help="type the new password instead of printing a random one"
    )
    c = sub.add_parser("delete-user", help="delete USER and everything kept for them")
    c.add_argument("user")
    c.add_argument("--yes", action="store_true", help="do not ask for the typed confirmation")
    c = sub.add_parser("unlock", help="clear USER's failed-login lockouts")
    c.add_argument("user")
    c = sub.add_parser("audit", help="read the audit log")
    c.add_argument("--user", default=None)
    c.add_argument("--since", default=None, help="1h, 7d, or a UTC date like 2026-11-22T10:30")
    c.add_argument("--limit", type=int, default=1000)
    c = sub.add_parser("health", help="ask a running server's /healthz (exit 0 healthy, 1 not)")
    c.add_argument("--metrics-port", type=int, required=True, help="the server's --metrics-port")
    return p


def _health(port: int) -> int:
    if not 1 <= port <= 65535:
        raise BadInput("--metrics-port must be between 1 and 65535.")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            print(resp.read(200).decode("utf-8", "replace").strip())
            return EXIT_OK
    except urllib.error.HTTPError as exc:
        print(_clean(exc.read(200).decode("utf-8", "replace").strip()), file=sys.stderr)
    except OSError as exc:
        print(f"No answer from 127.0.0.1:{port}: {_clean(exc)}", file=sys.stderr)
    return EXIT_UNAVAILABLE


def _confirm_delete(name: str) -> None:
    if not sys.stdin.isatty():
        raise BadInput("delete-user needs --yes when not run on a terminal.")
    typed = input(f"This deletes {name} for good. Type the username to confirm: ").strip()
    if typed != name:
        raise BadInput("The confirmation did not match; nothing was deleted.")


def _ask_password() -> str:
    first = getpass.getpass("New password: ")
    if getpass.getpass("Again: ") != first:
        raise BadInput("The passwords do not match; nothing was changed.")
    return first


def run(args: argparse.Namespace, storage: Storage) -> int:
    ops = AdminOps(storage, f"admin-cli:{getpass.getuser()}", bcrypt_cost=args.bcrypt_cost)
    cmd = args.command
    if cmd in ("users", "sessions", "bans", "lockouts"):
        lines = getattr(ops, cmd)()
    elif cmd == "audit":
        lines = ops.audit(args.user, args.since, args.limit)
    elif cmd == "kick":
        lines = [ops.kick(args.user, args.reason)]
    elif cmd == "ban":
        lines = [ops.ban(args.user, args.duration, args.reason)]
    elif cmd == "unban":
        lines = [ops.unban(args.user)]
    elif cmd == "ban-address":
        lines = [ops.ban_address(args.cidr, args.duration, args.reason)]
    elif cmd == "unban-address":
        lines = [ops.unban_address(args.cidr)]
    elif cmd == "unlock":
        lines = [ops.unlock(args.user)]
    elif cmd == "delete-user":
        name = ops.existing_user(args.user)
        if not args.yes:
            _confirm_delete(name)
        lines = [ops.delete_user(name)]
    elif cmd == "reset-password":
        ops.existing_user(args.user)
        name, password = ops.reset_password(args.user, _ask_password() if args.ask else None)
        lines = [f"New password set for {name}; their tickets and session are ended."]
        if not args.ask:
            lines += [
                f"Temporary password: {password}",
                "Give it to them over a trusted channel; they should change it after logging in.",
            ]
    else:  # pragma: no cover - argparse only lets the commands above through
        raise BadInput(f"Unknown command {cmd!r}.")
    for line in lines:
        print(line)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        if not 4 <= args.bcrypt_cost <= 31:
            raise BadInput("--bcrypt-cost must be between 4 and 31.")
        if args.command == "health":
            return _health(args.metrics_port)
        url = args.db_url or f"sqlite:///{Path(args.data_dir) / 'secureim.db'}"
        if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).exists():
            raise BadInput(
                f"No database at {url[len('sqlite:///') :]}; give the server's --data-dir or --db."
            )
        storage = open_storage(url, apply_schema=False)  # the server applied it; never under its feet
    except BadInput as exc:
        print(f"admin: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SecureIMError as exc:
        print(f"admin: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        return run(args, storage)
    except ConfigError as exc:  # unknown user, bad duration, bad network
        print(f"admin: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SecureIMError as exc:  # the database went away
        print(f"admin: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (EOFError, KeyboardInterrupt):
        print("admin: cancelled; nothing more was changed.", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        storage.close()
