"""Published test vectors: NIST CAVP Triple-DES, RFC 5869/4231, Wycheproof, RFC 7748.

Sources are listed in tests/vectors/README.md.  Each case is named after its
source so a failure points at the exact vector.
"""

from __future__ import annotations

import json

import pytest
from conftest import VECTORS, load_nist_records, load_wycheproof, wycheproof_id

import crypto_utils as cu
from diffiehellman import DiffieHellman
from secureim.errors import DecryptionFailed, InvalidPublicValue

TDES_DIR = VECTORS / "cryptography_vectors" / "ciphers" / "3DES"


def _tdes_cases():
    cases = []
    for path in sorted(TDES_DIR.glob("*/*.rsp")):
        for rec in load_nist_records(path):
            if "COUNT" not in rec:
                continue
            key = (
                bytes.fromhex(rec["KEYs"]) * 3
                if "KEYs" in rec
                else bytes.fromhex(rec["KEY1"] + rec["KEY2"] + rec["KEY3"])
            )
            cases.append(
                pytest.param(
                    path.parent.name,
                    rec["_section"],
                    key,
                    rec.get("IV"),
                    bytes.fromhex(rec["PLAINTEXT"]),
                    bytes.fromhex(rec["CIPHERTEXT"]),
                    id=f"{path.stem}-{rec['_section']}-{rec['COUNT']}",
                )
            )
    return cases


TDES_CASES = _tdes_cases()


def test_all_tdes_vector_files_were_read():
    assert len(TDES_CASES) == 510  # 255 encrypt + 255 decrypt (tests/vectors/README.md)


@pytest.mark.parametrize("backend", ["openssl", "pydes"])
@pytest.mark.parametrize("mode,section,key,iv,plaintext,ciphertext", TDES_CASES)
def test_tdes_cavp(backend, mode, section, key, iv, plaintext, ciphertext):
    if backend == "pydes" and len(plaintext) > 32:
        pytest.skip("pyDes is ~2,000x slower; its equivalence is proven on the short cases")
    if mode == "ECB":
        # ECB is CBC with a zero IV applied block by block.
        blocks = cu.TDES_BACKENDS[backend](key)
        enc = b"".join(blocks.encrypt(b"\0" * 8, plaintext[i : i + 8]) for i in range(0, len(plaintext), 8))
        dec = b"".join(blocks.decrypt(b"\0" * 8, ciphertext[i : i + 8]) for i in range(0, len(ciphertext), 8))
    else:
        blocks = cu.TDES_BACKENDS[backend](key)
        enc = blocks.encrypt(bytes.fromhex(iv), plaintext)
        dec = blocks.decrypt(bytes.fromhex(iv), ciphertext)
    assert enc == ciphertext if section == "ENCRYPT" else dec == plaintext


def test_cavp_single_key_vectors_are_refused_as_product_keys():
    """The KAT files use K1=K2=K3 (single DES); the product must never accept such a key."""
    degenerate = [k for (_, _, k, *_rest) in (c.values for c in TDES_CASES) if k[:8] == k[8:16]]
    assert degenerate
    for key in degenerate[:20]:
        with pytest.raises(cu.InvalidKey):
            cu.check_tdes_key(cu.set_des_parity(key))


def _rfc5869():
    return [
        r
        for r in load_nist_records(VECTORS / "cryptography_vectors" / "KDF" / "rfc-5869-HKDF-SHA256.txt")
        if "OKM" in r
    ]


@pytest.mark.parametrize("rec", _rfc5869(), ids=lambda r: f"rfc5869-{r['COUNT']}")
def test_hkdf_rfc5869(rec):
    salt = bytes.fromhex(rec["salt"]) if rec.get("salt") else None
    okm = cu.hkdf(
        bytes.fromhex(rec["IKM"]), salt=salt, info=bytes.fromhex(rec.get("info", "")), length=int(rec["L"])
    )
    assert okm.hex() == rec["OKM"]


@pytest.mark.parametrize("case", load_wycheproof("hkdf_sha256_test.json"), ids=wycheproof_id)
def test_hkdf_wycheproof(case):
    _group, t = case
    args = dict(salt=bytes.fromhex(t["salt"]), info=bytes.fromhex(t["info"]), length=t["size"])
    if t["result"] == "invalid":
        with pytest.raises(Exception):
            cu.hkdf(bytes.fromhex(t["ikm"]), **args)
    else:
        assert cu.hkdf(bytes.fromhex(t["ikm"]), **args).hex() == t["okm"]


def _rfc4231():
    return [
        r
        for r in load_nist_records(VECTORS / "cryptography_vectors" / "HMAC" / "rfc-4231-sha256.txt")
        if "MD" in r
    ]


@pytest.mark.parametrize("rec", _rfc4231(), ids=lambda r: f"rfc4231-len{r['Len']}-{r['Key'][:8]}")
def test_hmac_rfc4231(rec):
    assert cu.hmac_sha256(bytes.fromhex(rec["Key"]), bytes.fromhex(rec["Msg"])).hex() == rec["MD"]


@pytest.mark.parametrize("case", load_wycheproof("hmac_sha256_test.json"), ids=wycheproof_id)
def test_hmac_wycheproof(case):
    group, t = case
    tag = cu.hmac_sha256(bytes.fromhex(t["key"]), bytes.fromhex(t["msg"]))[: group["tagSize"] // 8]
    matches = cu.constant_time_equal(tag, bytes.fromhex(t["tag"]))
    assert matches == (t["result"] == "valid")


GCM_CASES = [
    c for c in load_wycheproof("aes_gcm_test.json") if c[0]["keySize"] == 256 and c[0]["ivSize"] == 96
]


@pytest.mark.parametrize("case", GCM_CASES, ids=wycheproof_id)
def test_aes256_gcm_wycheproof(case):
    _group, t = case
    cipher = cu.get_suite("aes256").cipher(bytes.fromhex(t["key"]))
    wire = bytes.fromhex(t["iv"] + t["ct"] + t["tag"])
    aad = bytes.fromhex(t["aad"])
    if t["result"] == "invalid":
        with pytest.raises(DecryptionFailed):
            cipher.open(wire, aad)
    else:
        assert cipher.open(wire, aad) == bytes.fromhex(t["msg"])
        assert cipher.seal(bytes.fromhex(t["msg"]), aad, nonce=bytes.fromhex(t["iv"])) == wire


@pytest.mark.parametrize("case", load_wycheproof("x25519_test.json"), ids=wycheproof_id)
def test_x25519_wycheproof(case):
    _group, t = case
    dh = DiffieHellman("x25519", private=bytes.fromhex(t["private"]))
    if t["shared"] == "00" * 32:
        with pytest.raises(InvalidPublicValue):
            dh.generate_shared_secret(bytes.fromhex(t["public"]))
    elif t["result"] == "invalid":
        with pytest.raises(InvalidPublicValue):
            dh.generate_shared_secret(bytes.fromhex(t["public"]))
    else:
        assert dh.generate_shared_secret(bytes.fromhex(t["public"])).hex() == t["shared"]


def test_x25519_rfc7748():
    recs = load_nist_records(VECTORS / "cryptography_vectors" / "asymmetric" / "X25519" / "rfc7748.txt")
    assert recs
    for rec in recs:
        dh = DiffieHellman("x25519", private=bytes.fromhex(rec["INPUT_SCALAR"]))
        assert dh.generate_shared_secret(bytes.fromhex(rec["INPUT_U"])).hex() == rec["OUTPUT_U"]


@pytest.mark.parametrize("case", load_wycheproof("ed25519_test.json"), ids=wycheproof_id)
def test_ed25519_wycheproof(case):
    group, t = case
    ok = cu.verify_signature(
        bytes.fromhex(group["publicKey"]["pk"]), bytes.fromhex(t["sig"]), bytes.fromhex(t["msg"])
    )
    assert ok == (t["result"] == "valid")


# --- the 3des suite as a whole: key split, IV, PKCS#7, HMAC over the AAD length, AAD, IV and ciphertext ---
TDES_SUITE = json.loads((VECTORS / "tdes_suite" / "tdes_suite.json").read_text())["cases"]


def test_tdes_suite_vector_file_was_read():
    assert len(TDES_SUITE) == 12 and {len(c["plaintext"]) // 2 for c in TDES_SUITE} >= {0, 7, 8, 9, 1000}


@pytest.mark.parametrize("backend", ["openssl", "pydes"])
@pytest.mark.parametrize("case", TDES_SUITE, ids=[c["id"] for c in TDES_SUITE])
def test_tdes_suite_known_answers(backend, case):
    """Computed once by an independent implementation (tests/vectors/tdes_suite/generate.py)."""
    key, iv, aad, plaintext, sealed = (
        bytes.fromhex(case[k]) for k in ("key", "iv", "aad", "plaintext", "sealed")
    )
    cipher = cu.TripleDesCbcHmac(backend=backend).cipher(key)
    assert cipher.seal(plaintext, aad, iv=iv) == sealed
    assert cipher.open(sealed, aad) == plaintext
    with pytest.raises(DecryptionFailed):
        cipher.open(sealed, aad + b"\0")
    with pytest.raises(DecryptionFailed):
        cipher.open(sealed[:8] + bytes([sealed[8] ^ 1]) + sealed[9:], aad)
