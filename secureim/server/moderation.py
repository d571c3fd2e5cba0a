"""Enforcing what the operator decided: bans (of accounts and of networks) and kicks on a running server.

The admin command line (admin.py) and the server console write to the database;
every running server polls it once a second (``ModerationPoller``):

- ``admin_actions``: a row per kick (``ban``, ``reset-password`` and
  ``delete-user`` post one too).  Each server remembers the last id it has seen
  and ends that user's session there, with the reason as a Goodbye the client shows.
- ``bans``: account bans are checked at every login (one indexed query, after
  the password, so only someone who knows it learns of the ban); network bans are
  cached and re-read each poll, checked before any password work, and a new one
  ends the sessions it covers.

So an action takes effect within one poll interval on every server that shares
the database: no socket to secure, nothing to do when a cluster lands but to
carry the same rows.  Durations and networks are parsed here, for the CLI and
the console alike.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from secureim import proto as P
from secureim.errors import ConfigError, DatabaseError
from secureim.server.metrics import ServerMetrics
from secureim.server.ports import ModerationStore, SessionList
from secureim.storage import Ban, Storage

if TYPE_CHECKING:
    from secureim.server.registry import Session

log = logging.getLogger("secureim.moderation")
server_log = logging.getLogger("secureim.server")  # the service's lines keep the service's logger

POLL_INTERVAL_S = 1.0
AUDIT_PRUNE_INTERVAL_S = 3600.0
DEFAULT_AUDIT_RETENTION_DAYS = 90.0
MAX_BAN_S = 10 * 365 * 86400
MAX_ADDRESS_BANS = 10_000
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"([1-9][0-9]{0,8})([smhdw])")


def parse_duration(text: str) -> float:
    """``30s``, ``15m``, ``1h``, ``7d``, ``2w`` in seconds (at most ten years)."""
    m = _DURATION_RE.fullmatch(text.strip().lower())
    if m is None:
        raise ConfigError(f"Bad duration {text[:40]!r}: use a number and a unit, like 30m, 1h, 7d or 2w.")
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if seconds > MAX_BAN_S:
        raise ConfigError(f"Bad duration {text[:40]!r}: at most ten years.")
    return float(seconds)


def parse_network(text: str) -> str:
    """A network in CIDR form (a bare address is a /32 or /128), normalised: ``10.1.2.3/8`` -> ``10.0.0.0/8``."""
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise ConfigError(
            f"Bad network {text[:60]!r}: use CIDR, like 203.0.113.0/24 or 2001:db8::/32."
        ) from None


def describe_until(until: float) -> str:
    if not until:
        return "until lifted"
    return "until " + datetime.fromtimestamp(until, UTC).strftime("%Y-%m-%d %H:%M UTC")


def ban_message(ban: Ban) -> str:
    """What a banned user reads (a plain reason, no internals)."""
    what = "This account is banned" if ban.kind == "user" else "Your network address is banned"
    why = f": {ban.reason}" if ban.reason else ""
    return f"{what} {describe_until(ban.until)}{why}."


class AddressBans:
    """The active network bans, cached; ``match`` is a few comparisons per network."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bans: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Ban]] = []

    def load(self, bans: list[Ban]) -> bool:
        """Replace the cache; True if the set of banned networks changed."""
        parsed = []
        for ban in bans[:MAX_ADDRESS_BANS]:
            try:
                parsed.append((ipaddress.ip_network(ban.target, strict=False), ban))
            except ValueError:
                log.warning("ignoring a malformed network ban in the database")
        with self._lock:
            changed = {b.target for _n, b in parsed} != {b.target for _n, b in self._bans}
            self._bans = parsed
        return changed

    def match(self, source: str, now: float | None = None) -> Ban | None:
        try:
            address = ipaddress.ip_address(source)
        except ValueError:
            return None
        now = time.time() if now is None else now
        with self._lock:
            bans = list(self._bans)
        for network, ban in bans:
            if (
                address.version == network.version
                and address in network
                and (not ban.until or ban.until > now)
            ):
                return ban
        return None


class ModerationPoller:
    """One thread per server: reads new admin actions and network bans each second, prunes the audit log hourly."""

    def __init__(
        self,
        storage: Storage,
        address_bans: AddressBans,
        *,
        kick: Callable[[str, str], bool],
        kick_banned_sources: Callable[[], int],
        audit_retention_s: float,
        interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        self.storage = storage
        self.address_bans = address_bans
        self._kick = kick
        self._kick_banned_sources = kick_banned_sources
        self.audit_retention_s = audit_retention_s
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_id = 0
        self._last_prune = 0.0

    def start(self) -> None:
        try:
            self._last_id = self.storage.last_admin_action_id()  # older actions were for servers before us
            self.address_bans.load(self.storage.active_bans(time.time(), kind="address"))
        except DatabaseError as exc:
            log.warning("cannot read admin actions yet: %s", exc)
        self._thread = threading.Thread(target=self._run, name="moderation", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll_once()
            except DatabaseError as exc:
                log.warning("moderation poll failed: %s", exc)
            except Exception:
                log.exception("moderation poll failed")

    def poll_once(self) -> None:
        now = time.time()
        for action in self.storage.admin_actions_after(self._last_id):
            self._last_id = max(self._last_id, action.id)
            if action.action == "kick" and action.username:
                self._kick(action.username, action.reason)
        if self.address_bans.load(self.storage.active_bans(now, kind="address")):
            self._kick_banned_sources()
        if now - self._last_prune >= AUDIT_PRUNE_INTERVAL_S:
            self._last_prune = now
            removed = self.storage.prune_audit(now - self.audit_retention_s)
            if removed:
                log.info("pruned %d audit rows older than the retention period", removed)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class Moderation:
    """The service's side of moderation: the audit log, bans at login, kicks (any thread)."""

    def __init__(
        self, storage: ModerationStore, bans: AddressBans, metrics: ServerMetrics, sessions: SessionList
    ) -> None:
        self.storage = storage
        self.address_bans = bans
        self.metrics = metrics
        self._sessions = sessions

    def audit(self, event: str, username: str = "", source: str = "", detail: str = "") -> None:
        """One audit row; never a password, key or message.  A failed write is logged, never fatal."""
        try:
            self.storage.audit(event, username, source, detail)
        except DatabaseError as exc:
            self.metrics.audit_failures.inc()
            server_log.warning("audit %s not recorded: %s", event, exc)

    def refuse_if_banned(self, session: Session, username: str | None) -> bool:
        """Network bans before any password work; account bans after it.  True if refused."""
        ban = self.address_bans.match(session.source)
        if ban is not None:  # the cache says banned: re-read, so a lifted ban counts at once
            self.address_bans.load(self.storage.active_bans(time.time(), kind="address"))
            ban = self.address_bans.match(session.source)
        if ban is None and username is not None:
            ban = self.storage.user_ban(username, time.time())
        if ban is None:
            return False
        self.metrics.logins.labels("banned").inc()
        self.audit("login_banned", username or "", session.source, ban.kind)
        session.send(P.AuthFailed(code=P.AuthCode.BANNED, retry_after_s=0, reason=ban_message(ban)))
        session.close()
        return True

    def kick(self, username: str, reason: str) -> bool:
        """End ``username``'s session here, telling them why; False if not online here."""
        session = self._sessions.session_of(username)
        if session is None:
            return False
        self.metrics.kicks.inc()
        session.close(reason[: P.MAX_REASON_BYTES // 2] or "An administrator ended your session.")
        return True

    def kick_banned_sources(self) -> int:
        """End every session whose address a network ban now covers."""
        ended = 0
        for session in self._sessions.all_sessions():
            ban = self.address_bans.match(session.source)
            if ban is not None:
                self.metrics.kicks.inc()
                session.close(ban_message(ban))
                ended += 1
        return ended
