"""Known-answer tests for ML-KEM-768 (FIPS 203), run through the project's wrapper in crypto_utils.

Vectors: Project Wycheproof ``mlkem_768_test.json`` (key generation from a seed,
then decapsulation, including implicit-rejection and wrong-size cases) and
``mlkem_768_encaps_test.json`` (encapsulation keys, including keys whose
coefficients are not reduced modulo q).  Sources in tests/vectors/README.md.

``cryptography`` offers no encapsulation with a caller-chosen message ``m``, so
the encapsulation vectors check what the wrapper accepts and refuses; the
shared secrets are checked on the decapsulation side, where the vectors are
deterministic.
"""

from __future__ import annotations

import pytest
from conftest import load_wycheproof, wycheproof_id

import crypto_utils as cu
from secureim.errors import InvalidKemValue, InvalidKey

DECAPS_CASES = load_wycheproof("mlkem_768_test.json")
ENCAPS_CASES = load_wycheproof("mlkem_768_encaps_test.json")


def test_all_mlkem_vector_files_were_read():
    assert len(DECAPS_CASES) == 193 and len(ENCAPS_CASES) == 265  # tests/vectors/README.md
    assert {g["parameterSet"] for g, _t in DECAPS_CASES + ENCAPS_CASES} == {"ML-KEM-768"}


@pytest.mark.parametrize("case", DECAPS_CASES, ids=wycheproof_id)
def test_mlkem768_keygen_and_decapsulation_wycheproof(case):
    _group, t = case
    seed, ciphertext = bytes.fromhex(t["seed"]), bytes.fromhex(t["c"])
    if t["result"] == "valid":
        pair = cu.MLKEM768KeyPair(seed)
        assert pair.encapsulation_key == bytes.fromhex(t["ek"])
        assert pair.decapsulate(ciphertext) == bytes.fromhex(t["K"])  # implicit rejection included
        return
    assert t["result"] == "invalid"
    if len(seed) != cu.MLKEM768_SEED_BYTES:
        with pytest.raises(InvalidKey, match="seed is 64 bytes"):
            cu.MLKEM768KeyPair(seed)
    else:
        assert len(ciphertext) != cu.MLKEM768_CIPHERTEXT_BYTES, t["comment"]
        with pytest.raises(InvalidKemValue, match="exactly 1088 bytes"):
            cu.MLKEM768KeyPair(seed).decapsulate(ciphertext)


@pytest.mark.parametrize("case", ENCAPS_CASES, ids=wycheproof_id)
def test_mlkem768_encapsulation_key_checks_wycheproof(case):
    _group, t = case
    ek = bytes.fromhex(t["ek"])
    if t["result"] == "valid":
        secret, ciphertext = cu.mlkem768_encapsulate(ek)
        assert len(secret) == cu.MLKEM_SHARED_SECRET_BYTES and len(ciphertext) == cu.MLKEM768_CIPHERTEXT_BYTES
        return
    assert t["result"] == "invalid"
    reason = "not reduced" if len(ek) == cu.MLKEM768_ENCAPSULATION_KEY_BYTES else "exactly 1184 bytes"
    with pytest.raises(InvalidKemValue, match=reason):
        cu.mlkem768_encapsulate(ek)


def test_a_fresh_pair_round_trips_and_a_changed_ciphertext_gives_another_secret():
    pair = cu.MLKEM768KeyPair()
    secret, ciphertext = cu.mlkem768_encapsulate(pair.encapsulation_key)
    assert pair.decapsulate(ciphertext) == secret
    damaged = bytes([ciphertext[0] ^ 1]) + ciphertext[1:]
    assert pair.decapsulate(damaged) != secret  # implicit rejection: no error, an unrelated secret
