"""Diffie-Hellman key agreement over an allowlist of named groups (design 000's DH class).

The client proposes the group; only the groups below are accepted, anything else
is refused with :class:`errors.UnsupportedGroup`.  No group is smaller than
2048 bits (OpenSSH DH_GRP_MIN; Logjam).  X25519 (RFC 7748) runs on OpenSSL and
is the default.  The finite-field groups use Python's ``pow()`` because
``cryptography`` 50 deprecates finite-field DH.

Constant time: X25519 runs in constant time inside OpenSSL.  Python's ``pow()``
is *not* constant time; its timing depends on the private exponent.  Each
exponent here is ephemeral (used for one handshake) and short exponents make
the window small, which is why X25519 is the default and the finite-field groups
exist for interoperability with design 000.

Exponent sizes: a 2048-bit ``pow()`` with a full-size exponent takes about
40 ms and holds the GIL, stalling every other server thread; with a 256-bit
exponent about 6 ms.  The server therefore runs them in a process of its own
(``ModexpOffload``, installed with ``offload_modexp``); its worker thread waits
with the GIL released, and the event loop goes on relaying.  We use short exponents of at least twice the group's
security strength and never less than RFC 7919's minimum (appendix A).

Hybrid ``x25519-mlkem768`` (the default): X25519 plus ML-KEM-768 (FIPS 203), as
TLS X25519MLKEM768 (draft-ietf-tls-ecdhe-mlkem) lays it out.  The client's share
is ``ML-KEM encapsulation key (1184) || X25519 (32)``; the server answers with
``ML-KEM ciphertext (1088) || X25519 (32)`` (:meth:`DiffieHellman.respond`); the
shared secret is ``ML-KEM secret (32) || X25519 secret (32)``, which the
handshake feeds, with the transcript hash, into HKDF.  Recorded traffic stays
secret unless *both* X25519 and ML-KEM-768 are broken.
"""

from __future__ import annotations

import secrets
import threading
from concurrent.futures import Executor
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from crypto_utils import (
    MLKEM768_CIPHERTEXT_BYTES,
    MLKEM768_ENCAPSULATION_KEY_BYTES,
    MLKEM768KeyPair,
    constant_time_equal,
    hmac_sha512,
    mlkem768_encapsulate,
)
from secureim.errors import InvalidPublicValue, UnsupportedGroup

X25519_BYTES = 32
# OpenSSH refuses public values with fewer than 4 bits set (dh.c, dh_pub_is_valid).
MIN_PUBLIC_BITS_SET = 4


_MODP2048_P = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
    "3995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF",
    16,
)

_MODP3072_P = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
    "3995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33"
    "A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7"
    "ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864"
    "D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E2"
    "08E24FA074E5AB3143DB5BFCE0FD108E4B82D120A93AD2CAFFFFFFFFFFFFFFFF",
    16,
)

_MODP4096_P = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
    "3995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33"
    "A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7"
    "ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864"
    "D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E2"
    "08E24FA074E5AB3143DB5BFCE0FD108E4B82D120A92108011A723C12A787E6D7"
    "88719A10BDBA5B2699C327186AF4E23C1A946834B6150BDA2583E9CA2AD44CE8"
    "DBBBC2DB04DE8EF92E8EFC141FBECAA6287C59474E6BC05D99B2964FA090C3A2"
    "233BA186515BE7ED1F612970CEE2D7AFB81BDD762170481CD0069127D5B05AA9"
    "93B4EA988D8FDDC186FFB7DC90A6C08F4DF435C934063199FFFFFFFFFFFFFFFF",
    16,
)

_FFDHE2048_P = int(
    "FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1D8B9C583CE2D3695"
    "A9E13641146433FBCC939DCE249B3EF97D2FE363630C75D8F681B202AEC4617A"
    "D3DF1ED5D5FD65612433F51F5F066ED0856365553DED1AF3B557135E7F57C935"
    "984F0C70E0E68B77E2A689DAF3EFE8721DF158A136ADE73530ACCA4F483A797A"
    "BC0AB182B324FB61D108A94BB2C8E3FBB96ADAB760D7F4681D4F42A3DE394DF4"
    "AE56EDE76372BB190B07A7C8EE0A6D709E02FCE1CDF7E2ECC03404CD28342F61"
    "9172FE9CE98583FF8E4F1232EEF28183C3FE3B1B4C6FAD733BB5FCBC2EC22005"
    "C58EF1837D1683B2C6F34A26C1B2EFFA886B423861285C97FFFFFFFFFFFFFFFF",
    16,
)

_FFDHE3072_P = int(
    "FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1D8B9C583CE2D3695"
    "A9E13641146433FBCC939DCE249B3EF97D2FE363630C75D8F681B202AEC4617A"
    "D3DF1ED5D5FD65612433F51F5F066ED0856365553DED1AF3B557135E7F57C935"
    "984F0C70E0E68B77E2A689DAF3EFE8721DF158A136ADE73530ACCA4F483A797A"
    "BC0AB182B324FB61D108A94BB2C8E3FBB96ADAB760D7F4681D4F42A3DE394DF4"
    "AE56EDE76372BB190B07A7C8EE0A6D709E02FCE1CDF7E2ECC03404CD28342F61"
    "9172FE9CE98583FF8E4F1232EEF28183C3FE3B1B4C6FAD733BB5FCBC2EC22005"
    "C58EF1837D1683B2C6F34A26C1B2EFFA886B4238611FCFDCDE355B3B6519035B"
    "BC34F4DEF99C023861B46FC9D6E6C9077AD91D2691F7F7EE598CB0FAC186D91C"
    "AEFE130985139270B4130C93BC437944F4FD4452E2D74DD364F2E21E71F54BFF"
    "5CAE82AB9C9DF69EE86D2BC522363A0DABC521979B0DEADA1DBF9A42D5C4484E"
    "0ABCD06BFA53DDEF3C1B20EE3FD59D7C25E41D2B66C62E37FFFFFFFFFFFFFFFF",
    16,
)

_FFDHE4096_P = int(
    "FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1D8B9C583CE2D3695"
    "A9E13641146433FBCC939DCE249B3EF97D2FE363630C75D8F681B202AEC4617A"
    "D3DF1ED5D5FD65612433F51F5F066ED0856365553DED1AF3B557135E7F57C935"
    "984F0C70E0E68B77E2A689DAF3EFE8721DF158A136ADE73530ACCA4F483A797A"
    "BC0AB182B324FB61D108A94BB2C8E3FBB96ADAB760D7F4681D4F42A3DE394DF4"
    "AE56EDE76372BB190B07A7C8EE0A6D709E02FCE1CDF7E2ECC03404CD28342F61"
    "9172FE9CE98583FF8E4F1232EEF28183C3FE3B1B4C6FAD733BB5FCBC2EC22005"
    "C58EF1837D1683B2C6F34A26C1B2EFFA886B4238611FCFDCDE355B3B6519035B"
    "BC34F4DEF99C023861B46FC9D6E6C9077AD91D2691F7F7EE598CB0FAC186D91C"
    "AEFE130985139270B4130C93BC437944F4FD4452E2D74DD364F2E21E71F54BFF"
    "5CAE82AB9C9DF69EE86D2BC522363A0DABC521979B0DEADA1DBF9A42D5C4484E"
    "0ABCD06BFA53DDEF3C1B20EE3FD59D7C25E41D2B669E1EF16E6F52C3164DF4FB"
    "7930E9E4E58857B6AC7D5F42D69F6D187763CF1D5503400487F55BA57E31CC7A"
    "7135C886EFB4318AED6A1E012D9E6832A907600A918130C46DC778F971AD0038"
    "092999A333CB8B7A1A1DB93D7140003C2A4ECEA9F98D0ACC0A8291CDCEC97DCF"
    "8EC9B55A7F88A46B4DB5A851F44182E1C68A007E5E655F6AFFFFFFFFFFFFFFFF",
    16,
)


@dataclass(frozen=True)
class FiniteFieldGroup:
    """A safe-prime group p = 2q + 1 with generator g of the order-q subgroup."""

    name: str
    p: int
    g: int
    exponent_bits: int
    source: str

    @property
    def q(self) -> int:
        return (self.p - 1) // 2

    @property
    def byte_length(self) -> int:
        return (self.p.bit_length() + 7) // 8

    @property
    def bits(self) -> int:
        return self.p.bit_length()


@dataclass(frozen=True)
class CurveGroup:
    name: str
    source: str
    byte_length: int = X25519_BYTES
    bits: int = 255


@dataclass(frozen=True)
class HybridGroup:
    """X25519 + ML-KEM-768: the client sends a key, the server encapsulates to it."""

    name: str
    source: str
    # The client's share (what byte_length means for the other groups) ...
    byte_length: int = MLKEM768_ENCAPSULATION_KEY_BYTES + X25519_BYTES
    # ... and the server's answer, which differs for a KEM.
    response_length: int = MLKEM768_CIPHERTEXT_BYTES + X25519_BYTES
    bits: int = 255


Group = FiniteFieldGroup | CurveGroup | HybridGroup

X25519 = CurveGroup("x25519", "RFC 7748")
X25519_MLKEM768 = HybridGroup("x25519-mlkem768", "FIPS 203 + RFC 7748, as TLS X25519MLKEM768")
GROUPS: dict[str, Group] = {
    "x25519-mlkem768": X25519_MLKEM768,
    # exponent_bits: max(RFC 7919 minimum, 2 x security strength), rounded up.
    "x25519": X25519,
    "ffdhe2048": FiniteFieldGroup("ffdhe2048", _FFDHE2048_P, 2, 256, "RFC 7919 A.1"),
    "ffdhe3072": FiniteFieldGroup("ffdhe3072", _FFDHE3072_P, 2, 320, "RFC 7919 A.2"),
    "ffdhe4096": FiniteFieldGroup("ffdhe4096", _FFDHE4096_P, 2, 384, "RFC 7919 A.3"),
    "modp2048": FiniteFieldGroup("modp2048", _MODP2048_P, 2, 256, "RFC 3526 section 3 (group 14)"),
    "modp3072": FiniteFieldGroup("modp3072", _MODP3072_P, 2, 320, "RFC 3526 section 4 (group 15)"),
    "modp4096": FiniteFieldGroup("modp4096", _MODP4096_P, 2, 384, "RFC 3526 section 5 (group 16)"),
}
DEFAULT_GROUP = "x25519-mlkem768"
# Groups with a post-quantum part: a client that offers one of them never uses a
# classical group with a server that allows it (protocol.py, downgrade check).
POST_QUANTUM_GROUPS = frozenset({"x25519-mlkem768"})
MAX_GROUP_NAME_BYTES = 16


def share_length(group: Group, *, response: bool = False) -> int:
    """The exact size of a key share in ``group``: the client's, or the server's answer."""
    if response and isinstance(group, HybridGroup):
        return group.response_length
    return group.byte_length


def get_group(name: str) -> Group:
    """The allowlisted group called ``name``; anything else is refused."""
    try:
        return GROUPS[name]
    except (KeyError, TypeError):
        shown = name if isinstance(name, str) and name.isprintable() and len(name) <= 32 else "(unprintable)"
        raise UnsupportedGroup(
            f"Diffie-Hellman group {shown!r} is not allowed; allowed groups: {', '.join(GROUPS)}."
        ) from None


class ModexpOffload:
    """Finite-field exponentiations in a process of their own, created on first use.

    ``pow()`` on 2048-bit numbers holds the GIL for milliseconds (the subgroup check
    with its 2047-bit exponent, about 30 ms): on a worker thread it would still stall the
    server's event loop.  In a separate process it does not; the worker thread that
    asked waits with the GIL released.  The processes start with ``spawn`` (never a fork
    of a threaded server) and are ended by ``shutdown()``.
    """

    def __init__(self, processes: int = 1) -> None:
        self._processes = processes
        self._pool: Executor | None = None
        self._lock = threading.Lock()
        self.submitted = 0

    def __call__(self, base: int, exponent: int, modulus: int) -> int:
        import multiprocessing
        from concurrent.futures import CancelledError, ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self._processes, mp_context=multiprocessing.get_context("spawn")
                )
            pool = self._pool
            self.submitted += 1
        try:
            return pool.submit(pow, base, exponent, modulus).result()
        except (BrokenProcessPool, RuntimeError, CancelledError):  # the pool died or is stopping: do it here
            return pow(base, exponent, modulus)

    def shutdown(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


_modexp_hook = None


def offload_modexp(hook) -> None:
    """Route every finite-field exponentiation through ``hook(base, exp, mod)`` (None: ``pow``)."""
    global _modexp_hook
    _modexp_hook = hook


def modexp(base: int, exponent: int, modulus: int) -> int:
    hook = _modexp_hook
    return pow(base, exponent, modulus) if hook is None else hook(base, exponent, modulus)


def validate_public_value(group: FiniteFieldGroup, y: int) -> None:
    """Refuse a finite-field public value that is not in the prime-order subgroup.

    RFC 7919 section 5.1 / RFC 8446 section 4.2.8.1: 1 < y < p-1.
    SP 800-56A rev3 section 5.6.2.3.1: y^q = 1 (mod p), so y is in the order-q
    subgroup and small-subgroup confinement is impossible (p is a safe prime).
    """
    if not 1 < y < group.p - 1:
        raise InvalidPublicValue("Diffie-Hellman public value out of range (must be 1 < y < p-1).")
    if modexp(y, group.q, group.p) != 1:
        raise InvalidPublicValue("Diffie-Hellman public value is not in the prime-order subgroup.")
    if bin(y).count("1") < MIN_PUBLIC_BITS_SET:
        raise InvalidPublicValue("Diffie-Hellman public value has too few bits set.")


def hybrid_secret(kem_secret: bytes, x25519_secret: bytes) -> bytes:
    """The x25519-mlkem768 shared secret: ML-KEM first, then X25519 (as TLS X25519MLKEM768)."""
    return kem_secret + x25519_secret


def _x25519_exchange(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    except ValueError:  # all-zero shared secret: a low-order point (RFC 7748 section 6.1)
        raise InvalidPublicValue("X25519 public value gives an all-zero shared secret.") from None


class DiffieHellman:
    """One ephemeral key pair in an allowlisted group (design 000's DH class).

    ``public_bytes`` goes to the peer; ``generate_shared_secret(peer)`` validates
    the peer's value and returns the shared secret (fixed-length big-endian for
    finite-field groups, the raw 32 bytes for X25519).
    """

    def __init__(self, group: str | Group = DEFAULT_GROUP, *, private: bytes | int | None = None) -> None:
        """``private`` fixes the private key (known-answer tests only); never set it otherwise."""
        self.group = (
            group if isinstance(group, (FiniteFieldGroup, CurveGroup, HybridGroup)) else get_group(group)
        )
        self.shared_secret: bytes | None = None
        if isinstance(self.group, HybridGroup):  # the client's side; the server uses respond()
            self._mlkem = MLKEM768KeyPair()
            self._x25519 = (
                X25519PrivateKey.generate()
                if private is None
                else X25519PrivateKey.from_private_bytes(bytes(private))
            )
            self.public_bytes = self._mlkem.encapsulation_key + self._x25519.public_key().public_bytes_raw()
        elif isinstance(self.group, CurveGroup):
            self._x25519 = (
                X25519PrivateKey.generate()
                if private is None
                else X25519PrivateKey.from_private_bytes(bytes(private))
            )
            self.public_bytes = self._x25519.public_key().public_bytes_raw()
        else:
            bits = self.group.exponent_bits
            # Top bit set so every exponent has exactly ``bits`` bits.
            self._exponent = (secrets.randbits(bits) | (1 << (bits - 1))) if private is None else int(private)
            y = modexp(self.group.g, self._exponent, self.group.p)
            self.public_bytes = y.to_bytes(self.group.byte_length, "big")

    def generate_shared_secret(self, peer_public: bytes) -> bytes:
        """Validate the peer's public value and compute the shared secret.

        For the hybrid group ``peer_public`` is the server's answer (ciphertext ||
        X25519) and the secret is ``ML-KEM secret || X25519 secret``.
        """
        expected = share_length(self.group, response=True)
        if not isinstance(peer_public, (bytes, bytearray)) or len(peer_public) != expected:
            raise InvalidPublicValue(f"A {self.group.name} public value is exactly {expected} bytes.")
        if isinstance(self.group, HybridGroup):
            ciphertext, x_public = (
                peer_public[:MLKEM768_CIPHERTEXT_BYTES],
                peer_public[MLKEM768_CIPHERTEXT_BYTES:],
            )
            secret = hybrid_secret(
                self._mlkem.decapsulate(ciphertext), _x25519_exchange(self._x25519, x_public)
            )
        elif isinstance(self.group, CurveGroup):
            secret = _x25519_exchange(self._x25519, peer_public)
        else:
            y = int.from_bytes(peer_public, "big")
            validate_public_value(self.group, y)
            z = modexp(y, self._exponent, self.group.p)
            if z in (0, 1, self.group.p - 1):  # impossible after validation; fail closed anyway
                raise InvalidPublicValue("Diffie-Hellman shared secret is degenerate.")
            secret = z.to_bytes(self.group.byte_length, "big")
        self.shared_secret = secret
        return secret

    @classmethod
    def respond(cls, group: str | Group, peer_public: bytes) -> tuple[bytes, bytes]:
        """The server's side, any group: (our public value, the shared secret).

        For a Diffie-Hellman group this is a fresh key pair and an exchange.  For
        the hybrid group it checks the client's share (size first, then the ML-KEM
        modulus check and the X25519 all-zero check), encapsulates to its ML-KEM key
        and answers ``ciphertext || X25519``.
        """
        group = group if isinstance(group, (FiniteFieldGroup, CurveGroup, HybridGroup)) else get_group(group)
        if not isinstance(group, HybridGroup):
            dh = cls(group)
            secret = dh.generate_shared_secret(peer_public)
            return dh.public_bytes, secret
        if not isinstance(peer_public, (bytes, bytearray)) or len(peer_public) != group.byte_length:
            raise InvalidPublicValue(f"A {group.name} public value is exactly {group.byte_length} bytes.")
        encapsulation_key = peer_public[:MLKEM768_ENCAPSULATION_KEY_BYTES]
        x_public = peer_public[MLKEM768_ENCAPSULATION_KEY_BYTES:]
        mine = X25519PrivateKey.generate()
        x_secret = _x25519_exchange(mine, x_public)
        kem_secret, ciphertext = mlkem768_encapsulate(encapsulation_key)
        return ciphertext + mine.public_key().public_bytes_raw(), hybrid_secret(kem_secret, x_secret)

    @staticmethod
    def hash_key(key: bytes, nonce: bytes = b"") -> bytes:
        """Design 000's key confirmation: a SHA-512 based hash of a key and a nonce.

        HMAC-SHA512 keyed with the derived key, over the nonce (the transcript).
        """
        return hmac_sha512(key, nonce)

    @classmethod
    def verify_hashed_key(cls, key: bytes, digest: bytes, nonce: bytes = b"") -> bool:
        """Constant-time check of a key confirmation made by :meth:`hash_key`."""
        return constant_time_equal(cls.hash_key(key, nonce), digest)
