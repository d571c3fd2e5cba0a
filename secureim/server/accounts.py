"""Accounts: username and password rules, bcrypt, lockout, the same answer for unknown users.

Passwords: bcrypt only reads 72 bytes (bcrypt >= 5 raises beyond that; 4.x
truncated silently).  We never truncate: the password is first pre-hashed with
HMAC-SHA256 under a fixed label and base64-encoded (44 ASCII bytes, no NUL), and
that is what bcrypt hashes.  The label stops "hash shucking" with plain SHA-256
hashes of the same password leaked elsewhere.  Passwords of 8 to 1,024 bytes
are accepted at registration (NIST SP 800-63B asks for at least 64 characters).

Lockout: 5 wrong passwords for one account *from one source address* lock that
account for that source for 60 s (design 002).  Other sources are unaffected, so
an attacker cannot lock a victim out from everywhere by guessing.  Unknown users
take the same path: a dummy bcrypt check, the same lockout bookkeeping, the same
answer.
"""

from __future__ import annotations

import base64
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import bcrypt

from crypto_utils import hmac_sha256
from secureim.errors import AccountLocked, InvalidCredentials, InvalidPassword, InvalidUsername, UsernameTaken
from secureim.proto import normalize_username
from secureim.storage import Storage

log = logging.getLogger("secureim.auth")

MIN_PASSWORD_BYTES = 8
MAX_PASSWORD_BYTES = 1024
DEFAULT_BCRYPT_COST = 12
MAX_FAILURES = 5
LOCK_S = 60
PREHASH_KEY = b"secureim/v1 bcrypt prehash"
# bcrypt releases the GIL and takes a core for ~240 ms (cost 12).  It runs in a small
# pool of threads at a lower scheduling priority, so a burst of logins cannot starve
# the relay (docs/PERFORMANCE.md measures this).
BCRYPT_WORKERS = 1
BCRYPT_NICE = 10


def _lower_priority(nice: int) -> None:
    """Lower this thread's CPU priority (Linux schedules threads individually)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (OSError, AttributeError):  # not Linux, or not permitted: run at normal priority
        pass


_runs_lock = threading.Lock()
_runs = 0


def _count_bcrypt_run() -> None:
    global _runs
    with _runs_lock:
        _runs += 1


def bcrypt_runs() -> int:
    """bcrypt hashes and checks run by this process so far (the tests and benchmarks count them)."""
    with _runs_lock:
        return _runs


def _prehash(password: bytes) -> bytes:
    return base64.b64encode(hmac_sha256(PREHASH_KEY, password))


def hash_password(password: bytes, cost: int = DEFAULT_BCRYPT_COST) -> str:
    _count_bcrypt_run()
    return bcrypt.hashpw(_prehash(password), bcrypt.gensalt(rounds=cost)).decode("ascii")


def check_password(password: bytes, stored_hash: str) -> bool:
    _count_bcrypt_run()
    try:
        return bcrypt.checkpw(_prehash(password), stored_hash.encode("ascii"))
    except ValueError:  # a corrupt stored hash never logs anyone in
        log.error("a stored password hash is corrupt")
        return False


class AuthService:
    """Registration and login against a :class:`database.Storage`."""

    def __init__(
        self,
        storage: Storage,
        *,
        bcrypt_cost: int = DEFAULT_BCRYPT_COST,
        max_failures: int = MAX_FAILURES,
        lock_s: float = LOCK_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.storage = storage
        self.bcrypt_cost = bcrypt_cost
        self.max_failures = max_failures
        self.lock_s = lock_s
        self.clock = clock
        self._bcrypt = ThreadPoolExecutor(
            max_workers=BCRYPT_WORKERS,
            thread_name_prefix="bcrypt",
            initializer=_lower_priority,
            initargs=(BCRYPT_NICE,),
        )
        # Unknown users are checked against this, so they take as long as real ones.
        self._dummy_hash = hash_password(b"secureim dummy password", bcrypt_cost)

    def bcrypt_queue_depth(self) -> int:
        """Password checks waiting for a bcrypt thread (a metrics gauge; any thread)."""
        return self._bcrypt._work_queue.qsize()  # noqa: SLF001 - the stdlib executor's queue

    def _check(self, password: bytes, stored_hash: str) -> bool:
        return self._bcrypt.submit(check_password, password, stored_hash).result()

    def register(
        self, raw_username: str, password: bytes, source: str = "", identity_key: bytes | None = None
    ) -> str:
        username = normalize_username(raw_username)
        if len(password) < MIN_PASSWORD_BYTES:
            raise InvalidPassword(f"Passwords must be at least {MIN_PASSWORD_BYTES} characters.")
        if len(password) > MAX_PASSWORD_BYTES:
            raise InvalidPassword(f"Passwords must be at most {MAX_PASSWORD_BYTES} bytes.")
        stored = self._bcrypt.submit(hash_password, password, self.bcrypt_cost).result()
        if not self.storage.create_user(username, stored, identity_key):
            raise UsernameTaken(f"The username {username!r} is already taken.")
        # Failed logins for this name from this source came before the account existed.
        self.storage.clear_login_failures(username, source)
        log.info("registered a new user")
        return username

    def login(self, raw_username: str, password: bytes, source: str) -> str:
        """The normalised username, or :class:`InvalidCredentials` / :class:`AccountLocked`."""
        try:
            username = normalize_username(raw_username)
        except InvalidUsername:
            self._check(password[:MAX_PASSWORD_BYTES], self._dummy_hash)
            raise InvalidCredentials() from None
        now = self.clock()
        failures = self.storage.get_login_failures(username, source)
        if failures.locked_until > now:
            raise AccountLocked(math.ceil(failures.locked_until - now))
        stored = self.storage.get_password_hash(username)
        ok = self._check(password, stored if stored is not None else self._dummy_hash)
        if ok and stored is not None and 0 < len(password) <= MAX_PASSWORD_BYTES:
            if failures.failures:
                self.storage.clear_login_failures(username, source)
            return username
        after = self.storage.record_login_failure(
            username, source, self.clock(), self.max_failures, self.lock_s
        )
        if after.locked_until > now:
            raise AccountLocked(math.ceil(after.locked_until - self.clock()))
        raise InvalidCredentials()

    def change_password(self, username: str, old_password: bytes, new_password: bytes, source: str) -> int:
        """Check the old password (same lockout as a login), store the new one and end every
        resumption ticket of the account; returns the account's new ticket epoch."""
        self.login(username, old_password, source)
        if len(new_password) < MIN_PASSWORD_BYTES:
            raise InvalidPassword(f"Passwords must be at least {MIN_PASSWORD_BYTES} characters.")
        if len(new_password) > MAX_PASSWORD_BYTES:
            raise InvalidPassword(f"Passwords must be at most {MAX_PASSWORD_BYTES} bytes.")
        stored = self._bcrypt.submit(hash_password, new_password, self.bcrypt_cost).result()
        epoch = self.storage.change_password_hash(username, stored)
        if epoch is None:
            raise InvalidCredentials()
        log.info("a user changed their password")
        return epoch
