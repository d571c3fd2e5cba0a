"""Upgrade test: the code of today opens tests/fixtures/upgrade_v1 (written by the release
before the package and before schema versions, see its README.md) and nothing is lost.

Every part of the fixture is opened, for both variants (the SQLite server folder, and the
MariaDB dump loaded into a fresh database):

- the server's storage: the users and their identity keys, the room (#team, its admin, members,
  epoch and head), the rows queued for carol;
- each home: the pinned server key (known_servers), the identity key (sealed), the pinned peer
  keys, the prekey store (sealed; it holds the room state) and the encrypted history;
- a real server on a copy of the server folder: every user logs in with their password, carol
  gets her two stored messages and the stored room message, alice and bob find their history,
  and new live messages (pairwise and in the room) still go through with no key warning.

The server's databases come from before schema versions (no schema_version table): opening
them runs the migrations (secureim/storage/migrations), which must keep every row and leave the
database at the latest version, stamped with one row per migration; on MariaDB the stored
procedures of migration 0001 are all there afterwards.  The fixture is found next to this file
(tests/fixtures/upgrade_v1) or at $SECUREIM_UPGRADE_FIXTURE.

The fixture ages: the server drops stored messages after --queue-max-days (30), a client refuses
a stored message older than prekeys.STORED_MAX_AGE_S (45 days) and drops retired prekeys after
RETIRED_PREKEY_KEEP_S, and the history prunes rows older than history_max_age_days (365).  These
bounds are raised here (``_timeless``) so that the test means the same in five years; the
``aged`` case runs everything with the clock ~2 years ahead to prove it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import time
from contextlib import closing
from pathlib import Path

import pytest
from db_fixtures import MYSQL_HOST, MYSQL_PORT, MYSQL_USER, mysql_admin, mysql_url
from server_fixtures import running_server

import crypto_utils as cu
import database
from secureim import client as C
from secureim.client import history as H
from secureim.e2e import prekeys as K
from secureim.e2e import sessions as e2e
from secureim.storage import migrations

FIXTURE = Path(
    os.environ.get(
        "SECUREIM_UPGRADE_FIXTURE", Path(__file__).resolve().parents[2] / "fixtures" / "upgrade_v1"
    )
)
MANIFEST = (
    json.loads((FIXTURE / "manifest.json").read_text()) if (FIXTURE / "manifest.json").exists() else None
)
TIMEOUT_S = 20.0
FOREVER_S = 100 * 365 * 86400.0
AGED_S = 800 * 86400.0  # the 'aged' case: the clock this far past the fixture's making

pytestmark = pytest.mark.skipif(MANIFEST is None, reason=f"no upgrade fixture at {FIXTURE}")


WARNINGS = (C.SecurityWarning, C.RoomWarning, C.HistoryUnavailable, C.MessageRejected)


# -- helpers ------------------------------------------------------------------------------------
class Events:
    """Take a client's events in order; whatever is skipped is kept, to check for warnings."""

    def __init__(self, client):
        self.client, self.skipped = client, []

    def wait(self, kind, timeout: float = TIMEOUT_S, **fields):
        deadline = time.monotonic() + timeout
        while True:
            event = self.client.next_event(timeout=max(0.0, deadline - time.monotonic()))
            if event is None:
                raise AssertionError(
                    f"{self.client.username}: no {kind.__name__} {fields} in {timeout}s; saw {self.skipped}"
                )
            if isinstance(event, kind) and all(getattr(event, k) == v for k, v in fields.items()):
                return event
            self.skipped.append(event)
            if isinstance(event, WARNINGS):  # something was lost or refused: say so now, not at the timeout
                raise AssertionError(f"{self.client.username}: {event}")

    def warnings(self):
        return [e for e in self.skipped if isinstance(e, WARNINGS)]


def _timeless(monkeypatch, age_s: float = 0.0) -> None:
    """Raise the bounds that age a stored message or prekey (module docstring); ``age_s`` moves
    the clock of everything in this process (server and clients) that far ahead."""
    monkeypatch.setattr(K, "STORED_MAX_AGE_S", FOREVER_S)
    monkeypatch.setattr(K, "RETIRED_PREKEY_KEEP_S", FOREVER_S)
    if age_s:
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + age_s)


def _copy_variant(variant: str, tmp_path: Path) -> Path:
    """A private copy of one variant (nothing in the fixture is ever written to); the key files
    get back the 0600 that git does not keep (the server refuses them otherwise)."""
    root = tmp_path / variant
    shutil.copytree(FIXTURE / variant, root)
    for rel in MANIFEST["layout"]["modes_to_restore"]:
        (root / rel).chmod(0o600)
    for home in (root / "homes").iterdir():
        home.chmod(0o700)
    return root


def _load_mariadb_dump(name: str) -> None:
    tool = shutil.which("mysql") or shutil.which("mariadb")
    if tool is None:
        if os.environ.get("REQUIRE_MYSQL") == "1":
            pytest.fail("REQUIRE_MYSQL=1 but there is no mysql client to load the dump")
        pytest.skip("no mysql client to load the dump")
    with open(FIXTURE / MANIFEST["layout"]["mariadb_dump"], "rb") as dump:
        subprocess.run(
            [
                tool,
                f"--host={MYSQL_HOST}",
                f"--port={MYSQL_PORT}",
                f"--user={MYSQL_USER}",
                "--default-character-set=utf8mb4",
                name,
            ],
            stdin=dump,
            check=True,
            timeout=120,
            capture_output=True,
        )


@pytest.fixture(params=["sqlite", "mariadb"])
def upgraded(request, tmp_path, monkeypatch):
    """(variant name, its manifest part, its copied folder, the database URL for the server)."""
    variant = request.param
    _timeless(monkeypatch)
    root = _copy_variant(variant, tmp_path)
    if variant == "sqlite":
        yield variant, MANIFEST["variants"][variant], root, None
        return
    admin = mysql_admin()
    name = f"secureim_test_{os.urandom(6).hex()}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    try:
        _load_mariadb_dump(name)
        yield variant, MANIFEST["variants"][variant], root, mysql_url(name)
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


def _port_free(port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind((MANIFEST["host"], port))
        except OSError as exc:
            pytest.fail(f"the fixture's port {port} is busy ({exc}): the homes are keyed by it")


def _backend(variant: str) -> str:
    return "sqlite" if variant == "sqlite" else "mysql"


def _version_rows(variant: str, root: Path, url: str | None) -> list[int] | None:
    """The versions in the server database's schema_version table; None if it has no such table."""
    if variant == "sqlite":
        with closing(sqlite3.connect(root / "server" / "secureim.db")) as conn:
            if not conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
            ).fetchone():
                return None
            return [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")]
    assert url is not None
    name = url.rsplit("/", 1)[1]
    admin = mysql_admin()
    try:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'schema_version'",
                (name,),
            )
            if not cur.fetchall():
                return None
            cur.execute(f"SELECT version FROM `{name}`.schema_version ORDER BY version")
            return [r[0] for r in cur.fetchall()]
    finally:
        admin.close()


def _procedures(url: str) -> set[str]:
    name = url.rsplit("/", 1)[1]
    admin = mysql_admin()
    try:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT ROUTINE_NAME FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = %s", (name,)
            )
            return {r[0] for r in cur.fetchall()}
    finally:
        admin.close()


def _assert_migrated(variant: str, root: Path, url: str | None) -> None:
    """At the latest schema version, one row per migration; on MariaDB every procedure there."""
    backend = _backend(variant)
    latest = migrations.latest(backend)
    assert _version_rows(variant, root, url) == list(range(1, latest + 1))
    if url is not None:
        wanted = set()
        for migration in migrations.migrations(backend):
            for stmt in database.split_sql_script(migration.sql()):
                if stmt.startswith("CREATE PROCEDURE "):
                    wanted.add(stmt.split()[2].split("(")[0])
        assert wanted and wanted <= _procedures(url), wanted - _procedures(url)


def _client(home: Path, user: str) -> tuple[C.ChatClient, Events]:
    client = C.ChatClient(
        MANIFEST["host"], MANIFEST["port"], home=home, history=True, history_max_age_days=FOREVER_S / 86400
    )
    hello = client.connect()
    assert hello is not None
    client.login(user, MANIFEST["passwords"][user])
    client.start()
    return client, Events(client)


# -- the files, opened without a server -----------------------------------------------------------
def test_every_file_of_every_home_opens_with_its_password(upgraded):
    variant, v, root, _url = upgraded
    service = MANIFEST["service_id"]
    for user in MANIFEST["usernames"]:
        home, password = root / "homes" / user, MANIFEST["passwords"][user]
        # The pinned server key.
        pinned = C.KnownServers(home).lookup(service)
        assert pinned is not None and cu.b64encode(pinned) == v["server_public_key_b64"]
        assert cu.fingerprint(pinned) == v["server_fingerprint"]
        # The identity key, sealed under the password (and not opened by another).
        identity = e2e.IdentityStore(home, service).load(user, password)
        assert identity is not None, f"{variant}: {user}'s identity key did not open"
        assert cu.b64encode(cu.public_bytes(identity)) == v["users"][user]["identity_key_b64"]
        assert e2e.IdentityStore(home, service).load(user, password + "x") is None
        # The peers pinned: everyone this user has talked to, with the key the manifest names.
        trust = e2e.PeerTrust(home, user, service)
        for peer in MANIFEST["usernames"]:
            key = trust.pinned(peer)
            if key is not None:
                assert cu.b64encode(key) == v["users"][peer]["identity_key_b64"], (user, peer)
        # The prekey store: it must *open* (a store that does not is silently started again, and
        # everything stored for this user is lost), and it holds the room.
        store = K.PrekeyStore(home, user, service, password)
        assert not store.created, f"{variant}: {user}'s prekey store did not open (it would start again)"
        assert store.signed and store.one_time
        assert MANIFEST["room"]["name"] in store.rooms
    # The histories.
    for user, conversations in v["history"].items():
        history = H.History.open(
            root / "homes" / user, user, service, MANIFEST["passwords"][user], max_age_days=FOREVER_S / 86400
        )
        try:
            for peer, expected in conversations.items():
                page = history.last(peer, 100)
                assert page.damaged == 0
                assert [
                    {"direction": e.direction, "text": e.text, "state": e.state} for e in page.entries
                ] == expected
        finally:
            history.close()


def test_the_fixture_comes_from_before_schema_versions(upgraded):
    variant, _v, root, url = upgraded
    assert _version_rows(variant, root, url) is None


@pytest.mark.parametrize("opening", ["first", "again"])
def test_the_server_storage_holds_users_room_and_queue(upgraded, opening):
    """The first open migrates (and stamps); the second finds it up to date: both hold everything."""
    variant, v, root, url = upgraded
    if opening == "again":
        database.open_storage(url or f"sqlite:///{root / 'server' / 'secureim.db'}").close()
    storage = database.open_storage(url or f"sqlite:///{root / 'server' / 'secureim.db'}")
    try:
        assert storage.schema_version() == migrations.latest(_backend(variant))
        assert sorted(u.username for u in storage.list_users(time.time())) == MANIFEST["usernames"]
        for user in MANIFEST["usernames"]:
            assert cu.b64encode(storage.get_identity_key(user)) == v["users"][user]["identity_key_b64"]
            assert storage.get_password_hash(user)
            assert storage.prekey_status(user).signed_id is not None
        room = storage.get_room(MANIFEST["room"]["name"])
        assert room is not None
        assert (room.admin, list(room.members), room.epoch, room.uid.hex(), room.head.hex()) == (
            v["room"]["admin"],
            v["room"]["members"],
            v["room"]["epoch"],
            v["room"]["uid_hex"],
            v["room"]["head_hex"],
        )
        for user, expected in v["queue_rows"].items():
            rows = storage.queued_for(user, 0, 1000)
            kinds: dict[str, int] = {}
            for row in rows:
                kinds[str(row.kind)] = kinds.get(str(row.kind), 0) + 1
            assert (len(rows), kinds) == (expected["total"], expected["by_kind"])
            assert all(row.sender == "alice" for row in rows)
        for user in set(MANIFEST["usernames"]) - set(v["queue_rows"]):
            assert storage.queued_for(user, 0, 1000) == []
    finally:
        storage.close()
    _assert_migrated(variant, root, url)


# -- a real server on a copy ---------------------------------------------------------------------
def _run_upgraded_server(upgraded):
    variant, v, root, url = upgraded
    _port_free(MANIFEST["port"])
    room = MANIFEST["room"]["name"]
    overrides = {"queue_max_age_s": FOREVER_S}
    if url:
        overrides["db_url"] = url
    with running_server(root / "server", port=MANIFEST["port"], **overrides) as server:
        assert server.fingerprint == v["server_fingerprint"], "the server's identity key changed"
        homes = root / "homes"
        # carol, who was away: her stored messages, in order, then the room message.
        carol, carol_ev = _client(homes / "carol", "carol")
        assert not carol.first_contact and carol.server_fingerprint == v["server_fingerprint"]
        assert carol.identity_fingerprint == v["users"]["carol"]["identity_fingerprint"]
        queued = MANIFEST["queued_for"]["carol"]
        for expected in queued["direct"]:
            got = carol_ev.wait(C.MessageReceived, peer=expected["from"])
            assert got.text == expected["text"] and got.stored_at is not None, got
        for expected in queued["room"]:
            got = carol_ev.wait(C.RoomMessageReceived, room=expected["room"])
            assert (got.sender, got.text, got.stored_at is not None) == (
                expected["sender"],
                expected["text"],
                True,
            )
        assert list(carol.rooms.members(room)) == MANIFEST["room"]["members"]
        assert [(e.direction, e.text) for e in carol.history_page("alice").entries] == [
            (H.INCOMING, m["text"]) for m in queued["direct"]
        ]

        # alice and bob: logged in with their passwords, the server they pinned, their history.
        alice, alice_ev = _client(homes / "alice", "alice")
        bob, bob_ev = _client(homes / "bob", "bob")
        for user, client in (("alice", alice), ("bob", bob)):
            assert not client.first_contact and client.server_fingerprint == v["server_fingerprint"]
            assert client.identity_fingerprint == v["users"][user]["identity_fingerprint"]
            assert list(client.rooms.members(room)) == MANIFEST["room"]["members"]
            assert client.rooms.admin_of(room) == MANIFEST["room"]["admin"]
        live = [(m["from"], m["text"]) for m in MANIFEST["live_conversation"]]
        assert [
            ("alice" if e.direction == H.OUTGOING else "bob", e.text)
            for e in alice.history_page("bob").entries
        ] == live
        assert [
            ("bob" if e.direction == H.OUTGOING else "alice", e.text)
            for e in bob.history_page("alice").entries
        ] == live
        # What alice sent carol while carol was away.  (carol's receipts come to alice as stored
        # messages, but today's client keeps its outbox in memory only: after a restart a receipt
        # finds no entry, so the rows stay 'accepted'.  A client that keeps its outbox may say
        # 'delivered'; either is fine here, nothing else is.)
        assert [(e.direction, e.text) for e in alice.history_page("carol").entries] == [
            (H.OUTGOING, m["text"]) for m in queued["direct"]
        ]
        assert {e.state for e in alice.history_page("carol").entries} <= {H.STATE_ACCEPTED, H.STATE_DELIVERED}

        # Still talking after the upgrade: pairwise (keys pinned before) and in the room.
        alice.send_confirmed("bob", "after the upgrade")
        assert bob_ev.wait(C.MessageReceived, peer="alice").text == "after the upgrade"
        sent = alice.rooms.send(room, "the room after the upgrade")
        assert (sent.online, sent.stored) == (2, 0)
        for ev in (bob_ev, carol_ev):
            got = ev.wait(C.RoomMessageReceived, room=room)
            assert (got.sender, got.text) == ("alice", "the room after the upgrade")
        for client in (carol, alice, bob):
            client.close()
        # Everything carol was given is acknowledged (close() waits until the server has let go, and
        # it handles a session's frames in order).  alice may still have carol's receipts waiting.
        assert server.storage.queued_for("carol", 0, 1000) == []
        assert server.storage.queued_for("bob", 0, 1000) == []
        assert {q.sender for q in server.storage.queued_for("alice", 0, 1000)} <= {"carol"}
        for ev in (alice_ev, bob_ev, carol_ev):
            assert ev.warnings() == [], ev.warnings()
        assert server.storage.schema_version() == migrations.latest(_backend(variant))
    _assert_migrated(variant, root, url)


def test_every_user_logs_in_and_nothing_is_lost(upgraded):
    _run_upgraded_server(upgraded)


def test_the_same_two_years_later(upgraded, monkeypatch):
    """The clock ~800 days past the fixture: the bounds _timeless raises are all there are."""
    _timeless(monkeypatch, AGED_S)
    _run_upgraded_server(upgraded)


def test_the_manifest_is_the_fixture():
    """What the manifest lists is there, byte for byte (nobody regenerated half of it)."""
    import hashlib

    for rel, meta in MANIFEST["files"].items():
        data = (FIXTURE / rel).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (meta["bytes"], meta["sha256"]), rel
