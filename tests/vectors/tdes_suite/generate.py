"""Generates tdes_suite.json: known answers for the whole 3des suite, from an independent implementation.

The suite under test (crypto_utils.TripleDesCbcHmacCipher) seals as

    IV (8) || 3DES-CBC(key1|key2|key3, IV, PKCS#7(plaintext)) || HMAC-SHA256(mac_key, len(aad) (8, big-endian) || aad || IV || ct)

This script computes the same layout with none of the project's code: Triple-DES from
pyDes (Todd Whitman's pure-Python DES), PKCS#7 padding and DES key parity written out
here, HMAC-SHA256 from Python's standard library.  It was run once; its output is
committed next to it, and tests/test_vectors.py checks the suite against that file.

    python tests/vectors/tdes_suite/generate.py > tests/vectors/tdes_suite/tdes_suite.json

Inputs are derived from SHA-256 of fixed labels, so a rerun produces the same file.
"""

import hashlib
import hmac
import json
from importlib.metadata import version

import pyDes


def det(label: str, n: int) -> bytes:
    out = b""
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"secureim 3des suite vector {label} {counter}".encode()).digest()
        counter += 1
    return out[:n]


def odd_parity(key: bytes) -> bytes:
    # Each byte's low bit makes the number of one bits odd (FIPS 46-3).
    return bytes((b & 0xFE) | ((bin(b & 0xFE).count("1") + 1) % 2) for b in key)


def pkcs7(data: bytes, block: int = 8) -> bytes:
    n = block - len(data) % block
    return data + bytes([n]) * n


def seal(key: bytes, iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
    tdes_key, mac_key = key[:24], key[24:]
    ct = pyDes.triple_des(tdes_key, pyDes.CBC, iv, pad=None, padmode=pyDes.PAD_NORMAL).encrypt(pkcs7(plaintext))
    tag = hmac.new(mac_key, len(aad).to_bytes(8, "big") + aad + iv + ct, hashlib.sha256).digest()
    return iv + ct + tag


def main() -> None:
    cases = []
    plaintext_lengths = [0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 100, 1000]
    aads = [b"", b"x", b"secureim/v1 record" + (7).to_bytes(8, "big"), det("aad", 40)]
    for i, n in enumerate(plaintext_lengths):
        key = odd_parity(det(f"key {i}", 24)) + det(f"mac key {i}", 32)
        iv = det(f"iv {i}", 8)
        plaintext = det(f"plaintext {i}", n)
        aad = aads[i % len(aads)]
        cases.append({"id": f"len{n}-aad{len(aad)}", "key": key.hex(), "iv": iv.hex(), "aad": aad.hex(),
                      "plaintext": plaintext.hex(), "sealed": seal(key, iv, plaintext, aad).hex()})
    doc = {"source": "tests/vectors/tdes_suite/generate.py: pyDes " + version("pyDes")
           + " (Triple-DES-CBC), PKCS#7 and parity written out, HMAC-SHA256 from Python's hmac module",
           "layout": "IV(8) || 3DES-CBC(PKCS#7(plaintext)) || HMAC-SHA256(mac_key, len(aad) u64be || aad || IV || ct)",
           "cases": cases}
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
