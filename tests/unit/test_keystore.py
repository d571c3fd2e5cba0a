"""The keystores of the previous version open with today's code (tests/fixtures/upgrade_v1).

The identity files, prekey stores and histories in the fixture's homes were written by the
main branch before the package refactor (363793f), before crypto_utils.PasswordSeal existed.
Each is opened here with the new reader (copies: the stores write), with the right password
and with a wrong one; then written again by the new code and opened again, and also by the
previous version's reader, reproduced below, so a downgrade loses nothing either.
"""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

import crypto_utils as cu
from secureim.client import history as H
from secureim.e2e import prekeys as K
from secureim.e2e import sessions as e2e
from secureim.errors import HistoryLocked
from secureim.server.rooms import RoomKeyring
from secureim.server.store_forward import Mailbox

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "upgrade_v1"
MANIFEST = json.loads((FIXTURE / "manifest.json").read_text())
SERVICE_ID = MANIFEST["service_id"]  # 127.0.0.1:47651; file names use _ for @ and :
PASSWORDS: dict[str, str] = MANIFEST["passwords"]
USERS = MANIFEST["usernames"]
VARIANT = MANIFEST["variants"]["sqlite"]


@pytest.fixture
def homes(tmp_path: Path) -> Path:
    shutil.copytree(FIXTURE / "sqlite" / "homes", tmp_path / "homes")
    return tmp_path / "homes"


def _public_b64(key: Ed25519PrivateKey) -> str:
    return base64.b64encode(cu.public_bytes(key)).decode()


# --- the previous version's readers (363793f), kept to prove new files still open there ----
def _old_kek(password: str, salt: bytes) -> bytes:
    return Scrypt(salt=salt, length=32, n=2**15, r=8, p=1).derive(password.encode("utf-8"))


def _old_identity_load(path: Path, username: str, password: str) -> bytes:
    doc = json.loads(path.read_text())
    assert doc["format"] == 1 and doc["kdf"] == "scrypt"
    public = base64.b64decode(doc["public"])
    kek = _old_kek(password, base64.b64decode(doc["salt"]))
    seed = AESGCM(kek).decrypt(
        base64.b64decode(doc["nonce"]), base64.b64decode(doc["sealed"]), username.encode() + public
    )
    return cu.public_bytes(Ed25519PrivateKey.from_private_bytes(seed))


def _old_prekeys_load(path: Path, username: str, password: str) -> dict:
    doc = json.loads(path.read_text())
    assert doc["format"] == 1
    kek = _old_kek(password, base64.b64decode(doc["salt"]))
    aad = b"secureim/v1 prekey store" + username.encode()
    return json.loads(
        AESGCM(kek).decrypt(base64.b64decode(doc["nonce"]), base64.b64decode(doc["sealed"]), aad)
    )


# --- identity -------------------------------------------------------------------------
@pytest.mark.parametrize("user", USERS)
def test_the_fixture_identity_opens_with_its_password_and_not_another(homes: Path, user: str) -> None:
    store = e2e.IdentityStore(homes / user, SERVICE_ID)
    assert store.path(user).name == f"{user}_127.0.0.1_47651.json" and store.path(user).exists()
    key = store.load(user, PASSWORDS[user])
    assert key is not None
    assert _public_b64(key) == VARIANT["users"][user]["identity_key_b64"]
    assert cu.fingerprint(cu.public_bytes(key)) == VARIANT["users"][user]["identity_fingerprint"]
    assert store.load(user, PASSWORDS[user] + "x") is None
    assert store.load(user, "") is None


def test_an_identity_file_is_bound_to_its_username(homes: Path) -> None:
    """The username is in the associated data: alice's file renamed to mallory's does not open."""
    store = e2e.IdentityStore(homes / "alice", SERVICE_ID)
    shutil.copy(store.path("alice"), store.path("mallory"))
    assert store.load("mallory", PASSWORDS["alice"]) is None


def test_an_identity_written_again_opens_here_and_with_the_previous_reader(homes: Path) -> None:
    store = e2e.IdentityStore(homes / "bob", SERVICE_ID)
    key = store.load("bob", PASSWORDS["bob"])
    assert key is not None
    store.save("bob", PASSWORDS["bob"], key)
    doc = json.loads(store.path("bob").read_text())
    assert (doc["format"], doc["kdf"], doc["n"], doc["r"], doc["p"]) == (1, "scrypt", 2**15, 8, 1)
    assert (store.path("bob").stat().st_mode & 0o777) == 0o600
    reopened = store.load("bob", PASSWORDS["bob"])
    assert reopened is not None and _public_b64(reopened) == VARIANT["users"]["bob"]["identity_key_b64"]
    assert (
        base64.b64encode(_old_identity_load(store.path("bob"), "bob", PASSWORDS["bob"])).decode()
        == (VARIANT["users"]["bob"]["identity_key_b64"])
    )


# --- prekey stores ------------------------------------------------------------------------
@pytest.mark.parametrize("user", USERS)
def test_the_fixture_prekey_store_opens_and_holds_the_room(homes: Path, user: str) -> None:
    doc = json.loads((homes / user / "prekeys" / f"{user}_127.0.0.1_47651.json").read_text())
    assert "n" not in doc  # written before the parameters were recorded: the reader's defaults
    store = K.PrekeyStore(homes / user, user, SERVICE_ID, PASSWORDS[user])
    assert not store.created
    assert store.current_signed() is not None and store.one_time
    room = VARIANT["room"]
    assert list(store.rooms) == [room["name"]]
    state = store.rooms[room["name"]]
    assert state["epoch"] == room["epoch"] == VARIANT["users"][user]["room_epoch_seen"]
    assert base64.b64decode(state["uid"]).hex() == room["uid_hex"]
    assert state["admin"] == room["admin"]
    if user == MANIFEST["offline_user"]:
        assert store.inbound  # the offline session alice started for the queued messages


@pytest.mark.parametrize("user", USERS)
def test_the_fixture_prekey_store_does_not_open_with_another_password(homes: Path, user: str) -> None:
    store = K.PrekeyStore(homes / user, user, SERVICE_ID, PASSWORDS[user] + "x")
    assert store.created and not store.signed and not store.rooms


def test_a_prekey_store_written_again_records_its_parameters_and_opens_in_both_versions(homes: Path) -> None:
    store = K.PrekeyStore(homes / "carol", "carol", SERVICE_ID, PASSWORDS["carol"])
    one_time = dict(store.one_time)
    store.save()
    doc = json.loads(store.path.read_text())
    assert (doc["format"], doc["n"], doc["r"], doc["p"]) == (1, 2**15, 8, 1)
    again = K.PrekeyStore(homes / "carol", "carol", SERVICE_ID, PASSWORDS["carol"])
    assert not again.created and again.one_time == one_time and again.rooms == store.rooms
    old = _old_prekeys_load(store.path, "carol", PASSWORDS["carol"])
    assert {int(k) for k in old["one_time"]} == set(one_time)


# --- histories ------------------------------------------------------------------------------
@pytest.mark.parametrize("user", sorted(VARIANT["history"]))
def test_the_fixture_history_opens_and_lists_the_conversations(homes: Path, user: str) -> None:
    history = H.History.open(homes / user, user, SERVICE_ID, PASSWORDS[user], max_age_days=10**6)
    try:
        for peer, expected in VARIANT["history"][user].items():
            page = history.last(peer)
            assert page.damaged == 0
            got = [{"direction": e.direction, "text": e.text, "state": e.state} for e in page.entries]
            assert got == expected
    finally:
        history.close()


@pytest.mark.parametrize("user", sorted(VARIANT["history"]))
def test_the_fixture_history_does_not_open_with_another_password(homes: Path, user: str) -> None:
    with pytest.raises(HistoryLocked):
        H.History.open(homes / user, user, SERVICE_ID, PASSWORDS[user] + "x", max_age_days=10**6)


def test_a_history_sealed_again_opens_with_the_new_password_and_keeps_its_rows(homes: Path) -> None:
    history = H.History.open(homes / "alice", "alice", SERVICE_ID, PASSWORDS["alice"], max_age_days=10**6)
    history.change_password("a new password")
    history.close()
    with pytest.raises(HistoryLocked):
        H.History.open(homes / "alice", "alice", SERVICE_ID, PASSWORDS["alice"], max_age_days=10**6)
    history = H.History.open(homes / "alice", "alice", SERVICE_ID, "a new password", max_age_days=10**6)
    try:
        assert [e.text for e in history.last("bob").entries] == [
            m["text"] for m in VARIANT["history"]["alice"]["bob"]
        ]
    finally:
        history.close()


# --- the server's sealed keys (SealedBox, byte-identical) ----------------------------------
def test_the_servers_stored_kdc_and_room_keys_open_with_the_sealed_box() -> None:
    """The rows the previous server sealed (offline KDC keys, room keys) open with today's box and AAD."""
    ticket_key = (FIXTURE / "sqlite" / "server" / "ticket.key").read_bytes()
    db = sqlite3.connect(f"file:{FIXTURE / 'sqlite' / 'server' / 'secureim.db'}?mode=ro", uri=True)
    try:
        offline = db.execute(
            "SELECT recipient, conversation_id, generation, wrapped FROM offline_keys"
        ).fetchall()
        rooms = db.execute("SELECT room_id, epoch, wrapped FROM room_keys").fetchall()
    finally:
        db.close()
    assert offline and rooms
    box = cu.SealedBox(
        cu.hkdf(ticket_key, salt=None, info=cu.label("offline kdc keys at rest"), length=32),
        "offline kdc key",
    )
    for recipient, cid, generation, wrapped in offline:
        aad = Mailbox._wrap_aad(None, recipient, cid, generation)  # type: ignore[arg-type]
        assert len(box.open(wrapped, aad)) in (cu.Aes256Gcm.key_bytes, cu.TripleDesCbcHmac.key_bytes)
        with pytest.raises(cu.DecryptionFailed):
            box.open(wrapped, Mailbox._wrap_aad(None, recipient + "x", cid, generation))  # type: ignore[arg-type]
    room_key = cu.hkdf(ticket_key, salt=None, info=cu.label("room kdc keys at rest"), length=32)
    room_box = cu.SealedBox(room_key, "room kdc key")
    opened = 0
    for room_id, epoch, wrapped in rooms:
        # the previous server's own reader (363793f room_service.py), for comparison
        old_aad = b"secureim/v1 room kdc key" + room_id.to_bytes(8, "big") + epoch.to_bytes(4, "big")
        try:
            old = AESGCM(room_key).decrypt(wrapped[:12], wrapped[12:], old_aad)
        except InvalidTag:
            old = None
        try:
            new = room_box.open(wrapped, RoomKeyring._room_aad(room_id, epoch))
        except cu.DecryptionFailed:
            new = None
        assert new == old
        opened += new is not None
        with pytest.raises(cu.DecryptionFailed):
            room_box.open(wrapped, RoomKeyring._room_aad(room_id, epoch + 1))
    assert opened >= 2  # the epochs the fixture's messages use (2 and 3)
