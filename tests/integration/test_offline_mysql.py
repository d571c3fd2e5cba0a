"""What the server keeps of a stored message: inspected in MariaDB and in the server's memory (issue 12)."""

from __future__ import annotations

import pymysql
from db_fixtures import MYSQL_HOST, MYSQL_PORT, MYSQL_USER, mysql_url
from server_fixtures import PASSWORD, RecordingSuite, logged_in_client, running_server, wait_for

from secureim import client as C
from secureim import proto as P
from secureim.e2e import prekeys as K

SECRETS = ["meet me at the north gate", "bring the blue folder"]


def _every_byte(database: str) -> bytes:
    conn = pymysql.connect(host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, password="", database=database)
    out = b""
    with conn.cursor() as cur:
        cur.execute("SHOW TABLES")
        for (table,) in cur.fetchall():
            cur.execute(f"SELECT * FROM `{table}`")
            for row in cur.fetchall():
                out += b"".join(v if isinstance(v, bytes) else str(v).encode() for v in row if v is not None)
    conn.close()
    return out


def test_mariadb_rows_hold_no_plaintext_and_no_key_that_opens_them(tmp_path, mysql_database):
    with running_server(tmp_path / "srv", db_url=mysql_url(mysql_database)) as server:
        kdc = server.service.suite = RecordingSuite(server.service.suite)
        bob = logged_in_client(server, tmp_path / "bob", "bob")
        assert bob.mailbox.published.wait(20)
        bob.close()
        alice = logged_in_client(server, tmp_path / "alice", "alice")
        for text in SECRETS:
            alice.send_offline("bob", text)
            wait_for(alice, C.MessageStored, text=text)
        stored = _every_byte(mysql_database)
        assert len(server.storage.queued_for("bob", 0, 10)) == 2
        assert kdc.keys, "the KDC made the offline key"
        for text in SECRETS:
            assert text.encode() not in stored
        for key in kdc.keys:
            assert key not in stored  # the KDC key is only there sealed under the server's key
        store = K.PrekeyStore(tmp_path / "bob", "bob", alice.server_id, PASSWORD)  # bob's private prekeys
        privates = (
            list(store.one_time.values())
            + [s.x25519 for s in store.signed]
            + [s.kem_seed for s in store.signed]
        )
        assert len(privates) > 100 and not any(secret in stored for secret in privates)
        bob = logged_in_client(server, tmp_path / "bob", "bob", register=False)
        assert [wait_for(bob, C.MessageReceived).text for _ in SECRETS] == SECRETS
        alice.close()
        bob.close()


def test_the_server_never_holds_a_stored_messages_plaintext(tmp_path, caplog):
    """The store path gets only end-to-end ciphertext; the text is in no log line, no registry
    entry, no session's state (the relay test's method, for Store)."""
    seen = []
    with running_server(tmp_path / "srv") as server:
        original = server.service.mailbox.store

        def spy(session, msg):
            seen.append(msg.payload)
            return original(session, msg)

        server.service.router.override(P.Store, spy)
        caplog.set_level("DEBUG")
        bob = logged_in_client(server, tmp_path / "bob", "bob")
        assert bob.mailbox.published.wait(20)
        bob.close()
        alice = logged_in_client(server, tmp_path / "alice", "alice")
        for text in SECRETS:
            alice.send_offline("bob", text)
            wait_for(alice, C.MessageStored, text=text)
        bob = logged_in_client(server, tmp_path / "bob", "bob", register=False)
        assert [wait_for(bob, C.MessageReceived).text for _ in SECRETS] == SECRETS
        state = repr(server.service.registry.__dict__) + "".join(
            repr(s.__dict__) for s in server.service.registry.all_sessions()
        )
        alice.close()
        bob.close()
    assert len(seen) >= len(SECRETS)
    for text in SECRETS:
        assert all(text.encode() not in p for p in seen)
        assert text not in caplog.text and text not in state
