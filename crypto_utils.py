"""Cryptography behind one small surface: cipher suites, HKDF, HMAC, identities.

Nothing here is a hand-written primitive: ciphers, MACs, HKDF and signatures all
come from ``cryptography`` (OpenSSL).  The only exception is the optional pyDes
Triple-DES backend, kept because design 000 names it and selectable explicitly;
it never runs unless asked for or unless the OpenSSL Triple-DES is missing.

Every suite has the same interface: ``suite.cipher(key)`` returns an object with
``seal(plaintext, aad) -> bytes`` and ``open(ciphertext, aad) -> bytes``.  Open
fails closed with :class:`errors.DecryptionFailed`: a bad tag never returns data.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac as _stdlib_hmac
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeAlias

from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import hmac as _hmac
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from secureim.errors import ConfigError, CryptoError, DecryptionFailed, InvalidKemValue, InvalidKey
from secureim.files import PRIVATE_FILE_MODE as PRIVATE_FILE_MODE
from secureim.files import fsync_folder as fsync_folder
from secureim.files import write_private_file as write_private_file

_OpenSSLTripleDES: type | None
try:  # cryptography >= 43 keeps Triple-DES in the "decrepit" namespace.
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES as _TripleDES

    _OpenSSLTripleDES = _TripleDES
except ImportError:  # pragma: no cover - depends on the installed cryptography
    _OpenSSLTripleDES = None

LABEL_PREFIX = b"secureim/v1 "
TDES_KEY_BYTES = 24
TDES_BLOCK_BYTES = 8
HMAC_KEY_BYTES = 32
HMAC_TAG_BYTES = 32
AES_KEY_BYTES = 32
GCM_NONCE_BYTES = 12
GCM_TAG_BYTES = 16
ED25519_PUBLIC_BYTES = 32
ED25519_SIGNATURE_BYTES = 64
# ML-KEM-768 sizes, FIPS 203 table 3 (k = 3, du = 10, dv = 4).
MLKEM768_ENCAPSULATION_KEY_BYTES = 1184
MLKEM768_CIPHERTEXT_BYTES = 1088
MLKEM768_SEED_BYTES = 64  # d || z (FIPS 203 algorithm 16, ML-KEM.KeyGen_internal)
MLKEM_SHARED_SECRET_BYTES = 32


# --- small helpers ------------------------------------------------------------
def random_bytes(n: int) -> bytes:
    """Cryptographically secure random bytes (the OS CSPRNG)."""
    return os.urandom(n)  # the OS CSPRNG (what secrets.token_bytes wraps), without two Python layers


def constant_time_equal(a: bytes, b: bytes) -> bool:
    """Compare two secrets without leaking where they differ."""
    return _stdlib_hmac.compare_digest(a, b)


def b64encode(data: bytes) -> str:
    """Standard base64 text (design 000 sends base64 over the socket)."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str | bytes) -> bytes:
    """Strict base64 decoding: anything but canonical base64 is refused."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CryptoError("Invalid base64 data.") from exc
    if base64.b64encode(raw) != (text.encode("ascii") if isinstance(text, str) else text):
        raise CryptoError("Invalid base64 data.")
    return raw


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def label(purpose: str) -> bytes:
    """The HKDF ``info`` label for one purpose (and direction)."""
    return LABEL_PREFIX + purpose.encode("ascii")


def hkdf(ikm: bytes, *, salt: bytes | None, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869): extract with ``salt``, expand with ``info``."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    h = _hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h.finalize()


def hmac_sha512(key: bytes, data: bytes) -> bytes:
    h = _hmac.HMAC(key, hashes.SHA512())
    h.update(data)
    return h.finalize()


# --- DES key hygiene (SP 800-67r2 section 3.3) --------------------------------
def set_des_parity(key: bytes) -> bytes:
    """Set the low bit of every byte so that each byte has odd parity."""
    out = bytearray(key)
    for i, b in enumerate(out):
        high = b & 0xFE
        out[i] = high | (1 - (bin(high).count("1") & 1))
    return bytes(out)


# The 4 weak and 12 semi-weak DES keys (SP 800-67r2 section 3.3.2), parity set.
DES_WEAK_KEYS = frozenset(
    bytes.fromhex(k)
    for k in (
        "0101010101010101",
        "FEFEFEFEFEFEFEFE",
        "E0E0E0E0F1F1F1F1",
        "1F1F1F1F0E0E0E0E",
        "011F011F010E010E",
        "1F011F010E010E01",
        "01E001E001F101F1",
        "E001E001F101F101",
        "01FE01FE01FE01FE",
        "FE01FE01FE01FE01",
        "1FE01FE00EF10EF1",
        "E01FE01FF10EF10E",
        "1FFE1FFE0EFE0EFE",
        "FE1FFE1FFE0EFE0E",
        "E0FEE0FEF1FEF1FE",
        "FEE0FEE0FEF1FEF1",
    )
)


def check_tdes_key(key: bytes) -> None:
    """Refuse a Triple-DES key that is not three independent, strong DES keys."""
    if len(key) != TDES_KEY_BYTES:
        raise InvalidKey(f"A Triple-DES key is {TDES_KEY_BYTES} bytes, not {len(key)}.")
    if set_des_parity(key) != key:
        raise InvalidKey("Triple-DES key bytes do not have odd parity.")
    k1, k2, k3 = key[0:8], key[8:16], key[16:24]
    if any(k in DES_WEAK_KEYS for k in (k1, k2, k3)):
        raise InvalidKey("Triple-DES key contains a weak or semi-weak DES key.")
    if k1 == k2 or k2 == k3 or k1 == k3:
        raise InvalidKey("Triple-DES needs three independent DES keys (keying option 1).")


def generate_tdes_key() -> bytes:
    """A fresh random three-key Triple-DES key with parity set, weak keys refused."""
    while True:
        key = set_des_parity(random_bytes(TDES_KEY_BYTES))
        try:
            check_tdes_key(key)
        except InvalidKey:  # probability about 2^-52: draw again
            continue
        return key


# --- Triple-DES block backends -------------------------------------------------
class _OpenSSLTripleDesCbc:
    name = "openssl"

    def __init__(self, key: bytes) -> None:
        if _OpenSSLTripleDES is None:  # pragma: no cover
            raise ConfigError("The OpenSSL Triple-DES backend is not available.")
        self._algorithm = _OpenSSLTripleDES(key)

    def encrypt(self, iv: bytes, data: bytes) -> bytes:
        enc = Cipher(self._algorithm, modes.CBC(iv)).encryptor()
        return enc.update(data) + enc.finalize()

    def decrypt(self, iv: bytes, data: bytes) -> bytes:
        dec = Cipher(self._algorithm, modes.CBC(iv)).decryptor()
        return dec.update(data) + dec.finalize()


class _PyDesTripleDesCbc:
    """Todd Whitman's pure-Python pyDes (design 000): about 2,000 times slower."""

    name = "pydes"

    def __init__(self, key: bytes) -> None:
        import pyDes  # imported lazily: only this fallback needs it

        self._pydes = pyDes
        self._key = key

    def _cipher(self, iv: bytes):
        return self._pydes.triple_des(
            self._key, self._pydes.CBC, iv, pad=None, padmode=self._pydes.PAD_NORMAL
        )

    def encrypt(self, iv: bytes, data: bytes) -> bytes:
        return self._cipher(iv).encrypt(data)

    def decrypt(self, iv: bytes, data: bytes) -> bytes:
        return self._cipher(iv).decrypt(data)


class _TripleDesCbcBlocks(Protocol):
    name: str

    def encrypt(self, iv: bytes, data: bytes) -> bytes: ...

    def decrypt(self, iv: bytes, data: bytes) -> bytes: ...


TDES_BACKENDS: dict[str, Callable[[bytes], _TripleDesCbcBlocks]] = {
    "openssl": _OpenSSLTripleDesCbc,
    "pydes": _PyDesTripleDesCbc,
}


def default_tdes_backend() -> str:
    return "openssl" if _OpenSSLTripleDES is not None else "pydes"


# --- cipher suites -------------------------------------------------------------
def pkcs7_pad(data: bytes, block: int = TDES_BLOCK_BYTES) -> bytes:
    """PKCS#7 (RFC 5652 section 6.3): 1 to ``block`` bytes, each the count.  Two lines of
    byte arithmetic, not a cipher: written out because a padder object per record costs more
    than the padding (the relay pads every frame)."""
    n = block - len(data) % block
    return data + bytes((n,)) * n


def pkcs7_unpad(data: bytes, block: int = TDES_BLOCK_BYTES) -> bytes:
    """Strip PKCS#7 padding, checking every pad byte; DecryptionFailed if it is not valid."""
    n = data[-1] if data else 0
    if not 1 <= n <= block or len(data) % block or data[-n:] != bytes((n,)) * n:
        raise DecryptionFailed()
    return data[:-n]


def _aad_block(aad: bytes) -> bytes:
    # The AAD length goes first so that (aad, iv||ct) can never be re-split.
    return len(aad).to_bytes(8, "big") + aad


class TripleDesCbcHmacCipher:
    """Triple-DES-CBC, random IV, PKCS#7, then HMAC-SHA256 (encrypt-then-MAC).

    Layout: ``IV (8) || CBC ciphertext || HMAC-SHA256(aadlen || aad || IV || ct)``.
    """

    def __init__(self, key: bytes, backend: str) -> None:
        if len(key) != TripleDesCbcHmac.key_bytes:
            raise InvalidKey(f"A 3des suite key is {TripleDesCbcHmac.key_bytes} bytes.")
        tdes_key, self._mac_key = key[:TDES_KEY_BYTES], key[TDES_KEY_BYTES:]
        check_tdes_key(tdes_key)
        try:
            self._blocks = TDES_BACKENDS[backend](tdes_key)
        except KeyError:
            raise ConfigError(f"Unknown Triple-DES backend {backend!r}.") from None
        self._mac = _hmac.HMAC(self._mac_key, hashes.SHA256())

    def _tag(self, aad: bytes, iv_ct: bytes) -> _hmac.HMAC:
        h = self._mac.copy()
        h.update(_aad_block(aad))
        h.update(iv_ct)
        return h

    def seal(self, plaintext: bytes, aad: bytes = b"", *, iv: bytes | None = None) -> bytes:
        iv = random_bytes(TDES_BLOCK_BYTES) if iv is None else iv
        iv_ct = iv + self._blocks.encrypt(iv, pkcs7_pad(plaintext))
        return iv_ct + self._tag(aad, iv_ct).finalize()

    def open(self, ciphertext: bytes, aad: bytes = b"") -> bytes:
        iv_ct = self._verified(ciphertext, aad)
        padded = self._blocks.decrypt(iv_ct[:TDES_BLOCK_BYTES], iv_ct[TDES_BLOCK_BYTES:])
        return pkcs7_unpad(padded)  # a bad pad is impossible after a valid MAC unless the key is misused

    def _verified(self, ciphertext: bytes, aad: bytes) -> bytes:
        """``IV || CT`` once its length and MAC are checked: nothing is decrypted before."""
        body_len = len(ciphertext) - TDES_BLOCK_BYTES - HMAC_TAG_BYTES
        if body_len < TDES_BLOCK_BYTES or body_len % TDES_BLOCK_BYTES:
            raise DecryptionFailed()
        iv_ct, tag = ciphertext[:-HMAC_TAG_BYTES], ciphertext[-HMAC_TAG_BYTES:]
        try:
            self._tag(aad, iv_ct).verify(tag)  # constant-time comparison
        except InvalidSignature:
            raise DecryptionFailed() from None
        return iv_ct


class RecordTripleDesCbcHmacCipher(TripleDesCbcHmacCipher):
    """The same records, sealed and opened through one OpenSSL CBC context per direction.

    A Cipher object per record costs more than the Triple-DES work on a short record (the
    relay seals and opens one per message).  Sealing keeps one encryptor for the life of
    the key and puts a fresh random block R in front of every record's padded plaintext:
    the first output block, E(K, R xor previous block), is the record's IV, and the rest is
    CBC chained from it (RFC 4346 section 6.2.3.2, option (2)(b): "generate a random block
    R ... use the last block of the previous ciphertext as the IV").  The IV is as
    unpredictable as R, and the layout on the wire is unchanged: ``IV || CT || TAG`` opens
    with a fresh context too.  Opening keeps one decryptor: after the MAC is checked, the
    record is fed whole and its first output block (R xor garbage) is dropped, so the
    context's state from earlier records never matters.

    Stateful: one instance per direction, used under one lock (the record layer's).
    """

    def __init__(self, key: bytes, backend: str) -> None:
        super().__init__(key, backend)
        self._algorithm = getattr(self._blocks, "_algorithm", None)  # OpenSSL only; pyDes: per record
        self._encryptor: CipherContext | None = None
        self._decryptor: CipherContext | None = None

    def seal(self, plaintext: bytes, aad: bytes = b"", *, iv: bytes | None = None) -> bytes:
        if iv is not None or self._algorithm is None:
            return super().seal(plaintext, aad, iv=iv)
        if self._encryptor is None:  # created on first use: an idle session holds none
            self._encryptor = Cipher(self._algorithm, modes.CBC(bytes(TDES_BLOCK_BYTES))).encryptor()
        iv_ct = self._encryptor.update(random_bytes(TDES_BLOCK_BYTES) + pkcs7_pad(plaintext))
        return iv_ct + self._tag(aad, iv_ct).finalize()

    def open(self, ciphertext: bytes, aad: bytes = b"") -> bytes:
        if self._algorithm is None:
            return super().open(ciphertext, aad)
        iv_ct = self._verified(ciphertext, aad)
        if self._decryptor is None:
            self._decryptor = Cipher(self._algorithm, modes.CBC(bytes(TDES_BLOCK_BYTES))).decryptor()
        return pkcs7_unpad(self._decryptor.update(iv_ct)[TDES_BLOCK_BYTES:])


class Aes256GcmCipher:
    """AES-256-GCM with a random 96-bit nonce: ``nonce (12) || ciphertext || tag (16)``."""

    def __init__(self, key: bytes) -> None:
        if len(key) != AES_KEY_BYTES:
            raise InvalidKey(f"An aes256 suite key is {AES_KEY_BYTES} bytes.")
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, aad: bytes = b"", *, nonce: bytes | None = None) -> bytes:
        nonce = random_bytes(GCM_NONCE_BYTES) if nonce is None else nonce
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, ciphertext: bytes, aad: bytes = b"") -> bytes:
        if len(ciphertext) < GCM_NONCE_BYTES + GCM_TAG_BYTES:
            raise DecryptionFailed()
        try:
            return self._aead.decrypt(ciphertext[:GCM_NONCE_BYTES], ciphertext[GCM_NONCE_BYTES:], aad)
        except InvalidTag:
            raise DecryptionFailed() from None


# --- one sealed box: AES-256-GCM under a label, for data at rest and tickets ------
SEALED_BOX_NONCE_BYTES = GCM_NONCE_BYTES
SEALED_BOX_OVERHEAD = SEALED_BOX_NONCE_BYTES + GCM_TAG_BYTES


class SealedBox:
    """AES-256-GCM with a random nonce and a fixed *label* bound as associated data.

    Layout: ``nonce (SEALED_BOX_NONCE_BYTES) || ciphertext || tag (16)``; the associated
    data is ``label || extra_aad``, where ``label`` comes from ``purpose``: a ``str`` becomes
    :func:`label`'s ``secureim/v1 <purpose>``; ``bytes`` are used as they are (for a format
    whose associated data predates labels, such as the keystores').  Each key has one
    label, so the concatenation cannot be re-split into another site's AAD; ``extra_aad``
    binds what the sealed data belongs to (a recipient, a conversation, a row).
    :meth:`open` fails closed: a short input or a bad tag raises
    :class:`errors.DecryptionFailed` and returns nothing.

    The server's stored KDC keys and room keys, its resumption tickets, the direct-mode
    tickets and the history rows are all sealed with this one class.
    """

    __slots__ = ("_aead", "label")

    def __init__(self, key: bytes, purpose: str | bytes) -> None:
        if len(key) != AES_KEY_BYTES:
            raise InvalidKey(f"A sealed-box key is {AES_KEY_BYTES} bytes, not {len(key)}.")
        self._aead = AESGCM(key)
        self.label = label(purpose) if isinstance(purpose, str) else bytes(purpose)

    def seal(self, plaintext: bytes, extra_aad: bytes = b"") -> bytes:
        nonce = random_bytes(SEALED_BOX_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, self.label + extra_aad)

    def open(self, sealed: bytes, extra_aad: bytes = b"") -> bytes:
        if len(sealed) < SEALED_BOX_OVERHEAD:
            raise DecryptionFailed()
        try:
            return self._aead.decrypt(
                sealed[:SEALED_BOX_NONCE_BYTES], sealed[SEALED_BOX_NONCE_BYTES:], self.label + extra_aad
            )
        except InvalidTag:
            raise DecryptionFailed() from None


# --- password-sealed keystores (identity, prekeys, the history's data key) -------------
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1  # about 100 ms, 32 MiB: what every file written so far used
SCRYPT_SALT_BYTES = 16
# A file is input: the parameters it names are bounded before scrypt runs (n = 2^40 would
# take the machine's memory).  The bounds allow 32 times today's cost.
SCRYPT_MAX_N, SCRYPT_MAX_R, SCRYPT_MAX_P = 2**20, 16, 16
SCRYPT_MAX_MEMORY = 1 << 30  # 128 * n * r * p bytes


@dataclass(frozen=True)
class ScryptParams:
    """scrypt's cost parameters (RFC 7914); the defaults are the ones every keystore has used."""

    n: int = SCRYPT_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P

    def check(self) -> None:
        """CryptoError unless the parameters are valid and within the bounds above."""
        n, r, p = self.n, self.r, self.p
        if not all(type(v) is int for v in (n, r, p)):
            raise CryptoError("The keystore's scrypt parameters are not integers.")
        if not (
            2 <= n <= SCRYPT_MAX_N and n & (n - 1) == 0 and 1 <= r <= SCRYPT_MAX_R and 1 <= p <= SCRYPT_MAX_P
        ):
            raise CryptoError(f"The keystore's scrypt parameters (n={n}, r={r}, p={p}) are out of bounds.")
        if 128 * n * r * p > SCRYPT_MAX_MEMORY:
            raise CryptoError(f"The keystore's scrypt parameters (n={n}, r={r}, p={p}) need too much memory.")


def _scrypt(password: str, salt: bytes, params: ScryptParams) -> bytes:
    params.check()
    return Scrypt(salt=salt, length=AES_KEY_BYTES, n=params.n, r=params.r, p=params.p).derive(
        password.encode("utf-8")
    )


class PasswordSeal:
    """A key derived from a password with scrypt, and the salt and parameters that made it.

    It seals to, and opens, one *envelope*: the JSON object every keystore holds (the
    identity file, the prekey store, the history's sealed data key)::

        {"kdf": "scrypt", "n": N, "r": R, "p": P, "salt": b64, "cipher": "aes-256-gcm",
         "nonce": b64(12 bytes), "sealed": b64(ciphertext || tag)}

    AES-256-GCM under the derived key, with the caller's associated data (each store binds
    its owner).  The reader uses the salt *and the parameters recorded in the envelope*
    (bounded by :meth:`ScryptParams.check`); an envelope without ``n``/``r``/``p`` (the
    prekey stores written before they were recorded) used the defaults.  Opening fails
    closed: a wrong password or a changed byte raises DecryptionFailed; a malformed or
    unsupported envelope raises CryptoError.
    """

    __slots__ = ("_box", "params", "salt")

    def __init__(
        self, password: str, *, salt: bytes | None = None, params: ScryptParams | None = None
    ) -> None:
        self.params = params or ScryptParams()
        self.salt = random_bytes(SCRYPT_SALT_BYTES) if salt is None else salt
        self._box = SealedBox(_scrypt(password, self.salt, self.params), b"")

    @staticmethod
    def envelope_params(envelope: Mapping[str, object]) -> tuple[bytes, ScryptParams]:
        """The salt and scrypt parameters an envelope was sealed with (CryptoError if malformed)."""
        if not isinstance(envelope, Mapping) or envelope.get("kdf") != "scrypt":
            raise CryptoError("The keystore does not use scrypt.")
        if envelope.get("cipher", "aes-256-gcm") != "aes-256-gcm":
            raise CryptoError("The keystore does not use AES-256-GCM.")
        salt = envelope.get("salt")
        if not isinstance(salt, str):
            raise CryptoError("The keystore has no salt.")
        default = ScryptParams()
        params = ScryptParams(
            n=envelope.get("n", default.n),  # type: ignore[arg-type]  # checked by ScryptParams.check
            r=envelope.get("r", default.r),  # type: ignore[arg-type]
            p=envelope.get("p", default.p),  # type: ignore[arg-type]
        )
        params.check()
        return b64decode(salt), params

    @classmethod
    def for_envelope(cls, envelope: Mapping[str, object], password: str) -> PasswordSeal:
        """The key ``password`` gives with the salt and parameters recorded in ``envelope``."""
        salt, params = cls.envelope_params(envelope)
        return cls(password, salt=salt, params=params)

    def seal(self, plaintext: bytes, aad: bytes) -> dict[str, object]:
        sealed = self._box.seal(plaintext, aad)
        return {
            "kdf": "scrypt",
            "n": self.params.n,
            "r": self.params.r,
            "p": self.params.p,
            "salt": b64encode(self.salt),
            "cipher": "aes-256-gcm",
            "nonce": b64encode(sealed[:SEALED_BOX_NONCE_BYTES]),
            "sealed": b64encode(sealed[SEALED_BOX_NONCE_BYTES:]),
        }

    def open(self, envelope: Mapping[str, object], aad: bytes) -> bytes:
        """The plaintext (DecryptionFailed: wrong password or tampered; CryptoError: malformed)."""
        salt, params = self.envelope_params(envelope)
        if salt != self.salt or params != self.params:
            raise DecryptionFailed()  # sealed under another derivation of the password
        nonce, sealed = envelope.get("nonce"), envelope.get("sealed")
        if not isinstance(nonce, str) or not isinstance(sealed, str):
            raise CryptoError("The keystore is malformed.")
        raw_nonce = b64decode(nonce)
        if len(raw_nonce) != SEALED_BOX_NONCE_BYTES:
            raise CryptoError("The keystore's nonce has the wrong size.")
        return self._box.open(raw_nonce + b64decode(sealed), aad)


def seal_with_password(password: str, plaintext: bytes, aad: bytes) -> dict[str, object]:
    """A new envelope (fresh salt, default parameters) holding ``plaintext``."""
    return PasswordSeal(password).seal(plaintext, aad)


def open_with_password(envelope: Mapping[str, object], password: str, aad: bytes) -> bytes:
    """What ``envelope`` holds, derived with its own salt and parameters (see PasswordSeal)."""
    return PasswordSeal.for_envelope(envelope, password).open(envelope, aad)


@dataclass(frozen=True)
class TripleDesCbcHmac:
    """The default suite (design 000): 24-byte three-key Triple-DES + 32-byte HMAC key."""

    backend: str = "openssl"
    name = "3des"
    suite_id = 1
    key_bytes = TDES_KEY_BYTES + HMAC_KEY_BYTES
    # SP 800-67r2: at most 2^20 blocks under one Triple-DES key (Sweet32).
    max_bytes_per_key = (1 << 20) * TDES_BLOCK_BYTES

    def generate_key(self) -> bytes:
        return generate_tdes_key() + random_bytes(HMAC_KEY_BYTES)

    def key_from_material(self, material: bytes) -> bytes:
        """Turn HKDF output into a valid suite key (parity set; weak keys refused)."""
        if len(material) != self.key_bytes:
            raise InvalidKey("Wrong amount of key material.")
        key = set_des_parity(material[:TDES_KEY_BYTES]) + material[TDES_KEY_BYTES:]
        check_tdes_key(key[:TDES_KEY_BYTES])
        return key

    def cipher(self, key: bytes) -> TripleDesCbcHmacCipher:
        return TripleDesCbcHmacCipher(key, self.backend)

    def record_cipher(self, key: bytes) -> TripleDesCbcHmacCipher:
        """The record layer's cipher: the same records, through long-lived contexts (stateful)."""
        return RecordTripleDesCbcHmacCipher(key, self.backend)

    def overhead(self, plaintext_len: int) -> int:
        return TDES_BLOCK_BYTES + (TDES_BLOCK_BYTES - plaintext_len % TDES_BLOCK_BYTES) + HMAC_TAG_BYTES


@dataclass(frozen=True)
class Aes256Gcm:
    """AES-256-GCM (design 002 asked for AES-256)."""

    name = "aes256"
    suite_id = 2
    key_bytes = AES_KEY_BYTES
    # Random 96-bit nonces: stay far below the 2^32-message birthday bound.
    max_bytes_per_key = 1 << 36

    def generate_key(self) -> bytes:
        return random_bytes(AES_KEY_BYTES)

    def key_from_material(self, material: bytes) -> bytes:
        if len(material) != self.key_bytes:
            raise InvalidKey("Wrong amount of key material.")
        return material

    def cipher(self, key: bytes) -> Aes256GcmCipher:
        return Aes256GcmCipher(key)

    def record_cipher(self, key: bytes) -> Aes256GcmCipher:
        return Aes256GcmCipher(key)  # AES-GCM objects are already reused across records

    def overhead(self, plaintext_len: int) -> int:
        return GCM_NONCE_BYTES + GCM_TAG_BYTES


Suite = TripleDesCbcHmac | Aes256Gcm
SUITE_NAMES = ("3des", "aes256")
DEFAULT_SUITE = "3des"


def get_suite(name: str, *, tdes_backend: str | None = None) -> Suite:
    """The suite called ``name`` ("3des" or "aes256")."""
    if name == "3des":
        backend = tdes_backend or default_tdes_backend()
        if backend not in TDES_BACKENDS:
            raise ConfigError(f"Unknown Triple-DES backend {backend!r}.")
        return TripleDesCbcHmac(backend)
    if name == "aes256":
        return Aes256Gcm()
    raise ConfigError(f"Unknown cipher suite {name!r}; choose one of {', '.join(SUITE_NAMES)}.")


def suite_by_id(suite_id: int) -> Suite:
    for name in SUITE_NAMES:
        suite = get_suite(name)
        if suite.suite_id == suite_id:
            return suite
    raise CryptoError(f"Unknown cipher suite id {suite_id}.")


# --- identities (Ed25519) -------------------------------------------------------
# The typed surface the rest of the package uses: no other module imports ``cryptography``
# (an import-linter contract in pyproject.toml holds that), so these names are the ones to use.
IdentityKey: TypeAlias = Ed25519PrivateKey  # an Ed25519 identity (signing) key
IdentityPublicKey: TypeAlias = Ed25519PublicKey
X25519Key: TypeAlias = X25519PrivateKey  # an X25519 key pair (e2e shares, prekeys)
X25519Public: TypeAlias = X25519PublicKey


def identity_seed(key: IdentityKey) -> bytes:
    """The 32-byte Ed25519 seed of ``key`` (what the identity file seals)."""
    return key.private_bytes_raw()


def identity_from_seed(seed: bytes) -> IdentityKey:
    """The Ed25519 key for a 32-byte seed (InvalidKey otherwise)."""
    try:
        return Ed25519PrivateKey.from_private_bytes(seed)
    except (ValueError, TypeError) as exc:
        raise InvalidKey("An Ed25519 seed is 32 bytes.") from exc


def fingerprint(public_key: bytes | Ed25519PublicKey) -> str:
    """OpenSSH-style fingerprint: ``SHA256:`` + unpadded base64 of SHA-256(raw key)."""
    if isinstance(public_key, Ed25519PublicKey):
        public_key = public_bytes(public_key)
    return "SHA256:" + base64.b64encode(sha256(public_key)).decode("ascii").rstrip("=")


def public_bytes(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public_key(raw: bytes) -> Ed25519PublicKey:
    if len(raw) != ED25519_PUBLIC_BYTES:
        raise InvalidKey("An Ed25519 public key is 32 bytes.")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise InvalidKey("Invalid Ed25519 public key.") from exc


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True only for a valid Ed25519 signature; never raises on bad input."""
    if len(signature) != ED25519_SIGNATURE_BYTES:
        return False
    try:
        load_public_key(public_key).verify(signature, data)
    except (InvalidKey, InvalidSignature):
        return False
    return True


def load_identity(path: Path) -> Ed25519PrivateKey:
    """Load the Ed25519 key at ``path`` (it must exist).

    A key file that others can read is refused, as OpenSSH refuses such files.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Identity key {path} does not exist.")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"Identity key {path} is accessible by others (mode {oct(mode & 0o777)}); run: chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"Identity key {path} is not a valid private key.") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"Identity key {path} is not an Ed25519 key.")
    return key


def load_or_create_identity(path: Path) -> Ed25519PrivateKey:
    """Load the Ed25519 key at ``path`` (``load_identity``), creating it (mode 0600) if it is missing."""
    path = Path(path)
    if path.exists():
        return load_identity(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private_file(path, pem, exclusive=True)
    return key


# --- ML-KEM-768 (FIPS 203), the post-quantum half of the hybrid key exchanges ------
def mlkem_available() -> bool:
    """Whether this cryptography/OpenSSL build can do ML-KEM-768 (a server without it
    does not allow the hybrid group, so clients fall back with a GroupRetry)."""
    global _MLKEM_AVAILABLE
    if _MLKEM_AVAILABLE is None:
        try:
            MLKEM768PrivateKey.generate()
            _MLKEM_AVAILABLE = True
        except UnsupportedAlgorithm:
            _MLKEM_AVAILABLE = False
    return _MLKEM_AVAILABLE


_MLKEM_AVAILABLE: bool | None = None


def _mlkem_unsupported() -> ConfigError:
    return ConfigError(
        "This cryptography/OpenSSL build has no ML-KEM-768; "
        "install cryptography 47 or later built with ML-KEM support."
    )


class MLKEM768KeyPair:
    """One ML-KEM-768 decapsulation key and its encapsulation key (sent to the peer).

    Every size is checked before OpenSSL sees the bytes, and every failure is an
    :class:`errors.InvalidKemValue` with a clear reason, never a bare ValueError.
    """

    __slots__ = ("_key", "encapsulation_key")

    def __init__(self, seed: bytes | None = None) -> None:
        """``seed`` (64 bytes, d || z) fixes the key: known-answer tests only."""
        if seed is not None and len(seed) != MLKEM768_SEED_BYTES:
            raise InvalidKey(f"An ML-KEM-768 seed is {MLKEM768_SEED_BYTES} bytes, not {len(seed)}.")
        try:
            self._key = (
                MLKEM768PrivateKey.generate() if seed is None else MLKEM768PrivateKey.from_seed_bytes(seed)
            )
        except UnsupportedAlgorithm:
            raise _mlkem_unsupported() from None
        self.encapsulation_key = self._key.public_key().public_bytes_raw()

    def decapsulate(self, ciphertext: bytes) -> bytes:
        """The 32-byte shared secret for ``ciphertext``.

        A ciphertext of the right size always decapsulates: a forged or damaged one
        yields an unrelated secret (FIPS 203 implicit rejection), so the key
        confirmation or the first record fails later, as for a wrong DH value.
        """
        if not isinstance(ciphertext, (bytes, bytearray)) or len(ciphertext) != MLKEM768_CIPHERTEXT_BYTES:
            raise InvalidKemValue(f"An ML-KEM-768 ciphertext is exactly {MLKEM768_CIPHERTEXT_BYTES} bytes.")
        try:
            return self._key.decapsulate(bytes(ciphertext))
        except ValueError:  # not reached for a 1,088-byte input; fail closed anyway
            raise InvalidKemValue("The ML-KEM-768 ciphertext was refused.") from None


def mlkem768_encapsulate(encapsulation_key: bytes) -> tuple[bytes, bytes]:
    """(shared secret, ciphertext) for the peer's ``encapsulation_key``.

    The key is refused unless it is exactly 1,184 bytes and every coefficient is
    reduced modulo q (FIPS 203 section 7.2, the encapsulation key modulus check).
    """
    if (
        not isinstance(encapsulation_key, (bytes, bytearray))
        or len(encapsulation_key) != MLKEM768_ENCAPSULATION_KEY_BYTES
    ):
        raise InvalidKemValue(
            f"An ML-KEM-768 encapsulation key is exactly {MLKEM768_ENCAPSULATION_KEY_BYTES} bytes."
        )
    try:
        public = MLKEM768PublicKey.from_public_bytes(bytes(encapsulation_key))
    except UnsupportedAlgorithm:
        raise _mlkem_unsupported() from None
    except ValueError:  # right size, so the modulus check failed
        raise InvalidKemValue(
            "The ML-KEM-768 encapsulation key is malformed (a coefficient is not reduced modulo q)."
        ) from None
    return public.encapsulate()
