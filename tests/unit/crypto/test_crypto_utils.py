"""crypto_utils: suites fail closed, Triple-DES key hygiene, backends agree, identities."""

from __future__ import annotations

import os
import stat

import pytest

import crypto_utils as cu
from secureim.errors import ConfigError, CryptoError, DecryptionFailed, InvalidKey

SUITES = ["3des", "aes256"]


@pytest.fixture(params=SUITES)
def cipher(request):
    suite = cu.get_suite(request.param)
    return suite.cipher(suite.generate_key())


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 100, 4096])
def test_round_trip(cipher, size):
    msg = os.urandom(size)
    assert cipher.open(cipher.seal(msg, b"aad"), b"aad") == msg


def test_every_byte_tampered_is_detected(cipher):
    """Flipping any bit of IV/nonce, ciphertext or tag fails; so does other AAD."""
    sealed = cipher.seal(b"attack at dawn, bring coffee", b"header")
    for i in range(len(sealed)):
        for bit in (0x01, 0x80):
            tampered = bytearray(sealed)
            tampered[i] ^= bit
            with pytest.raises(DecryptionFailed):
                cipher.open(bytes(tampered), b"header")
    for aad in (b"", b"headeR", b"header\0", b"heade"):
        with pytest.raises(DecryptionFailed):
            cipher.open(sealed, aad)


def test_truncated_and_extended_ciphertexts_fail(cipher):
    sealed = cipher.seal(b"x" * 40)
    for cut in range(len(sealed)):
        with pytest.raises(DecryptionFailed):
            cipher.open(sealed[:cut])
    with pytest.raises(DecryptionFailed):
        cipher.open(sealed + b"\0")


def test_ciphertexts_are_randomised(cipher):
    assert cipher.seal(b"same") != cipher.seal(b"same")


def test_wrong_key_fails():
    suite = cu.get_suite("3des")
    sealed = suite.cipher(suite.generate_key()).seal(b"secret")
    with pytest.raises(DecryptionFailed):
        suite.cipher(suite.generate_key()).open(sealed)


def test_pydes_and_openssl_backends_are_byte_identical():
    key = cu.get_suite("3des").generate_key()
    fast = cu.get_suite("3des", tdes_backend="openssl").cipher(key)
    slow = cu.get_suite("3des", tdes_backend="pydes").cipher(key)
    for size in (0, 5, 8, 23, 64):
        msg, iv = os.urandom(size), os.urandom(8)
        a, b = fast.seal(msg, b"ad", iv=iv), slow.seal(msg, b"ad", iv=iv)
        assert a == b
        assert slow.open(a, b"ad") == fast.open(b, b"ad") == msg


def test_parity_is_odd_and_idempotent():
    raw = bytes(range(24))
    fixed = cu.set_des_parity(raw)
    assert all(bin(b).count("1") % 2 == 1 for b in fixed)
    assert cu.set_des_parity(fixed) == fixed
    assert all((a & 0xFE) == (b & 0xFE) for a, b in zip(raw, fixed, strict=True))


@pytest.mark.parametrize("weak", sorted(cu.DES_WEAK_KEYS))
def test_weak_and_semi_weak_subkeys_refused(weak):
    good = cu.generate_tdes_key()
    for pos in range(3):
        key = bytearray(good)
        key[pos * 8 : (pos + 1) * 8] = weak
        with pytest.raises(InvalidKey, match="weak"):
            cu.check_tdes_key(bytes(key))


def test_dependent_subkeys_and_bad_parity_refused():
    k = cu.generate_tdes_key()
    for key in (k[:8] * 2 + k[16:], k[:16] + k[8:16], k[:16] + k[:8]):
        with pytest.raises(InvalidKey, match="independent"):
            cu.check_tdes_key(key)
    bad_parity = bytes([k[0] ^ 1]) + k[1:]
    with pytest.raises(InvalidKey, match="parity"):
        cu.check_tdes_key(bad_parity)
    with pytest.raises(InvalidKey):
        cu.check_tdes_key(k[:16])


def test_generated_keys_are_valid_and_distinct():
    keys = {cu.generate_tdes_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        cu.check_tdes_key(key)


def test_suite_keys_are_checked():
    with pytest.raises(InvalidKey):
        cu.get_suite("3des").cipher(b"\0" * 56)  # weak, dependent subkeys
    with pytest.raises(InvalidKey):
        cu.get_suite("aes256").cipher(b"\0" * 16)
    with pytest.raises(ConfigError):
        cu.get_suite("rc4")
    with pytest.raises(ConfigError):
        cu.get_suite("3des", tdes_backend="nope")


def test_base64_is_strict():
    assert cu.b64decode(cu.b64encode(b"\x00\xffhello")) == b"\x00\xffhello"
    for bad in ("not base64!", "YQ", "YQ==\n", "Y Q==", "YR=="):
        with pytest.raises(CryptoError):
            cu.b64decode(bad)


def test_fingerprint_is_openssh_style():
    key = bytes(range(32))
    fp = cu.fingerprint(key)
    assert fp.startswith("SHA256:") and "=" not in fp and len(fp) == 7 + 43


def test_identity_created_owner_only_and_reused(tmp_path):
    path = tmp_path / "data" / "server_identity.key"
    first = cu.load_or_create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = cu.load_or_create_identity(path)
    assert cu.public_bytes(first) == cu.public_bytes(second)


def test_identity_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "id.key"
    cu.load_or_create_identity(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        cu.load_or_create_identity(path)


def test_signature_verification_rejects_garbage():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    sig = key.sign(b"msg")
    pub = cu.public_bytes(key)
    assert cu.verify_signature(pub, sig, b"msg")
    assert not cu.verify_signature(pub, sig, b"msG")
    assert not cu.verify_signature(pub, sig[:-1], b"msg")
    assert not cu.verify_signature(b"\0" * 31, sig, b"msg")


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"\x00" * 8,
        b"A" * 7 + b"\x09",
        b"A" * 6 + b"\x01\x02",
        b"A" * 9 + b"\x01",
        b"A" * 5 + b"\x02\x03\x03",
    ],
)
def test_pkcs7_unpad_refuses_every_malformed_pad(bad):
    with pytest.raises(DecryptionFailed):
        cu.pkcs7_unpad(bad)


@pytest.mark.parametrize("length", range(0, 25))
def test_pkcs7_matches_the_library_padder(length):
    from cryptography.hazmat.primitives import padding

    data = bytes(range(length))
    padder = padding.PKCS7(64).padder()
    expected = padder.update(data) + padder.finalize()
    assert cu.pkcs7_pad(data) == expected
    assert cu.pkcs7_unpad(expected) == data


def _record_pair():
    suite = cu.get_suite("3des", tdes_backend="openssl")
    key = suite.generate_key()
    return suite.record_cipher(key), suite.cipher(key), suite.record_cipher(key)


def test_record_cipher_records_open_with_a_fresh_context_and_back():
    """The long-lived contexts change nothing on the wire: IV || CT || TAG, each record on its own."""
    chained, plain, other = _record_pair()
    texts = [b"", b"a", b"x" * 7, b"y" * 8, b"z" * 100, bytes(range(256))]
    for i, text in enumerate(texts):
        aad = f"record {i}".encode()
        assert plain.open(chained.seal(text, aad), aad) == text
        assert other.open(plain.seal(text, aad), aad) == text


def test_record_cipher_opens_in_any_order_and_survives_a_forgery():
    chained, _plain, receiver = _record_pair()
    records = [chained.seal(f"message {i}".encode(), b"aad") for i in range(6)]
    for i in (3, 0, 5, 1):  # the decryptor's state from earlier records never matters
        assert receiver.open(records[i], b"aad") == f"message {i}".encode()
    forged = bytearray(records[2])
    forged[10] ^= 1
    with pytest.raises(DecryptionFailed):
        receiver.open(bytes(forged), b"aad")
    with pytest.raises(DecryptionFailed):
        receiver.open(records[2], b"other aad")
    assert receiver.open(records[2], b"aad") == b"message 2"


def test_record_cipher_ivs_are_fresh_for_the_same_plaintext():
    chained, _plain, _ = _record_pair()
    records = [chained.seal(b"same", b"") for _ in range(200)]
    ivs = {r[:8] for r in records}
    bodies = {r[8:-32] for r in records}
    assert len(ivs) == len(bodies) == 200
