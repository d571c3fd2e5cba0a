"""Store and forward, end to end (sans-IO): prekeys and offline sessions.

docs/PROTOCOL.md section 15.  A client that logs in publishes a prekey bundle:

- a **signed prekey**: an X25519 key and an ML-KEM-768 encapsulation key, signed by
  the user's Ed25519 identity key, replaced every week (``SIGNED_PREKEY_LIFETIME_S``);
- **one-time prekeys**: X25519 keys, each signed, used once and topped up.

A sender to someone who is offline asks the server (the KDC) for a fresh key
generation of their conversation and the peer's bundle (one one-time prekey is
taken out of the server's table in the same transaction).  It then starts an
:class:`OutboundSession` (X3DH-like, post-quantum as in Signal's PQXDH):

    ephemeral X25519 key E, ML-KEM encapsulation to the signed prekey's ek,
    root = HKDF(KDC key || X25519(E, SPK) || X25519(E, OPK) (if any) || ML-KEM secret,
                salt = transcript hash, info = label("e2e offline root x25519-mlkem768"))

and every message carries the signed init header (the sender's identity key signs
E, the KEM ciphertext, the prekey ids and both names), followed by the same hash
ratchet as live conversations (e2e.py).  The recipient (:class:`InboundSessions`)
needs the private prekeys, which never leave its machine (:class:`PrekeyStore`,
sealed under a key from the password), and the KDC key, which the server keeps
sealed under its own key until the message is acknowledged.  The server holds
neither private prekey: what it stores it cannot open.

One-time prekeys are deleted when first used, so a replayed init message finds its
prekey gone; an init under the signed prekey alone is remembered (by its ephemeral
key) for as long as the signed prekey is kept, so it is not accepted twice either.
"""

from __future__ import annotations

import collections
import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import crypto_utils as cu
from secureim.e2e import sessions as e2e
from secureim.errors import CryptoError, DecryptionFailed, InvalidKemValue, SecureIMError

KIND_INIT = 4
SIGNED = struct.Struct(f">I32s{cu.MLKEM768_ENCAPSULATION_KEY_BYTES}s64s")  # id, X25519, ek, signature
ONE_TIME = struct.Struct(">I32s64s")  # id, X25519, signature
# kind, generation, signed prekey id, one-time prekey id (0: none), ephemeral X25519, ML-KEM ciphertext, signature
INIT = struct.Struct(f">BIII32s{cu.MLKEM768_CIPHERTEXT_BYTES}s64s")
COUNTER = struct.Struct(">Q")

SIGNED_PREKEY_LIFETIME_S = 7 * 24 * 3600  # a new signed prekey every week (Signal: a week to a month)
RETIRED_PREKEY_KEEP_S = 45 * 24 * 3600  # an old one still opens messages stored before it was replaced
MAX_SIGNED_KEPT = 8
ONE_TIME_TARGET = 100  # topped up to this many on the server...
ONE_TIME_LOW = 50  # ...when fewer than this are left
MAX_ONE_TIME_KEPT = 1000  # private one-time keys kept here (handed out, not used yet): the
# oldest go first, and any older than RETIRED_PREKEY_KEEP_S
MAX_SEEN_PER_SIGNED = 5000  # inits under the signed prekey alone, remembered against replay
MAX_PROCESSED = 4000  # stored messages already handled (a redelivery is acked, not shown)
MAX_SEEN_IDS = 4000  # ids of messages shown (a resend after a reconnect is shown once)
MAX_INBOUND_SESSIONS = 256  # offline sessions from peers, kept (sealed) in the store
MAX_INBOUND_SKIPPED = 200  # skipped-message keys kept per offline session
STORED_MAX_AGE_S = RETIRED_PREKEY_KEEP_S  # a stored message older than this is refused
STORE_FORMAT = 1  # a cu.PasswordSeal envelope plus "format" (docs/CLIENT.md)


class BundleRejected(SecureIMError):
    """A peer's prekey bundle failed its checks: nothing is sent with it."""


def _prekey_text(kind: str, owner: str, key_id: int, public: bytes) -> bytes:
    return (
        b"secureim/v1 "
        + kind.encode()
        + b"\x00"
        + bytes([len(owner)])
        + owner.encode()
        + key_id.to_bytes(4, "big")
        + public
    )


def _init_text(
    cid: int,
    generation: int,
    sender: str,
    recipient: str,
    spk_id: int,
    opk_id: int,
    ephemeral: bytes,
    ciphertext: bytes,
    prekeys_hash: bytes,
) -> bytes:
    return (
        b"secureim/v1 e2e offline init\x00"
        + cid.to_bytes(8, "big")
        + generation.to_bytes(4, "big")
        + bytes([len(sender)])
        + sender.encode()
        + bytes([len(recipient)])
        + recipient.encode()
        + spk_id.to_bytes(4, "big")
        + opk_id.to_bytes(4, "big")
        + ephemeral
        + ciphertext
        + prekeys_hash
    )


def _prekeys_hash(spk_x: bytes, spk_ek: bytes, opk_x: bytes) -> bytes:
    return cu.sha256(b"secureim/v1 offline prekeys" + spk_x + spk_ek + opk_x)


def _root(
    kdc_key: bytes,
    secrets: list[bytes],
    cid: int,
    generation: int,
    sender: str,
    recipient: str,
    identities: tuple[bytes, bytes],
    header: bytes,
) -> bytes:
    transcript = cu.sha256(
        b"secureim/v1 e2e offline root"
        + cid.to_bytes(8, "big")
        + generation.to_bytes(4, "big")
        + bytes([len(sender)])
        + sender.encode()
        + bytes([len(recipient)])
        + recipient.encode()
        + b"".join(sorted(identities))
        + header
    )
    return cu.hkdf(
        kdc_key + b"".join(secrets),
        salt=transcript,
        info=cu.label("e2e offline root x25519-mlkem768"),
        length=32,
    )


def _chain_key(root: bytes, sender: str, recipient: str) -> bytes:
    return cu.hkdf(root, salt=None, info=cu.label(f"offline chain {sender}>{recipient}"), length=32)


def _aad(cid: int, sender: str, recipient: str, header: bytes, counter: int) -> bytes:
    return (
        b"secureim/v1 e2e offline message"
        + cid.to_bytes(8, "big")
        + bytes([len(sender)])
        + sender.encode()
        + bytes([len(recipient)])
        + recipient.encode()
        + header
        + COUNTER.pack(counter)
    )


def _cipher(suite: cu.Suite, message_key: bytes):
    material = cu.hkdf(message_key, salt=None, info=cu.label("message key"), length=suite.key_bytes)
    return suite.cipher(suite.key_from_material(material))


def payload_digest(payload: bytes) -> bytes:
    return cu.sha256(b"secureim/v1 stored payload" + payload)


# =============================================================================
# The sender's side
# =============================================================================
@dataclass(frozen=True)
class Bundle:
    signed_id: int
    signed_x25519: bytes
    signed_ek: bytes
    one_time_id: int  # 0: none was left (the signed prekey alone)
    one_time_x25519: bytes  # b"" when none


def verify_bundle(peer: str, peer_identity: bytes, signed_prekey: bytes, one_time_prekey: bytes) -> Bundle:
    """Check the sizes and both signatures with the peer's (pinned) identity key."""
    if len(signed_prekey) != SIGNED.size or len(one_time_prekey) not in (0, ONE_TIME.size):
        raise BundleRejected(f"{peer}'s prekeys were malformed; nothing was sent.")
    spk_id, spk_x, spk_ek, spk_sig = SIGNED.unpack(signed_prekey)
    if spk_id == 0 or not cu.verify_signature(
        peer_identity, spk_sig, _prekey_text("signed prekey", peer, spk_id, spk_x + spk_ek)
    ):
        raise BundleRejected(
            f"{peer}'s signed prekey is not signed by {peer}'s identity key: someone (the "
            f"server?) tampered with it. Nothing was sent."
        )
    opk_id, opk_x = 0, b""
    if one_time_prekey:
        opk_id, opk_x, opk_sig = ONE_TIME.unpack(one_time_prekey)
        if opk_id == 0 or not cu.verify_signature(
            peer_identity, opk_sig, _prekey_text("one-time prekey", peer, opk_id, opk_x)
        ):
            raise BundleRejected(
                f"{peer}'s one-time prekey is not signed by {peer}'s identity key: someone (the "
                f"server?) tampered with it. Nothing was sent."
            )
    return Bundle(spk_id, spk_x, spk_ek, opk_id, opk_x)


class OutboundSession:
    """Messages to a peer who is offline: every payload is ``init header || counter || sealed``."""

    def __init__(
        self,
        me: str,
        identity: cu.IdentityKey,
        peer: str,
        peer_identity: bytes,
        cid: int,
        generation: int,
        kdc_key: bytes,
        suite: cu.Suite,
        bundle: Bundle,
        *,
        clock=time.time,
    ) -> None:
        if len(kdc_key) != suite.key_bytes:
            raise CryptoError("The server sent an unusable conversation key.")
        self.me, self.peer, self.id, self.generation, self.suite = me, peer, cid, generation, suite
        self.peer_identity = peer_identity
        self._clock = clock
        ephemeral = cu.X25519Key.generate()
        e_pub = ephemeral.public_key().public_bytes_raw()
        try:
            secrets = [ephemeral.exchange(cu.X25519Public.from_public_bytes(bundle.signed_x25519))]
            if bundle.one_time_id:
                secrets.append(ephemeral.exchange(cu.X25519Public.from_public_bytes(bundle.one_time_x25519)))
            kem_secret, ciphertext = cu.mlkem768_encapsulate(bundle.signed_ek)
        except (ValueError, InvalidKemValue) as exc:
            raise BundleRejected(f"{peer}'s prekeys were refused: {exc}") from None
        secrets.append(kem_secret)
        signature = identity.sign(
            _init_text(
                cid,
                generation,
                me,
                peer,
                bundle.signed_id,
                bundle.one_time_id,
                e_pub,
                ciphertext,
                _prekeys_hash(bundle.signed_x25519, bundle.signed_ek, bundle.one_time_x25519),
            )
        )
        self.header = INIT.pack(
            KIND_INIT, generation, bundle.signed_id, bundle.one_time_id, e_pub, ciphertext, signature
        )
        root = _root(
            kdc_key,
            secrets,
            cid,
            generation,
            me,
            peer,
            (cu.public_bytes(identity), peer_identity),
            self.header,
        )
        self._chain = e2e.Chain(_chain_key(root, me, peer))
        del ephemeral, secrets, kem_secret, root  # only the chain key stays

    def seal(self, body_type: int, msg_id: bytes, content: bytes) -> bytes:
        counter, message_key = self._chain.step()
        body = e2e.pack_body(body_type, msg_id, content, self._clock())
        sealed = _cipher(self.suite, message_key).seal(
            body, _aad(self.id, self.me, self.peer, self.header, counter)
        )
        return self.header + COUNTER.pack(counter) + sealed


# =============================================================================
# The recipient's side: private prekeys at rest
# =============================================================================
@dataclass
class _Signed:
    id: int
    x25519: bytes  # private, raw
    kem_seed: bytes  # ML-KEM-768 seed (d || z)
    created: float
    retired: float | None = None
    seen: list[str] = field(default_factory=list)  # hashes of ephemeral keys used without a one-time prekey


class PrekeyStore:
    """``<home>/prekeys/<user>@<server>.json``: the private prekeys, sealed with AES-256-GCM under
    ``scrypt(password, salt)`` (as the identity key is); the key is derived once per login."""

    def __init__(self, home: Path, username: str, server_id: str, password: str, *, clock=time.time) -> None:
        self.path = Path(home) / "prekeys" / e2e.file_component(f"{username}@{server_id}.json")
        self.username = username
        self._clock = clock
        self.signed: list[_Signed] = []
        self.one_time: dict[int, bytes] = {}
        self.one_time_at: dict[int, float] = {}  # when each one-time key was made
        self.processed: collections.deque[str] = collections.deque(maxlen=MAX_PROCESSED)
        self._processed_set: set[str] = set()
        self.inbound: dict[str, dict] = {}  # offline sessions peers started (InboundSessions)
        # ids of messages shown, "peer|b64(id)", oldest first (offline.Mailbox.seen_before)
        self.seen_ids: collections.deque[str] = collections.deque(maxlen=MAX_SEEN_IDS)
        self.rooms: dict[str, dict] = {}  # room name -> its sealed state (rooms.RoomSession.to_dict)
        self.rooms_left: dict[str, int] = {}  # b64(room uid) -> the epoch at which our membership ended
        self.created = False  # a new store: whatever the server holds for us is stale
        doc = None
        if self.path.exists():
            try:
                doc = json.loads(self.path.read_text())
                # the key from the salt and scrypt parameters the file records (none: the defaults)
                self._seal = cu.PasswordSeal.for_envelope(doc, password)
            except (ValueError, KeyError, TypeError, AttributeError, SecureIMError):
                doc = None
        if doc is None:
            self._seal = cu.PasswordSeal(password)
        if doc is None or not self._load(doc):
            self.created = True  # none, unreadable, or another password's: start again (peers' bundles renew)

    def _aad(self) -> bytes:
        return b"secureim/v1 prekey store" + self.username.encode()

    def _load(self, doc: dict) -> bool:
        try:
            if doc.get("format") != STORE_FORMAT:
                return False
            plain = self._seal.open(doc, self._aad())
            state = json.loads(plain)
            self.signed = [
                _Signed(
                    s["id"],
                    cu.b64decode(s["x"]),
                    cu.b64decode(s["kem"]),
                    s["created"],
                    s.get("retired"),
                    list(s.get("seen", [])),
                )
                for s in state["signed"]
            ]
            self.one_time = {int(k): cu.b64decode(v) for k, v in state["one_time"].items()}
            self.one_time_at = {int(k): float(v) for k, v in state.get("one_time_at", {}).items()}
            self.processed.extend(state.get("processed", []))
            self._processed_set = set(self.processed)
            self.inbound = dict(state.get("inbound", {}))
            self.seen_ids.extend(state.get("seen_ids", []))
            self.rooms = dict(state.get("rooms", {}))
            self.rooms_left = dict(state.get("rooms_left", {}))
        except (ValueError, KeyError, TypeError, AttributeError, SecureIMError):
            return False
        return True

    def save(self) -> None:
        state = {
            "processed": list(self.processed),
            "inbound": self.inbound,
            "seen_ids": list(self.seen_ids),
            "rooms": self.rooms,
            "rooms_left": self.rooms_left,
            "one_time_at": {str(k): v for k, v in self.one_time_at.items()},
            "signed": [
                {
                    "id": s.id,
                    "x": cu.b64encode(s.x25519),
                    "kem": cu.b64encode(s.kem_seed),
                    "created": s.created,
                    "retired": s.retired,
                    "seen": s.seen[-MAX_SEEN_PER_SIGNED:],
                }
                for s in self.signed
            ],
            "one_time": {str(k): cu.b64encode(v) for k, v in self.one_time.items()},
        }
        doc = {"format": STORE_FORMAT, **self._seal.seal(json.dumps(state).encode(), self._aad())}
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        cu.write_private_file(self.path, json.dumps(doc).encode())

    def change_password(self, password: str) -> None:
        """Seal the store again under a new password (``/passwd``): a new salt, a new key."""
        self._seal = cu.PasswordSeal(password)
        self.save()

    def _new_id(self) -> int:
        """A random non-zero id no key here has: a store made again (a lost file, another device)
        never reuses the id of a prekey that senders still hold."""
        used = set(self.one_time) | {s.id for s in self.signed}
        while True:
            key_id = int.from_bytes(cu.random_bytes(4), "big")
            if key_id and key_id not in used:
                return key_id

    def current_signed(self) -> _Signed | None:
        live = [s for s in self.signed if s.retired is None]
        return live[-1] if live else None

    def plan_publish(
        self, identity: cu.IdentityKey, server_one_time: int, server_signed_id: int
    ) -> tuple[bytes, bytes, bool] | None:
        """What to publish after the server's PrekeyStatus: (signed prekey or b"", one-time prekeys,
        replace), or None when nothing is due.  Saves the new private keys before they are published."""
        now = self._clock()
        replace = self.created or server_one_time > len(self.one_time)  # the server holds keys we cannot open
        current = self.current_signed()
        signed_entry = b""
        if (
            current is None
            or now - current.created > SIGNED_PREKEY_LIFETIME_S
            or replace
            or server_signed_id != current.id
        ):
            if current is not None and now - current.created > SIGNED_PREKEY_LIFETIME_S:
                current.retired = now
                current = None
            if current is None:
                current = _Signed(
                    self._new_id(),
                    cu.X25519Key.generate().private_bytes_raw(),
                    cu.random_bytes(cu.MLKEM768_SEED_BYTES),
                    now,
                )
                self.signed.append(current)
            x_pub = cu.X25519Key.from_private_bytes(current.x25519).public_key().public_bytes_raw()
            ek = cu.MLKEM768KeyPair(current.kem_seed).encapsulation_key
            signed_entry = SIGNED.pack(
                current.id,
                x_pub,
                ek,
                identity.sign(_prekey_text("signed prekey", self.username, current.id, x_pub + ek)),
            )
        self.signed = [s for s in self.signed if s.retired is None or now - s.retired < RETIRED_PREKEY_KEEP_S]
        self.signed = self.signed[-MAX_SIGNED_KEPT:]
        if replace:
            self.one_time.clear()
            self.one_time_at.clear()
            server_one_time = 0
        # Handed out but never used: kept for messages on their way, not forever.
        for key_id in [
            k for k in self.one_time if now - self.one_time_at.get(k, now) > RETIRED_PREKEY_KEEP_S
        ]:
            self.drop_one_time(key_id)
        one_time = b""
        if server_one_time < ONE_TIME_LOW:
            for _ in range(ONE_TIME_TARGET - server_one_time):
                key_id = self._new_id()
                private = cu.X25519Key.generate()
                self.one_time[key_id] = private.private_bytes_raw()
                self.one_time_at[key_id] = now
                public = private.public_key().public_bytes_raw()
                one_time += ONE_TIME.pack(
                    key_id,
                    public,
                    identity.sign(_prekey_text("one-time prekey", self.username, key_id, public)),
                )
            while len(self.one_time) > MAX_ONE_TIME_KEPT:  # the oldest handed-out ones go first
                self.drop_one_time(min(self.one_time, key=lambda k: self.one_time_at.get(k, 0.0)))
        if not signed_entry and not one_time:
            return None
        self.created = False
        self.save()
        return signed_entry, one_time, replace

    def drop_one_time(self, key_id: int) -> None:
        self.one_time.pop(key_id, None)
        self.one_time_at.pop(key_id, None)

    def already_processed(self, digest: bytes) -> bool:
        """A digest of a (public) payload, not a secret: a set lookup."""
        return cu.b64encode(digest) in self._processed_set

    def mark_processed(self, digest: bytes, *, save: bool = True) -> None:
        if len(self.processed) == MAX_PROCESSED:
            self._processed_set.discard(self.processed[0])  # the deque drops it on the append
        text = cu.b64encode(digest)
        self.processed.append(text)
        self._processed_set.add(text)
        if save:
            self.save()


# =============================================================================
# The recipient's side: sessions started by peers
# =============================================================================
@dataclass
class _Inbound:
    header_hash: bytes
    chain: e2e.Chain
    skipped: dict[int, bytes] = field(default_factory=dict)

    def to_doc(self, now: float) -> dict:
        return {
            "header": cu.b64encode(self.header_hash),
            "chain": cu.b64encode(self.chain.key),
            "index": self.chain.index,
            "at": now,
            "skipped": {
                str(k): cu.b64encode(v) for k, v in list(self.skipped.items())[-MAX_INBOUND_SKIPPED:]
            },
        }

    @classmethod
    def from_doc(cls, doc: dict) -> _Inbound:
        chain = e2e.Chain(cu.b64decode(doc["chain"]))
        chain.index = int(doc["index"])
        return cls(
            cu.b64decode(doc["header"]), chain, {int(k): cu.b64decode(v) for k, v in doc["skipped"].items()}
        )


@dataclass(frozen=True)
class StoredContext:
    """What the server's StoredMessage says around the payload (all of it checked before use)."""

    me: str
    identity: cu.IdentityKey
    peer: str
    peer_identity: bytes  # the pinned key (the caller has checked it against its trust store)
    cid: int
    generation: int
    kdc_key: bytes
    suite: cu.Suite


class InboundSessions:
    """Offline sessions other users started with this client's prekeys, keyed by (peer, conversation, generation)."""

    def __init__(self, store: PrekeyStore, *, clock=time.time) -> None:
        self.store = store
        self._clock = clock

    @staticmethod
    def _key(peer: str, cid: int, generation: int) -> str:
        return f"{peer}|{cid}|{generation}"

    def _session(self, key: str) -> _Inbound | None:
        doc = self.store.inbound.get(key)
        if doc is None:
            return None
        try:
            return _Inbound.from_doc(doc)
        except (KeyError, TypeError, ValueError, SecureIMError):
            return None

    def open(self, ctx: StoredContext, payload: bytes, *, digest: bytes | None = None) -> e2e.Opened:
        """Open one stored payload; DecryptionFailed with a reason on anything wrong (nothing changes then).

        The session's state (chain key and position, skipped keys) is kept in the sealed store,
        so later messages of the same session open after this client restarts too; ``digest``
        is remembered as processed in the same write."""
        if len(payload) < INIT.size + COUNTER.size or payload[0] != KIND_INIT:
            raise DecryptionFailed(f"A stored message from {ctx.peer} was malformed and was refused.")
        header = payload[: INIT.size]
        _kind, generation, spk_id, opk_id, e_pub, ciphertext, signature = INIT.unpack(header)
        (counter,) = COUNTER.unpack_from(payload, INIT.size)
        if generation != ctx.generation or len(ctx.kdc_key) != ctx.suite.key_bytes:
            raise DecryptionFailed(
                f"A stored message from {ctx.peer} came with the wrong key and was refused."
            )
        key = self._key(ctx.peer, ctx.cid, generation)
        session = self._session(key)
        commit_new = None
        if session is not None:
            if not cu.constant_time_equal(session.header_hash, cu.sha256(header)):
                raise DecryptionFailed(
                    f"A stored message from {ctx.peer} claimed a session that does not match and was refused."
                )
        else:
            session, commit_new = self._start(ctx, header, spk_id, opk_id, e_pub, ciphertext, signature)
        message_key, commit_chain = e2e.next_message_key(
            session.chain,
            counter,
            session.skipped,
            lambda n: n,
            ctx.peer,
            MAX_INBOUND_SKIPPED,
            "stored message",
        )
        try:
            body = _cipher(ctx.suite, message_key).open(
                payload[INIT.size + COUNTER.size :], _aad(ctx.cid, ctx.peer, ctx.me, header, counter)
            )
        except DecryptionFailed:
            raise DecryptionFailed(
                f"A stored message from {ctx.peer} failed its integrity check and was discarded."
            ) from None
        opened = e2e.parse_body(body, ctx.peer)
        if not -e2e.FRESHNESS_WINDOW_S <= self._clock() - opened.sent_at <= STORED_MAX_AGE_S:
            raise DecryptionFailed(
                f"A stored message from {ctx.peer} was too old (or dated in the future) and was refused."
            )
        if commit_new is not None:
            commit_new()  # the one-time prekey is deleted (or the ephemeral key remembered) only now
        commit_chain()
        inbound = self.store.inbound
        inbound.pop(key, None)
        inbound[key] = session.to_doc(self._clock())
        while len(inbound) > MAX_INBOUND_SESSIONS:  # the least recently used session goes
            del inbound[min(inbound, key=lambda k: inbound[k].get("at", 0.0))]
        if digest is not None:
            self.store.mark_processed(digest, save=False)
        self.store.save()
        return opened

    def _start(
        self,
        ctx: StoredContext,
        header: bytes,
        spk_id: int,
        opk_id: int,
        e_pub: bytes,
        ciphertext: bytes,
        signature: bytes,
    ):
        store = self.store
        signed = next((s for s in store.signed if s.id == spk_id), None)
        if signed is None:
            raise DecryptionFailed(
                f"A stored message from {ctx.peer} used a prekey this client no longer has "
                "(expired, or from another device) and could not be opened."
            )
        if opk_id and opk_id not in store.one_time:
            raise DecryptionFailed(
                f"A stored message from {ctx.peer} used a one-time prekey that was already "
                "used: a replayed message was refused."
            )
        spk_private = cu.X25519Key.from_private_bytes(signed.x25519)
        spk_x = spk_private.public_key().public_bytes_raw()
        kem = cu.MLKEM768KeyPair(signed.kem_seed)
        opk_x = b""
        if opk_id:
            opk_private = cu.X25519Key.from_private_bytes(store.one_time[opk_id])
            opk_x = opk_private.public_key().public_bytes_raw()
        if not cu.verify_signature(
            ctx.peer_identity,
            signature,
            _init_text(
                ctx.cid,
                ctx.generation,
                ctx.peer,
                ctx.me,
                spk_id,
                opk_id,
                e_pub,
                ciphertext,
                _prekeys_hash(spk_x, kem.encapsulation_key, opk_x),
            ),
        ):
            raise DecryptionFailed(
                f"A stored message from {ctx.peer} is not signed by {ctx.peer}'s identity key: "
                "someone (the server?) forged or altered it. It was refused."
            )
        seen = cu.b64encode(cu.sha256(e_pub))
        if not opk_id and seen in signed.seen:
            raise DecryptionFailed(f"A stored message from {ctx.peer} was replayed and was refused.")
        try:
            e_public = cu.X25519Public.from_public_bytes(e_pub)
            secrets = [spk_private.exchange(e_public)]
            if opk_id:
                secrets.append(opk_private.exchange(e_public))
        except ValueError:
            raise DecryptionFailed(
                f"A stored message from {ctx.peer} had a bad key and was refused."
            ) from None
        secrets.append(kem.decapsulate(ciphertext))
        root = _root(
            ctx.kdc_key,
            secrets,
            ctx.cid,
            ctx.generation,
            ctx.peer,
            ctx.me,
            (cu.public_bytes(ctx.identity), ctx.peer_identity),
            header,
        )
        session = _Inbound(cu.sha256(header), e2e.Chain(_chain_key(root, ctx.peer, ctx.me)))

        def commit() -> None:  # the caller saves the store
            if opk_id:
                store.drop_one_time(opk_id)  # used once: its private key is gone
            else:
                signed.seen.append(seen)
                del signed.seen[:-MAX_SEEN_PER_SIGNED]

        return session, commit
