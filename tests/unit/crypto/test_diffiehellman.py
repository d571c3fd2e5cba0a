"""diffiehellman: the group allowlist, parameters from the RFCs, and every bad public value."""

from __future__ import annotations

import json

import pytest
from conftest import VECTORS, load_nist_records

from diffiehellman import GROUPS, DiffieHellman, FiniteFieldGroup, get_group
from secureim.errors import InvalidPublicValue, UnsupportedGroup

FF_GROUPS = [name for name, g in GROUPS.items() if isinstance(g, FiniteFieldGroup)]


def test_modp_groups_match_rfc3526_file():
    recs = load_nist_records(VECTORS / "cryptography_vectors" / "asymmetric" / "DH" / "rfc3526.txt")
    by_bits = {int(r["P"], 16).bit_length(): int(r["P"], 16) for r in recs}
    for name, bits in (("modp2048", 2048), ("modp3072", 3072), ("modp4096", 4096)):
        assert GROUPS[name].p == by_bits[bits]
        assert GROUPS[name].g == 2


def test_groups_match_groups_json():
    data = json.loads((VECTORS / "groups.json").read_text())
    for entry in data["groups"]:
        assert GROUPS[entry["name"]].p == int(entry["p_hex"], 16)


def test_no_group_below_2048_bits():
    assert all(g.bits >= 2048 for g in GROUPS.values() if isinstance(g, FiniteFieldGroup))


@pytest.mark.parametrize(
    "name",
    [
        "modp1024",
        "modp1536",
        "ffdhe1024",
        "dh512",
        "X25519",
        "x448",
        "",
        "x25519\x00",
        "modp2048 ",
        "secp256r1",
        "ffdhe8192",
        None,
        14,
    ],
)
def test_groups_not_on_allowlist_are_refused(name):
    with pytest.raises(UnsupportedGroup):
        get_group(name)
    with pytest.raises(UnsupportedGroup):
        DiffieHellman(name)


@pytest.mark.parametrize("name", list(GROUPS))
def test_agreement(name):
    a = DiffieHellman(name)
    answer, secret = DiffieHellman.respond(name, a.public_bytes)  # the server's side, any group
    assert a.generate_shared_secret(answer) == secret
    assert len(a.public_bytes) == GROUPS[name].byte_length


@pytest.mark.parametrize("name", ["ffdhe2048", "modp2048"])
def test_short_exponents_have_the_documented_size(name):
    dh = DiffieHellman(name)
    assert dh._exponent.bit_length() == GROUPS[name].exponent_bits >= 225  # RFC 7919 A.1 minimum


def _smallest_non_residue(group: FiniteFieldGroup) -> int:
    return next(k for k in range(3, 1000) if pow(k, group.q, group.p) != 1)


def _bad_values(group: FiniteFieldGroup):
    p = group.p
    return {
        "zero": 0,
        "one": 1,
        "p-1": p - 1,
        "p": p,
        "p+1": p + 1,
        "p-2 (not in subgroup)": p - 2,
        "smallest non-residue": _smallest_non_residue(group),
        "2 (too few bits set)": 2,
        "2^k (too few bits set)": 1 << 100,
    }


@pytest.mark.parametrize("name", FF_GROUPS)
def test_bad_public_values_refused(name):
    group = GROUPS[name]
    dh = DiffieHellman(name)
    for label, y in _bad_values(group).items():
        raw = y.to_bytes(group.byte_length + 1, "big")
        raw = raw[1:] if raw[0] == 0 else raw  # p+1 does not fit: stays too long
        with pytest.raises(InvalidPublicValue):
            dh.generate_shared_secret(raw)
        assert dh.shared_secret is None, label


def test_range_check_is_what_refuses_0_1_p_minus_1_and_p():
    """Refused by the range check itself (RFC 7919 section 5.1), before the subgroup and
    bit-count checks, which would catch most of these too: each check is proven on its own."""
    group = GROUPS["ffdhe2048"]
    for y in (0, 1, group.p - 1, group.p):
        with pytest.raises(InvalidPublicValue, match="out of range"):
            DiffieHellman("ffdhe2048").generate_shared_secret(y.to_bytes(256, "big"))


def test_subgroup_check_is_what_refuses_non_residues():
    group = GROUPS["ffdhe2048"]
    for y in (_smallest_non_residue(group), group.p - 2):  # outside the order-q subgroup
        with pytest.raises(InvalidPublicValue, match="subgroup"):
            DiffieHellman("ffdhe2048").generate_shared_secret(y.to_bytes(256, "big"))


@pytest.mark.parametrize("name", list(GROUPS))
def test_wrong_length_refused(name):
    dh = DiffieHellman(name)
    good = DiffieHellman(name).public_bytes
    for raw in (b"", good[:-1], good + b"\0", b"\0" + good):
        with pytest.raises(InvalidPublicValue):
            dh.generate_shared_secret(raw)


def test_x25519_low_order_points_refused():
    dh = DiffieHellman("x25519")
    for point in (b"\0" * 32, (1).to_bytes(32, "little")):
        with pytest.raises(InvalidPublicValue, match="all-zero"):
            dh.generate_shared_secret(point)


def test_hash_key_verifies_in_constant_time_api():
    digest = DiffieHellman.hash_key(b"k" * 32, b"nonce")
    assert len(digest) == 64
    assert DiffieHellman.verify_hashed_key(b"k" * 32, digest, b"nonce")
    assert not DiffieHellman.verify_hashed_key(b"k" * 32, digest, b"nonce2")
    assert not DiffieHellman.verify_hashed_key(b"j" * 32, digest, b"nonce")
    assert not DiffieHellman.verify_hashed_key(b"k" * 32, digest[:-1], b"nonce")
