"""The encrypted local history: keep a user's conversations on disk that only their password opens.

One SQLite file per user and service, ``<home>/history/<user>@<service>.sqlite``
(mode 0600).  What is in it (docs/CLIENT.md, "The history file"):

- ``meta``: the format, the scrypt parameters and salt, and the *data key*
  (32 random bytes) sealed with AES-256-GCM under scrypt(password) -- the same
  derivation as the identity key file (``e2e.IdentityStore``).  A password
  change seals the data key again; the rows stay as they are.
- ``messages``: one row per message: a conversation tag (HMAC of the peer's
  name under a key derived from the data key, so names are not in the file), the
  time in milliseconds, a random nonce and the sealed content (peer, direction,
  text, delivery state) under AES-256-GCM.  Each row's associated data binds it
  to this user, this service, its conversation tag and its time: a row moved to
  another conversation, or given another time, no longer opens.

Nothing is ever stored in plaintext; a row that fails its check is never shown
(it is counted as damaged).  Bounds: at most ``max_per_conversation`` rows per
conversation and nothing older than ``max_age_days``; the oldest go first.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import crypto_utils as cu
from secureim.e2e import sessions as e2e
from secureim.errors import CryptoError, DecryptionFailed, HistoryError, HistoryLocked

HISTORY_FORMAT = 1
HISTORY_DIR = "history"
DEFAULT_MAX_PER_CONVERSATION = 10_000
DEFAULT_MAX_AGE_DAYS = 365.0
SHOWN_ON_OPEN = 5  # lines shown when a conversation is opened
DATA_KEY_BYTES = 32
CONVERSATION_TAG_BYTES = 16
SALT_BYTES = cu.SCRYPT_SALT_BYTES

OUTGOING, INCOMING = "out", "in"
# Delivery states.  "sent": handed to the server, no answer yet; "accepted": the server took it
# (no refusal came back before a later round trip, see clientlib.send_confirmed); "refused": the
# server refused it (peer offline); "received": a message from the peer.  "delivered" is kept
# for end-to-end receipts, which this protocol does not have yet.
STATE_SENT, STATE_ACCEPTED, STATE_REFUSED, STATE_RECEIVED, STATE_DELIVERED = (
    "sent",
    "accepted",
    "refused",
    "received",
    "delivered",
)
STATES = frozenset({STATE_SENT, STATE_ACCEPTED, STATE_REFUSED, STATE_RECEIVED, STATE_DELIVERED})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conversation BLOB NOT NULL,
    at_ms INTEGER NOT NULL,
    nonce BLOB NOT NULL,
    sealed BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation, id);
CREATE INDEX IF NOT EXISTS messages_by_age ON messages (at_ms);
"""
_KEY_AAD = b"secureim/v1 history data key\0"  # then the owner: the sealed data key's associated data
_ROW_LABEL = "history row\0"  # each row's box label, "secureim/v1 history row\0", then History._aad


@dataclass(frozen=True)
class Entry:
    """One message of the history, as it was sent or received."""

    id: int
    peer: str
    direction: str  # OUTGOING | INCOMING
    text: str
    at: float  # seconds since the epoch: when it was sent (ours) or received (theirs)
    state: str


@dataclass(frozen=True)
class Page:
    """The last entries of a conversation, oldest first, and how many rows failed their check."""

    entries: tuple[Entry, ...]
    damaged: int = 0


def history_path(home: Path, username: str, service_id: str) -> Path:
    return Path(home) / HISTORY_DIR / e2e.file_component(f"{username}@{service_id}.sqlite")


class History:
    """A user's history with one service.  Open it with :meth:`open`; thread-safe."""

    def __init__(
        self,
        path: Path,
        db: sqlite3.Connection,
        owner: bytes,
        data_key: bytes,
        *,
        max_per_conversation: int,
        max_age_days: float,
    ) -> None:
        self.path = path
        self._db = db
        self._owner = owner
        self._lock = threading.Lock()
        self._closed = False
        self._data_key = data_key  # kept to seal it again on a password change
        self._content = cu.SealedBox(
            cu.hkdf(data_key, salt=None, info=cu.label("history content"), length=32), _ROW_LABEL
        )
        self._index_key = cu.hkdf(data_key, salt=None, info=cu.label("history index"), length=32)
        self.max_per_conversation = max_per_conversation
        self.max_age_days = max_age_days

    # -- opening --------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        home: Path,
        username: str,
        service_id: str,
        password: str,
        *,
        max_per_conversation: int = DEFAULT_MAX_PER_CONVERSATION,
        max_age_days: float = DEFAULT_MAX_AGE_DAYS,
    ) -> History:
        """Open (or create) the history; :class:`HistoryLocked` if this password does not open it."""
        if max_per_conversation < 1 or max_age_days <= 0:
            raise HistoryError(
                "The history keeps at least one message per conversation for more than 0 days."
            )
        path = history_path(home, username, service_id)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():  # created 0600 before SQLite writes a byte
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        try:
            db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            db.executescript(_SCHEMA)
            meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
        except sqlite3.Error as exc:
            raise HistoryError(f"The history file {path} cannot be used: {exc}.") from None
        owner = f"{username}@{service_id}".encode()
        if not meta:
            data_key = cu.random_bytes(DATA_KEY_BYTES)
            cls._store_key(db, owner, password, data_key, first=True)
        else:
            data_key = cls._unwrap(meta, owner, password, path)
        history = cls(
            path, db, owner, data_key, max_per_conversation=max_per_conversation, max_age_days=max_age_days
        )
        history.prune()
        return history

    @staticmethod
    def _store_key(
        db: sqlite3.Connection, owner: bytes, password: str, data_key: bytes, *, first: bool
    ) -> None:
        key_doc = cu.seal_with_password(password, data_key, _KEY_AAD + owner)  # a cu.PasswordSeal envelope
        rows = [("key", json.dumps(key_doc))] + ([("format", str(HISTORY_FORMAT))] if first else [])
        db.executemany("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", rows)

    @staticmethod
    def _unwrap(meta: dict, owner: bytes, password: str, path: Path) -> bytes:
        try:
            if meta.get("format") != str(HISTORY_FORMAT):
                raise HistoryError(f"The history file {path} has an unknown format.")
            doc = json.loads(meta["key"])
            if not isinstance(doc, dict) or doc.get("kdf") != "scrypt" or doc.get("cipher") != "aes-256-gcm":
                raise HistoryError(f"The history file {path} has an unknown format.")
            # scrypt with the salt and parameters the file records (bounded), then AES-256-GCM
            return cu.open_with_password(doc, password, _KEY_AAD + owner)
        except DecryptionFailed:
            raise HistoryLocked(
                f"The history in {path} is sealed under another password (changed on another "
                "device, or reset by an administrator); it was not opened and nothing is "
                "recorded. Delete the file to start a new history."
            ) from None
        except (KeyError, ValueError, TypeError, CryptoError) as exc:
            raise HistoryError(f"The history file {path} is damaged ({exc.__class__.__name__}).") from None

    def change_password(self, new_password: str) -> None:
        """Seal the data key again under ``new_password`` (after /passwd); the rows stay."""
        with self._lock:
            self._store_key(self._db, self._owner, new_password, self._data_key, first=False)

    # -- rows -------------------------------------------------------------------------
    def _tag(self, peer: str) -> bytes:
        return cu.hmac_sha256(self._index_key, peer.encode("utf-8"))[:CONVERSATION_TAG_BYTES]

    def _aad(self, tag: bytes, at_ms: int) -> bytes:
        return len(self._owner).to_bytes(2, "big") + self._owner + tag + at_ms.to_bytes(8, "big")

    def _seal(self, tag: bytes, at_ms: int, content: dict) -> tuple[bytes, bytes]:
        raw = json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        sealed = self._content.seal(raw, self._aad(tag, at_ms))
        return sealed[: cu.SEALED_BOX_NONCE_BYTES], sealed[cu.SEALED_BOX_NONCE_BYTES :]  # two columns

    def _open_row(self, row_id: int, tag: bytes, at_ms: int, nonce: bytes, sealed: bytes) -> Entry | None:
        try:
            doc = json.loads(self._content.open(nonce + sealed, self._aad(tag, at_ms)))
            entry = Entry(
                row_id, str(doc["peer"]), str(doc["dir"]), str(doc["text"]), at_ms / 1000.0, str(doc["state"])
            )
        except (DecryptionFailed, ValueError, KeyError, TypeError):
            return None
        return entry if self._tag(entry.peer) == tag and entry.direction in (OUTGOING, INCOMING) else None

    def record(self, peer: str, direction: str, text: str, *, state: str, at: float | None = None) -> int:
        """Add one message; returns its row id (for :meth:`set_state`)."""
        if direction not in (OUTGOING, INCOMING) or state not in STATES:
            raise ValueError("unknown direction or delivery state")
        tag, at_ms = self._tag(peer), int((time.time() if at is None else at) * 1000)
        nonce, sealed = self._seal(tag, at_ms, {"peer": peer, "dir": direction, "text": text, "state": state})
        with self._lock:
            if self._closed:  # a message that arrived while the client closed: not kept
                return -1
            cur = self._db.execute(
                "INSERT INTO messages (conversation, at_ms, nonce, sealed) VALUES (?, ?, ?, ?)",
                (tag, at_ms, nonce, sealed),
            )
            self._db.execute(
                "DELETE FROM messages WHERE conversation = ? AND id <= (SELECT id FROM messages "
                "WHERE conversation = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (tag, tag, self.max_per_conversation),
            )
            return int(cur.lastrowid or 0)

    def set_state(self, row_id: int, state: str) -> bool:
        """Change a row's delivery state (the row is sealed again, with a new nonce)."""
        if state not in STATES:
            raise ValueError("unknown delivery state")
        with self._lock:
            if self._closed:
                return False
            row = self._db.execute(
                "SELECT conversation, at_ms, nonce, sealed FROM messages WHERE id = ?", (row_id,)
            ).fetchone()
            entry = self._open_row(row_id, *row) if row else None
            if entry is None:
                return False
            if entry.state == STATE_DELIVERED and state != STATE_DELIVERED:
                return False  # final: the peer's receipt said so (a late 'accepted' must not undo it)
            nonce, sealed = self._seal(
                row[0],
                row[1],
                {"peer": entry.peer, "dir": entry.direction, "text": entry.text, "state": state},
            )
            self._db.execute(
                "UPDATE messages SET nonce = ?, sealed = ? WHERE id = ?", (nonce, sealed, row_id)
            )
        return True

    def last(self, peer: str, limit: int = 20) -> Page:
        """The last ``limit`` messages with ``peer``, oldest first, in the order they were said
        (an answer can be written before the question it answers: the two are different threads)."""
        tag = self._tag(peer)
        with self._lock:
            rows = self._db.execute(
                "SELECT id, conversation, at_ms, nonce, sealed FROM messages "
                "WHERE conversation = ? ORDER BY at_ms DESC, id DESC LIMIT ?",
                (tag, max(0, limit)),
            ).fetchall()
        opened = [self._open_row(*row) for row in reversed(rows)]
        entries = tuple(e for e in opened if e is not None)
        return Page(entries, damaged=len(opened) - len(entries))

    def forget(self, peer: str) -> int:
        """Erase every message with ``peer``; returns how many rows went."""
        with self._lock:
            cur = self._db.execute("DELETE FROM messages WHERE conversation = ?", (self._tag(peer),))
            self._db.execute("VACUUM")  # the freed pages held ciphertext only, but leave nothing behind
            return cur.rowcount

    def prune(self) -> int:
        """Drop what is older than the age bound; returns how many rows went."""
        cutoff_ms = int((time.time() - self.max_age_days * 86400) * 1000)
        with self._lock:
            return self._db.execute("DELETE FROM messages WHERE at_ms < ?", (cutoff_ms,)).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._closed = True
