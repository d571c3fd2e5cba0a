"""Group rooms in the terminal (issue 13): a real server process, clients in pseudo-terminals."""

from __future__ import annotations

import io
import shutil
import sqlite3

import pytest
from cli_helpers import ServerProcess, login_flow, quit_client, spawn_client
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from room_helpers import any_key_opens, rooms_in_store

import database as D
from secureim.e2e import rooms as R

PASSWORDS = {
    "alice": "alice-password",
    "bob": "bob-password",
    "carol": "carol-password",
    "mallory": "mallory-password",
}


@pytest.fixture
def server(tmp_path):
    srv = ServerProcess(tmp_path / "srvdata")
    yield srv
    srv.stop()


def _user(server, tmp_path, name: str, *, new: bool = True):
    child = spawn_client(server, tmp_path / name)
    login_flow(child, name, PASSWORDS[name], new=new)
    child.expect_exact("[CLIENT]: Destination:")
    return child


def _team(server, tmp_path):
    alice, bob, carol = (_user(server, tmp_path, n) for n in ("alice", "bob", "carol"))
    alice.logfile_read = io.StringIO()  # everything alice's screen shows from here
    alice.sendline("/invite #team zed")
    alice.expect_exact("[CLIENT]: You are not in #team")
    alice.sendline("/create #team")
    alice.expect_exact("[CLIENT]: You created #team; you are its admin.")
    alice.sendline("/invite #team bob")
    alice.expect_exact("[CLIENT]: You added bob to #team.")
    bob.expect_exact("[CLIENT]: alice added you to #team (members: alice, bob).")
    alice.sendline("/invite #team carol")
    alice.expect_exact("[CLIENT]: You added carol to #team.")
    carol.expect_exact("[CLIENT]: alice added you to #team (members: alice, bob, carol).")
    bob.expect_exact("[CLIENT]: alice added carol to #team.")  # every member sees every change
    for child in (alice, bob, carol):
        child.sendline("#team")  # at the Destination prompt
        child.expect_exact("[CLIENT]: Now talking in #team (3 members: alice, bob, carol).")
    return alice, bob, carol


def test_a_team_room_in_three_terminals_then_a_removal_and_a_member_offline(server, tmp_path):
    alice, bob, carol = _team(server, tmp_path)
    people = {"alice": alice, "bob": bob, "carol": carol}
    for name, child in people.items():
        child.sendline(f"hello from {name}")
        for other_name, other in people.items():
            if other is not child:
                other.expect_exact(f"[#team {name}]: hello from {name}")
    bob.sendline("/members #team")
    bob.expect_exact("[CLIENT]: #team (3): alice (admin), bob, carol")
    bob.sendline("/history")
    bob.expect_exact("[CLIENT]: The local history keeps one-to-one conversations only; rooms are not kept.")
    carol.sendline("/rooms")
    carol.expect_exact("[CLIENT]: Your rooms: #team (3)")

    # Everything carol's client ever kept, copied before she goes (a client that keeps it all).
    kept = tmp_path / "carol-kept"
    shutil.copytree(tmp_path / "carol" / "prekeys", kept / "prekeys")
    alice.sendline("/remove #team carol")
    alice.expect_exact("[CLIENT]: You removed carol from #team;")
    bob.expect_exact("[CLIENT]: alice removed carol from #team.")
    carol.expect_exact("[CLIENT]: alice removed you from #team.")
    carol.expect_exact("[CLIENT]: Choose a destination: a USER or a #ROOM.")  # she was talking there
    carol.expect_exact("[CLIENT] Destination:")

    assert quit_client(bob) == 0  # bob is offline while alice writes
    alice.sendline("the plan, after carol")
    alice.expect_exact("[CLIENT]: Stored for 1 offline member(s) of #team; they get it when they log in.")
    db = sqlite3.connect(tmp_path / "srvdata" / "secureim.db")
    rows = db.execute("SELECT recipient, payload FROM message_queue WHERE kind = 1").fetchall()
    assert [r[0] for r in rows] == ["bob"]  # one copy, for bob; none for carol
    captured = bytes(rows[0][1])
    assert b"the plan" not in captured

    # carol's screen never shows it, and nothing carol holds, now or before her removal, opens it.
    carol.sendline("/rooms")
    carol.expect_exact("[CLIENT]: You are in no rooms")
    assert "the plan, after carol" not in carol.before
    server_id = f"{server.host}:{server.port}"  # what the client files its store under
    assert rooms_in_store(tmp_path / "carol", "carol", server_id, PASSWORDS["carol"]) == {}
    before = rooms_in_store(kept, "carol", server_id, PASSWORDS["carol"])
    assert "#team" in before and before["#team"].received  # her keys of the earlier epoch
    assert not any_key_opens(before["#team"], "alice", captured)
    carol.sendline("/to #team")
    carol.expect_exact("[CLIENT]: You are not in #team")

    bob = _user(server, tmp_path, "bob", new=False)
    bob.expect_exact("[#team alice]: the plan, after carol")
    alice.sendline("/invite #team zed")
    alice.expect_exact("[CLIENT]: There is no user zed.")
    alice.sendline("/leave #team")
    alice.expect_exact("[CLIENT]: You closed #team: it is gone for every member.")
    alice.expect_exact("[CLIENT] Destination:")
    alice.sendline("bob")  # the prompt takes a destination again
    alice.expect_exact("[CLIENT]: Destination user is online.")
    shown = alice.logfile_read.getvalue()
    assert (
        "alice added bob to #team." not in shown and "alice removed carol" not in shown
    )  # said once: "You ..."
    assert "Destination user zed" not in shown
    for child in (alice, bob, carol):
        assert quit_client(child) == 0


def test_a_member_added_by_the_server_is_refused_and_shown_as_a_warning(server, tmp_path):
    alice, bob = (_user(server, tmp_path, n) for n in ("alice", "bob"))
    mallory = _user(server, tmp_path, "mallory")
    alice.sendline("/create #team")
    alice.expect_exact("[CLIENT]: You created #team")
    alice.sendline("/invite #team bob")
    bob.expect_exact("[CLIENT]: alice added you to #team (members: alice, bob).")
    assert quit_client(bob) == 0

    # The server (its database) adds mallory, with a change it cannot sign as alice.
    storage = D.SQLiteStorage(tmp_path / "srvdata" / "secureim.db")
    room = storage.get_room("#team")
    forged = R.make_change(
        Ed25519PrivateKey.generate(),
        action=R.ADD,
        uid=room.uid,
        room="#team",
        epoch=room.epoch + 1,
        at_ms=1,
        prev_head=room.head,
        actor="alice",
        target="mallory",
        admin="alice",
        roster=[
            *((m, storage.get_identity_key(m)) for m in room.members),
            ("mallory", storage.get_identity_key("mallory")),
        ],
    )
    status, _ = storage.change_room(
        room.id,
        room.epoch,
        forged.head,
        add="mallory",
        change=forged.blob,
        wrapped_key=None,
        actor="alice",
        actor_identity=storage.get_identity_key("alice"),
        msg_ref=b"f" * 16,
        now=1.0,
    )
    storage.close()
    assert status == D.ROOM_OK

    bob = spawn_client(server, tmp_path / "bob")
    login_flow(bob, "bob", PASSWORDS["bob"], new=False)  # the forged change comes with his queue
    bob.expect_exact("[CLIENT]: @@@ WARNING: A change to #team said to be by alice is not signed")
    bob.sendline("/members #team")
    bob.expect_exact("[CLIENT]: #team (2): alice (admin), bob")
    assert quit_client(mallory) == 0
    mallory = spawn_client(server, tmp_path / "mallory")
    login_flow(mallory, "mallory", PASSWORDS["mallory"], new=False)
    mallory.expect_exact("[CLIENT]: @@@ WARNING: A change to #team said to be by alice is not signed")
    mallory.sendline("/rooms")
    mallory.expect_exact("[CLIENT]: You are in no rooms")  # her client refused it too
    assert "added you to #team" not in mallory.before
    for child in (alice, bob, mallory):
        assert quit_client(child) == 0
