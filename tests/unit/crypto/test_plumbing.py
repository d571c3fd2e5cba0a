"""The security plumbing in crypto_utils: one sealed box, one private atomic write, one keystore.

tests/mutations/catalog_plumbing.py switches each defence off; the tests named there fail.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import crypto_utils as cu
from secureim.e2e import datagrams as direct
from secureim.errors import CryptoError, DecryptionFailed, InvalidCredentials
from secureim.server.tickets import TicketIssuer, load_or_create_ticket_key

KEY = bytes(range(32))


# --- SealedBox ------------------------------------------------------------------------------
def test_the_sealed_box_layout_is_nonce_then_aes_gcm_under_label_and_extra_aad() -> None:
    sealed = cu.SealedBox(KEY, "room kdc key").seal(b"secret", b"\x01\x02")
    nonce = sealed[: cu.SEALED_BOX_NONCE_BYTES]
    assert len(sealed) == len(b"secret") + cu.SEALED_BOX_OVERHEAD and cu.SEALED_BOX_NONCE_BYTES == 12
    assert AESGCM(KEY).decrypt(nonce, sealed[len(nonce) :], b"secureim/v1 room kdc key\x01\x02") == b"secret"
    # and what the previous code sealed by hand opens with the box (raw-bytes label too)
    old = nonce + AESGCM(KEY).encrypt(nonce, b"x", b"secureim/v1 history row\x00owner")
    assert cu.SealedBox(KEY, b"secureim/v1 history row\x00").open(old, b"owner") == b"x"
    assert cu.SealedBox(KEY, "history row\x00").open(old, b"owner") == b"x"


def test_the_sealed_box_binds_its_label() -> None:
    sealed = cu.SealedBox(KEY, "offline kdc key").seal(b"k", b"bob")
    assert cu.SealedBox(KEY, "offline kdc key").open(sealed, b"bob") == b"k"
    with pytest.raises(DecryptionFailed):
        cu.SealedBox(KEY, "room kdc key").open(sealed, b"bob")
    with pytest.raises(DecryptionFailed):
        cu.SealedBox(KEY, "offline kdc key").open(sealed, b"carol")


def test_the_sealed_box_fails_closed() -> None:
    box = cu.SealedBox(KEY, "ticket")
    sealed = bytearray(box.seal(b"plaintext"))
    for i in (0, cu.SEALED_BOX_NONCE_BYTES, len(sealed) - 1):
        bad = bytearray(sealed)
        bad[i] ^= 1
        with pytest.raises(DecryptionFailed):
            box.open(bytes(bad))
    for short in (b"", bytes(cu.SEALED_BOX_OVERHEAD - 1)):
        with pytest.raises(DecryptionFailed):
            box.open(short)
    with pytest.raises(DecryptionFailed):
        cu.SealedBox(bytes(32), "ticket").open(bytes(sealed))


def test_tickets_sealed_by_the_previous_code_still_redeem() -> None:
    """Resumption and direct-mode tickets: nonce || AES-GCM(key, nonce, plain, "secureim/v1 ...")."""
    issuer = TicketIssuer(KEY, clock=lambda: 1000.0)
    plain = AESGCM(KEY).decrypt(*_split(issuer.issue("alice", b"I" * 32, 7)), b"secureim/v1 ticket")
    nonce = bytes(12)
    old = nonce + AESGCM(KEY).encrypt(nonce, plain, b"secureim/v1 ticket")
    assert issuer.redeem_with_epoch(old, b"I" * 32) == ("alice", 7)
    with pytest.raises(InvalidCredentials):
        issuer.redeem(old[:-1] + bytes([old[-1] ^ 1]), b"I" * 32)
    t = direct.seal_ticket(KEY, initiator="alice", host="h", port=1, conversation_id=3, now_s=1000)
    plain = AESGCM(KEY).decrypt(*_split(t), b"secureim/v1 direct ticket")
    old = nonce + AESGCM(KEY).encrypt(nonce, plain, b"secureim/v1 direct ticket")
    assert direct.open_ticket(KEY, old, now_s=1001).initiator == "alice"


def _split(sealed: bytes) -> tuple[bytes, bytes]:
    return sealed[:12], sealed[12:]


# --- write_private_file -------------------------------------------------------------------
@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What os.fsync was called on: 'file' or 'dir', in order."""
    seen: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        seen.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_a_private_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        cu.write_private_file(tmp_path / "a", b"one")
        cu.write_private_file(tmp_path / "k", b"key", exclusive=True)
    finally:
        os.umask(old)
    for name in ("a", "k"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    (tmp_path / "b").write_bytes(b"old")
    (tmp_path / "b").chmod(0o644)
    cu.write_private_file(tmp_path / "b", b"new")
    assert (tmp_path / "b").read_bytes() == b"new" and stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "k"]  # no temporary file left


def test_a_private_file_is_fsynced_before_the_rename(tmp_path: Path, fsyncs: list[str]) -> None:
    cu.write_private_file(tmp_path / "f", b"data")
    assert fsyncs[:1] == ["file"]


def test_the_folder_is_fsynced_after_the_rename(tmp_path: Path, fsyncs: list[str]) -> None:
    cu.write_private_file(tmp_path / "f", b"data")
    cu.write_private_file(tmp_path / "g", b"data", exclusive=True)
    assert fsyncs == ["file", "dir", "file", "dir"]


def test_an_exclusive_write_never_replaces_a_file(tmp_path: Path) -> None:
    cu.write_private_file(tmp_path / "key", b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        cu.write_private_file(tmp_path / "key", b"second", exclusive=True)
    assert (tmp_path / "key").read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["key"]


def _no_hard_links(monkeypatch: pytest.MonkeyPatch) -> None:
    def link(src: object, dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")  # vfat, some SMB and FUSE volumes

    monkeypatch.setattr(os, "link", link)


def test_without_hard_links_an_exclusive_write_still_creates_a_private_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_hard_links(monkeypatch)
    old = os.umask(0)
    try:
        cu.write_private_file(tmp_path / "key", b"first", exclusive=True)
    finally:
        os.umask(old)
    assert (tmp_path / "key").read_bytes() == b"first"
    assert stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["key"]  # no temporary left behind


def test_without_hard_links_an_exclusive_write_still_never_replaces_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_hard_links(monkeypatch)
    cu.write_private_file(tmp_path / "key", b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        cu.write_private_file(tmp_path / "key", b"second", exclusive=True)
    assert (tmp_path / "key").read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["key"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "f").write_bytes(b"old")

    def broken(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        cu.write_private_file(tmp_path / "f", b"new")
    assert (tmp_path / "f").read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f"]


def test_key_files_are_created_once_and_fsynced(tmp_path: Path, fsyncs: list[str]) -> None:
    key = load_or_create_ticket_key(tmp_path)
    assert load_or_create_ticket_key(tmp_path) == key and fsyncs == ["file", "dir"]
    identity = cu.load_or_create_identity(tmp_path / "id" / "identity.key")
    assert cu.public_bytes(cu.load_identity(tmp_path / "id" / "identity.key")) == cu.public_bytes(identity)
    assert stat.S_IMODE((tmp_path / "ticket.key").stat().st_mode) == 0o600


# --- PasswordSeal -------------------------------------------------------------------------------
FAST = cu.ScryptParams(n=2**4, r=1, p=1)


def test_the_envelope_records_salt_and_parameters() -> None:
    env = cu.PasswordSeal("pw", params=FAST).seal(b"data", b"aad")
    assert set(env) == {"kdf", "n", "r", "p", "salt", "cipher", "nonce", "sealed"}
    assert (env["kdf"], env["n"], env["r"], env["p"], env["cipher"]) == ("scrypt", 16, 1, 1, "aes-256-gcm")
    json.dumps(env)  # JSON as it is


def test_the_reader_uses_the_parameters_in_the_file() -> None:
    env = cu.PasswordSeal("pw", params=FAST).seal(b"data", b"aad")
    assert cu.open_with_password(env, "pw", b"aad") == b"data"
    assert cu.PasswordSeal.for_envelope(env, "pw").params == FAST


def test_an_envelope_without_parameters_used_the_defaults() -> None:
    env = cu.seal_with_password("pw", b"data", b"aad")
    del env["n"], env["r"], env["p"]  # the prekey stores written before they were recorded
    assert cu.open_with_password(env, "pw", b"aad") == b"data"


def test_a_wrong_password_or_associated_data_fails_closed() -> None:
    env = cu.PasswordSeal("pw", params=FAST).seal(b"data", b"aad")
    with pytest.raises(DecryptionFailed):
        cu.open_with_password(env, "other", b"aad")
    with pytest.raises(DecryptionFailed):
        cu.open_with_password(env, "pw", b"other")
    with pytest.raises(DecryptionFailed):
        cu.open_with_password({**env, "sealed": cu.b64encode(b"\x00" * 20)}, "pw", b"aad")


@pytest.mark.parametrize(
    "change",
    [
        {"n": 2**21},  # 2 GiB
        {"n": 2**20, "r": 16},  # within each bound, over the memory bound
        {"p": 10**6},
        {"n": 1000},  # not a power of two
        {"n": "16"},
        {"kdf": "pbkdf2"},
        {"cipher": "chacha20"},
    ],
)
def test_parameters_out_of_bounds_are_refused_before_scrypt_runs(monkeypatch, change: dict) -> None:
    env = cu.PasswordSeal("pw", params=FAST).seal(b"data", b"aad")

    def no_scrypt(*args, **kwargs):
        raise AssertionError("scrypt ran with parameters the file chose")

    monkeypatch.setattr(cu, "Scrypt", no_scrypt)
    with pytest.raises(CryptoError) as exc:
        cu.open_with_password({**env, **change}, "pw", b"aad")
    assert not isinstance(exc.value, DecryptionFailed)
