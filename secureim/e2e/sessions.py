"""End-to-end secrecy between two clients, even against the server (sans-IO).

- :class:`IdentityStore`: each user's long-term Ed25519 identity key, made on
  their own machine and stored encrypted under a key derived from their
  password (scrypt, then AES-256-GCM).  Copying the file is not enough.
- :class:`PeerTrust`: trust on first use for peers' identity keys, loud refusal
  of a changed key until the user accepts it, and "verified" marks.
- :func:`safety_number`: 30 digits from both identity keys, equal on both screens.
- :class:`E2ESession`: one conversation.  For every KDC key generation both
  clients send a fresh X25519 share and a fresh ML-KEM-768 encapsulation key,
  signed by their identity key over a transcript binding both names, the
  conversation id and the generation; each then answers the other's with a
  signed ML-KEM ciphertext.  The root key is HKDF over the KDC key, the DH
  secret *and* both ML-KEM secrets, so a server that only knows the KDC key
  learns nothing, and a recording stays secret against a future quantum
  computer that breaks X25519.  Each direction then runs a hash ratchet: a
  fresh key per message, the chain key overwritten as it advances.

Docs: docs/PROTOCOL.md section 10; threat model in section 11.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import crypto_utils as cu
from secureim.errors import CryptoError, DecryptionFailed, InvalidKemValue, SecureIMError

# --- wire kinds inside a Relay payload -------------------------------------------
KIND_SHARE = 1
KIND_MESSAGE = 2
KIND_KEM_REPLY = 3
SHARE_KINDS = frozenset({KIND_SHARE, KIND_KEM_REPLY})
# kind, generation, X25519 share, ML-KEM-768 encapsulation key, Ed25519 signature (1,285 bytes)
SHARE = struct.Struct(f">BI32s{cu.MLKEM768_ENCAPSULATION_KEY_BYTES}s64s")
# kind, generation, ML-KEM-768 ciphertext to the peer's key, Ed25519 signature (1,157 bytes)
KEM_REPLY = struct.Struct(f">BI{cu.MLKEM768_CIPHERTEXT_BYTES}s64s")
MESSAGE_HEADER = struct.Struct(">BIQ")  # kind, generation, counter
BODY_HEADER = struct.Struct(">QB16s")  # sent_at (ms since the epoch), body type, message id
BODY_TEXT = 1  # UTF-8 text
BODY_RECEIPT = 2  # delivery receipt: the 16-byte ids of messages this client opened
BODY_SENDER_KEY = 3  # a room sender key (rooms.py), sent to each member over the pairwise session
MAX_SENDER_KEY_BYTES = 256
MSG_ID_BYTES = 16
MAX_RECEIPT_IDS = 64

# --- bounds (docs/PROTOCOL.md section 10) ------------------------------------------
MAX_SKIP = 1000  # messages one chain may jump ahead (libsignal: 25,000)
MAX_SKIPPED_KEYS = 2000  # stored keys for skipped messages, per conversation (libsignal: 2,000)
MAX_KEPT_GENERATIONS = 8  # generations kept for messages in flight across rekeys
FRESHNESS_WINDOW_S = 600  # design 002's timestamp window: older (or that far ahead) is refused
MAX_TEXT_BYTES = 16 * 1024

IDENTITY_FORMAT = 1  # a cu.PasswordSeal envelope, plus "format" and "public" (docs/CLIENT.md)


def file_component(text: str) -> str:
    """A safe single path component: anything but [A-Za-z0-9._-] becomes '_' (no '/', no '..')."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", text)
    return safe if safe.strip(".") else "_"


@dataclass(frozen=True)
class Opened:
    """An end-to-end message that opened: text, or a receipt for earlier messages."""

    kind: int
    msg_id: bytes
    sent_at: float
    text: str = ""
    receipts: tuple[bytes, ...] = ()
    content: bytes = b""  # BODY_SENDER_KEY: the distribution (rooms.py parses it)


def new_msg_id() -> bytes:
    return cu.random_bytes(MSG_ID_BYTES)


def pack_body(body_type: int, msg_id: bytes, content: bytes, now: float) -> bytes:
    if body_type == BODY_TEXT and len(content) > MAX_TEXT_BYTES:
        raise ValueError(f"Messages are limited to {MAX_TEXT_BYTES} bytes.")
    if body_type == BODY_RECEIPT and (
        len(content) % MSG_ID_BYTES or len(content) > MAX_RECEIPT_IDS * MSG_ID_BYTES
    ):
        raise ValueError("A receipt lists 1 to 64 message ids.")
    if body_type == BODY_SENDER_KEY and not 0 < len(content) <= MAX_SENDER_KEY_BYTES:
        raise ValueError("A malformed sender key.")
    if len(msg_id) != MSG_ID_BYTES:
        raise ValueError("A message id is 16 bytes.")
    return BODY_HEADER.pack(int(now * 1000), body_type, msg_id) + content


def receipt_content(ids) -> bytes:
    ids = list(ids)
    if not 1 <= len(ids) <= MAX_RECEIPT_IDS or any(len(i) != MSG_ID_BYTES for i in ids):
        raise ValueError("A receipt lists 1 to 64 message ids.")
    return b"".join(ids)


def parse_body(body: bytes, peer: str) -> Opened:
    """The plaintext of a message that authenticated; DecryptionFailed if its structure is wrong."""
    if len(body) < BODY_HEADER.size:
        raise DecryptionFailed(f"A message from {peer} was malformed and was discarded.")
    sent_ms, body_type, msg_id = BODY_HEADER.unpack_from(body)
    content = body[BODY_HEADER.size :]
    if body_type == BODY_TEXT and len(content) <= MAX_TEXT_BYTES:
        try:
            return Opened(BODY_TEXT, msg_id, sent_ms / 1000.0, text=content.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    elif (
        body_type == BODY_RECEIPT
        and content
        and not len(content) % MSG_ID_BYTES
        and len(content) <= MAX_RECEIPT_IDS * MSG_ID_BYTES
    ):
        ids = tuple(content[i : i + MSG_ID_BYTES] for i in range(0, len(content), MSG_ID_BYTES))
        return Opened(BODY_RECEIPT, msg_id, sent_ms / 1000.0, receipts=ids)
    elif body_type == BODY_SENDER_KEY and 0 < len(content) <= MAX_SENDER_KEY_BYTES:
        return Opened(BODY_SENDER_KEY, msg_id, sent_ms / 1000.0, content=content)
    raise DecryptionFailed(f"A message from {peer} was malformed and was discarded.")


class IdentityChanged(SecureIMError):
    """A peer's identity key changed: the conversation is refused until you accept the new key."""

    def __init__(self, peer: str, old_fp: str, new_fp: str) -> None:
        self.peer, self.old_fp, self.new_fp = peer, old_fp, new_fp
        super().__init__(
            f"{peer}'s identity key changed from {old_fp} to {new_fp}. Someone may be "
            f"intercepting this conversation (or {peer} reinstalled). Compare safety numbers "
            f"with /verify {peer}, then /accept {peer} to trust the new key."
        )


class ShareRejected(SecureIMError):
    """A peer's key share failed its signature check: the conversation was refused."""


class StaleShare(ShareRejected):
    """A share for a generation older than the newest one here (sent before a rekey or a
    refusal that the peer had not seen yet): harmless, ignored."""


# =============================================================================
# Identity keys at rest
# =============================================================================
class IdentityStore:
    """``<home>/identities/<user>@<host>_<port>.json``: the Ed25519 seed, encrypted."""

    def __init__(self, home: Path, server_id: str) -> None:
        self.dir = Path(home) / "identities"
        self.server_id = file_component(server_id)

    def path(self, username: str) -> Path:
        return self.dir / file_component(f"{username}@{self.server_id}.json")

    def load(self, username: str, password: str) -> cu.IdentityKey | None:
        """The stored identity, or None if there is none or the password does not open it.

        The seed is a :class:`crypto_utils.PasswordSeal` envelope (scrypt with the salt and
        parameters the file records), bound to the username and the public key."""
        path = self.path(username)
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text())
            if doc.get("format") != IDENTITY_FORMAT:
                return None
            public = cu.b64decode(doc["public"])
            key = cu.identity_from_seed(cu.open_with_password(doc, password, username.encode() + public))
        except (ValueError, KeyError, TypeError, AttributeError, CryptoError):
            return None
        return key if cu.public_bytes(key) == public else None

    def save(self, username: str, password: str, key: cu.IdentityKey) -> None:
        public = cu.public_bytes(key)
        envelope = cu.seal_with_password(password, cu.identity_seed(key), username.encode() + public)
        doc = {"format": IDENTITY_FORMAT, **envelope, "public": cu.b64encode(public)}
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cu.write_private_file(self.path(username), json.dumps(doc).encode())


# =============================================================================
# Trust in peers
# =============================================================================
class PeerTrust:
    """``<home>/known_peers/<me>@<server>``: ``peer base64(key) verified|unverified`` per line."""

    def __init__(self, home: Path, me: str, server_id: str) -> None:
        self.path = Path(home) / "known_peers" / file_component(f"{me}@{server_id}")

    def _load(self) -> dict[str, tuple[bytes, bool]]:
        out: dict[str, tuple[bytes, bool]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 3:
                    try:
                        out[parts[0]] = (cu.b64decode(parts[1]), parts[2] == "verified")
                    except SecureIMError:
                        continue
        return out

    def _save(self, entries: dict[str, tuple[bytes, bool]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lines = (
            f"{peer} {cu.b64encode(key)} {'verified' if verified else 'unverified'}\n"
            for peer, (key, verified) in sorted(entries.items())
        )
        cu.write_private_file(self.path, "".join(lines).encode())

    def check(self, peer: str, key: bytes) -> bool:
        """Pin on first use; raise IdentityChanged on a different key.  Returns 'verified'."""
        entries = self._load()
        known = entries.get(peer)
        if known is None:
            entries[peer] = (key, False)
            self._save(entries)
            return False
        if not cu.constant_time_equal(known[0], key):
            raise IdentityChanged(peer, cu.fingerprint(known[0]), cu.fingerprint(key))
        return known[1]

    def pinned(self, peer: str) -> bytes | None:
        entry = self._load().get(peer)
        return entry[0] if entry else None

    def accept(self, peer: str, key: bytes) -> None:
        """The user accepts ``key`` as ``peer``'s (after a change); it is not verified yet."""
        entries = self._load()
        entries[peer] = (key, False)
        self._save(entries)

    def mark_verified(self, peer: str) -> bool:
        entries = self._load()
        if peer not in entries:
            return False
        entries[peer] = (entries[peer][0], True)
        self._save(entries)
        return True

    def is_verified(self, peer: str) -> bool:
        entry = self._load().get(peer)
        return bool(entry and entry[1])


def safety_number(user_a: str, key_a: bytes, user_b: str, key_b: bytes) -> str:
    """30 digits in 6 groups, the same on both sides (the pair is sorted by name).

    SHA-512 iterated 5,200 times (as Signal's numeric fingerprints), so finding
    a key pair that collides with a given number costs ~2^12 more per try.
    """
    (n1, k1), (n2, k2) = sorted([(user_a, key_a), (user_b, key_b)])
    digest = b"secureim/v1 safety number"
    for name, key in ((n1, k1), (n2, k2)):
        digest += len(name).to_bytes(1, "big") + name.encode() + key
    for _ in range(5200):
        digest = hashlib.sha512(digest + k1 + k2).digest()
    groups = [int.from_bytes(digest[i * 5 : (i + 1) * 5], "big") % 100000 for i in range(6)]
    return " ".join(f"{g:05d}" for g in groups)


# =============================================================================
# One conversation
# =============================================================================
def _share_transcript(
    cid: int, generation: int, sender: str, recipient: str, share: bytes, kind: int = KIND_SHARE
) -> bytes:
    """What a share (X25519 || encapsulation key) or a KEM reply (ciphertext || SHA-256 of
    the encapsulation key it answers) is signed over; ``kind`` keeps the two apart."""
    return (
        b"secureim/v1 e2e share\x00"
        + bytes([kind])
        + cid.to_bytes(8, "big")
        + generation.to_bytes(4, "big")
        + bytes([len(sender)])
        + sender.encode()
        + bytes([len(recipient)])
        + recipient.encode()
        + share
    )


def root_transcript(
    cid: int, generation: int, entries: list[tuple[str, bytes, bytes]], identity_keys: tuple[bytes, bytes]
) -> bytes:
    """SHA-256 over everything public: per user in name order (name, share, ciphertext sent to them)."""
    return cu.sha256(
        b"secureim/v1 e2e root"
        + cid.to_bytes(8, "big")
        + generation.to_bytes(4, "big")
        + b"".join(bytes([len(n)]) + n.encode() + share + ct for n, share, ct in sorted(entries))
        + b"".join(sorted(identity_keys))
    )


def derive_root(kdc_key: bytes, dh: bytes, kem_secrets: tuple[bytes, bytes], transcript_hash: bytes) -> bytes:
    """The conversation root: KDC key, X25519 secret and both ML-KEM-768 secrets (fixed order)."""
    return cu.hkdf(
        kdc_key + dh + kem_secrets[0] + kem_secrets[1],
        salt=transcript_hash,
        info=cu.label("e2e root x25519-mlkem768"),
        length=32,
    )


class Chain:
    """A symmetric hash ratchet (Signal's KDF chain): each step yields a message key."""

    __slots__ = ("key", "index")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.index = 0  # the counter of the next message on this chain

    def step(self) -> tuple[int, bytes]:
        message_key = cu.hmac_sha256(self.key, b"\x01")
        self.key = cu.hmac_sha256(self.key, b"\x02")  # the old chain key is overwritten
        counter = self.index
        self.index += 1
        return counter, message_key


@dataclass
class _Generation:
    number: int
    kdc_key: bytes | None
    my_private: cu.X25519Key | None
    my_share: bytes  # X25519 public || ML-KEM encapsulation key
    my_kem: cu.MLKEM768KeyPair | None = None
    peer_share: bytes | None = None  # verified, waiting for the peer's KEM reply
    kem_to_peer: bytes | None = None  # the secret we encapsulated to the peer's key
    dh: bytes | None = None  # the X25519 secret, once the peer's share is in
    ciphertext_to_peer: bytes = b""
    send: Chain | None = None
    recv: Chain | None = None
    direct: tuple[bytes, bytes] | None = None  # (send, recv) keys for direct mode's datagram layer


def next_message_key(
    chain: Chain, counter: int, skipped: dict, tag, peer: str, max_stored: int, what: str = "message"
):
    """The receiving side of a hash ratchet: the key of message ``counter`` on ``chain`` and a
    commit function; nothing changes before it runs (a message that fails to open costs nothing).

    Keys of messages skipped on the way are kept in ``skipped`` under ``tag(n)`` (at most
    ``max_stored``, the oldest dropped first) for messages that arrive late; each is deleted
    once used.  Used by live conversations and by offline sessions (prekeys.py)."""
    key = tag(counter)
    if key in skipped:
        return skipped[key], lambda: skipped.pop(key, None)
    if counter < chain.index:
        raise DecryptionFailed(f"A replayed {what} from {peer} was refused.")
    if counter - chain.index > MAX_SKIP:
        raise DecryptionFailed(f"A {what} from {peer} skipped more than {MAX_SKIP} messages and was refused.")
    trial = Chain(chain.key)
    trial.index = chain.index
    new = {}
    while trial.index < counter:
        idx, mk = trial.step()
        new[tag(idx)] = mk
    _idx, message_key = trial.step()

    def commit() -> None:
        chain.key, chain.index = trial.key, trial.index
        skipped.update(new)
        while len(skipped) > max_stored:
            del skipped[next(iter(skipped))]  # the oldest go first

    return message_key, commit


class E2ESession:
    """The end-to-end state of one conversation with one peer."""

    def __init__(
        self,
        me: str,
        my_identity: cu.IdentityKey,
        peer: str,
        peer_identity: bytes,
        conversation_id: int,
        suite: cu.Suite,
        *,
        clock=time.time,
    ) -> None:
        self.me, self.peer, self.id, self.suite = me, peer, conversation_id, suite
        self._identity = my_identity
        self.peer_identity = peer_identity
        self._clock = clock
        self._generations: dict[int, _Generation] = {}
        self._skipped: dict[tuple[int, int], bytes] = {}  # (generation, counter) -> message key
        self.current: int | None = None  # newest generation ready to send

    # -- key agreement ----------------------------------------------------------------
    def new_generation(self, generation: int, kdc_key: bytes) -> bytes:
        """A KDC key arrived: returns the signed share payload to relay to the peer."""
        if generation in self._generations or (self._generations and generation < max(self._generations)):
            raise DecryptionFailed("A stale conversation key was ignored.")
        private = cu.X25519Key.generate()
        kem = cu.MLKEM768KeyPair()
        x_public = private.public_key().public_bytes_raw()
        share = x_public + kem.encapsulation_key
        self._generations[generation] = _Generation(generation, kdc_key, private, share, my_kem=kem)
        while len(self._generations) > MAX_KEPT_GENERATIONS:
            self._drop_generation(min(self._generations))
        signature = self._identity.sign(_share_transcript(self.id, generation, self.me, self.peer, share))
        return SHARE.pack(KIND_SHARE, generation, x_public, kem.encapsulation_key, signature)

    def receive_share(self, payload: bytes) -> bytes | None:
        """The peer's signed share or KEM reply.

        For a share: verify it, encapsulate to the peer's ML-KEM key and return the
        signed KEM reply to relay back.  For a reply: verify it, derive the root and
        both chains, and return None (the generation is ready).  Sizes are checked
        before anything else and signatures before any key work.
        """
        if not payload or payload[0] not in SHARE_KINDS:
            raise ShareRejected("A malformed key share was refused.")
        layout = SHARE if payload[0] == KIND_SHARE else KEM_REPLY
        if len(payload) != layout.size:
            raise ShareRejected(f"A malformed key share was refused (it must be {layout.size} bytes).")
        if payload[0] == KIND_SHARE:
            return self._receive_share(*SHARE.unpack(payload))
        self._receive_kem_reply(*KEM_REPLY.unpack(payload))
        return None

    def _pending(self, generation: int) -> _Generation:
        gen = self._generations.get(generation)
        if gen is None and self._generations and generation < max(self._generations):
            raise StaleShare("A key share for an earlier key was ignored.")
        if gen is None or gen.kdc_key is None or gen.my_kem is None:
            raise ShareRejected("An unexpected key share was refused.")
        return gen

    def _receive_share(
        self, kind: int, generation: int, x_public: bytes, encapsulation_key: bytes, signature: bytes
    ) -> bytes:
        gen = self._pending(generation)
        if gen.peer_share is not None:
            raise ShareRejected("A second key share for the same key was refused.")
        share = x_public + encapsulation_key
        if not cu.verify_signature(
            self.peer_identity, signature, _share_transcript(self.id, generation, self.peer, self.me, share)
        ):
            raise ShareRejected(
                f"{self.peer}'s key share is not signed by {self.peer}'s identity key: "
                "someone (the server?) tampered with it. The conversation was refused."
            )
        assert gen.my_private is not None
        try:
            dh = gen.my_private.exchange(cu.X25519Public.from_public_bytes(x_public))
        except ValueError:
            raise ShareRejected("A key share with a low-order point was refused.") from None
        try:
            kem_secret, ciphertext = cu.mlkem768_encapsulate(encapsulation_key)
        except InvalidKemValue as exc:
            raise ShareRejected(f"{self.peer}'s key share was refused: {exc}") from None
        gen.peer_share, gen.kem_to_peer, gen.ciphertext_to_peer, gen.dh = share, kem_secret, ciphertext, dh
        gen.my_private = None  # the X25519 secret is computed; the private key goes
        signature = self._identity.sign(
            _share_transcript(
                self.id,
                generation,
                self.me,
                self.peer,
                ciphertext + cu.sha256(encapsulation_key),
                KIND_KEM_REPLY,
            )
        )
        return KEM_REPLY.pack(KIND_KEM_REPLY, generation, ciphertext, signature)

    def _receive_kem_reply(self, kind: int, generation: int, ciphertext: bytes, signature: bytes) -> None:
        gen = self._pending(generation)
        if gen.peer_share is None or gen.kem_to_peer is None or gen.dh is None:
            raise ShareRejected("A key reply before the key share was refused.")
        assert gen.my_kem is not None and gen.kdc_key is not None
        answered = cu.sha256(gen.my_kem.encapsulation_key)
        if not cu.verify_signature(
            self.peer_identity,
            signature,
            _share_transcript(self.id, generation, self.peer, self.me, ciphertext + answered, KIND_KEM_REPLY),
        ):
            raise ShareRejected(
                f"{self.peer}'s key reply is not signed by {self.peer}'s identity key: "
                "someone (the server?) tampered with it. The conversation was refused."
            )
        kem_from_peer = gen.my_kem.decapsulate(ciphertext)
        # Everything in name order, so both sides build the same bytes: for each user, their
        # share (X25519 || encapsulation key) and the ciphertext that was sent *to* them.
        entries = sorted(
            [
                (self.me, gen.my_share, ciphertext, kem_from_peer),
                (self.peer, gen.peer_share, gen.ciphertext_to_peer, gen.kem_to_peer),
            ]
        )
        transcript = root_transcript(
            self.id,
            generation,
            [(n, sh, ct) for n, sh, ct, _k in entries],
            (cu.public_bytes(self._identity), self.peer_identity),
        )
        root = derive_root(gen.kdc_key, gen.dh, (entries[0][3], entries[1][3]), transcript)
        gen.send = Chain(cu.hkdf(root, salt=None, info=cu.label(f"chain {self.me}>{self.peer}"), length=32))
        gen.recv = Chain(cu.hkdf(root, salt=None, info=cu.label(f"chain {self.peer}>{self.me}"), length=32))
        length = self.suite.key_bytes
        gen.direct = (
            cu.hkdf(root, salt=None, info=cu.label(f"direct {self.me}>{self.peer}"), length=length),
            cu.hkdf(root, salt=None, info=cu.label(f"direct {self.peer}>{self.me}"), length=length),
        )
        gen.kdc_key = None  # forgotten once used
        gen.my_kem = None
        gen.kem_to_peer = None
        gen.dh = None
        if self.current is None or generation > self.current:
            self.current = generation

    @property
    def ready(self) -> bool:
        return self.current is not None

    def direct_keys(self, generation: int | None = None) -> tuple[bytes, bytes]:
        """(send, recv) key material for direct mode's datagram channel (default: current generation)."""
        number = self.current if generation is None else generation
        gen = self._generations.get(number) if number is not None else None
        if gen is None or gen.direct is None:
            raise CryptoError("The conversation is not secured for that generation.")
        return gen.direct

    # -- messages --------------------------------------------------------------------------
    def _message_cipher(self, message_key: bytes):
        material = cu.hkdf(message_key, salt=None, info=cu.label("message key"), length=self.suite.key_bytes)
        return self.suite.cipher(self.suite.key_from_material(material))

    def _aad(self, sender: str, recipient: str, generation: int, counter: int) -> bytes:
        return (
            b"secureim/v1 e2e message"
            + self.id.to_bytes(8, "big")
            + bytes([len(sender)])
            + sender.encode()
            + bytes([len(recipient)])
            + recipient.encode()
            + MESSAGE_HEADER.pack(KIND_MESSAGE, generation, counter)
        )

    def seal(self, text: str, msg_id: bytes | None = None) -> bytes:
        """A text message (its id: ``msg_id``, or a new random one)."""
        return self.seal_body(BODY_TEXT, msg_id or new_msg_id(), text.encode("utf-8"))

    def seal_body(self, body_type: int, msg_id: bytes, content: bytes) -> bytes:
        if self.current is None:
            raise CryptoError("The conversation is not secured yet.")
        body = pack_body(body_type, msg_id, content, self._clock())
        gen = self._generations[self.current]
        assert gen.send is not None
        counter, message_key = gen.send.step()
        sealed = self._message_cipher(message_key).seal(
            body, self._aad(self.me, self.peer, gen.number, counter)
        )
        return MESSAGE_HEADER.pack(KIND_MESSAGE, gen.number, counter) + sealed

    def open(self, payload: bytes) -> tuple[str, float]:
        """(text, sent_at) of a text message from the peer (a receipt is refused here: use open_message)."""
        opened = self.open_message(payload)
        if opened.kind != BODY_TEXT:
            raise DecryptionFailed(f"A receipt from {self.peer} was not expected here.")
        return opened.text, opened.sent_at

    def open_message(self, payload: bytes) -> Opened:
        """A message from the peer.  DecryptionFailed, with a reason, on anything wrong."""
        if len(payload) < MESSAGE_HEADER.size:
            raise DecryptionFailed()
        kind, generation, counter = MESSAGE_HEADER.unpack_from(payload)
        gen = self._generations.get(generation)
        if kind != KIND_MESSAGE or gen is None or gen.recv is None:
            raise DecryptionFailed("A message under an unknown or discarded key was refused.")
        message_key, advance = self._receive_key(gen, counter)
        try:
            body = self._message_cipher(message_key).open(
                payload[MESSAGE_HEADER.size :], self._aad(self.peer, self.me, generation, counter)
            )
        except DecryptionFailed:
            raise DecryptionFailed(
                f"A message from {self.peer} failed its integrity check and was discarded."
            ) from None
        opened = parse_body(body, self.peer)
        if abs(self._clock() - opened.sent_at) > FRESHNESS_WINDOW_S:
            raise DecryptionFailed(
                f"A message from {self.peer} was too old (or dated in the future) and was refused."
            )
        advance()  # commit: keys are consumed only by a message that opened
        for old in [g for g in self._generations if g < generation]:
            self._drop_generation(old)  # the peer has moved past them
        return opened

    def _receive_key(self, gen: _Generation, counter: int):
        """The message key for ``counter`` and a commit function (nothing changes before it runs)."""
        assert gen.recv is not None
        return next_message_key(
            gen.recv, counter, self._skipped, lambda n: (gen.number, n), self.peer, MAX_SKIPPED_KEYS
        )

    def _drop_generation(self, number: int) -> None:
        self._generations.pop(number, None)
        for k in [k for k in self._skipped if k[0] == number]:
            del self._skipped[k]
