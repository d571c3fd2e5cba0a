"""The cluster bus without NATS: sealed frames, replays, and what each node does with what it hears.

The handlers run against a real ChatService (SQLite) whose online users are recording
stand-ins; no network.  tests/integration/test_cluster.py runs the same code on real NATS.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from secureim import proto as P
from secureim.errors import SecureIMError
from secureim.server.cluster import nats_bus as CN
from secureim.server.cluster.local import SIGNED_IN_ELSEWHERE
from secureim.server.config import ServerConfig
from secureim.server.service import ChatService

KEY = bytes(range(32))
SUBJECT = "t.node.abc"


# =============================================================================
# Frames
# =============================================================================
def test_a_sealed_frame_opens_with_the_cluster_key_only():
    sender, receiver = CN.BusCodec(KEY, b"A" * 16), CN.BusCodec(KEY, b"B" * 16)
    frame = sender.seal(SUBJECT, CN.DELIVER, b"body")
    assert receiver.open(SUBJECT, frame) == (CN.DELIVER, b"A" * 16, b"body")
    assert b"body" not in frame  # NATS sees ciphertext only
    with pytest.raises(SecureIMError, match="authentication"):
        CN.BusCodec(bytes(32), b"C" * 16).open(SUBJECT, sender.seal(SUBJECT, CN.DELIVER, b"x"))


@pytest.mark.parametrize("where", [1, 10, -1])
def test_a_changed_byte_is_refused(where):
    sender, receiver = CN.BusCodec(KEY, b"A" * 16), CN.BusCodec(KEY, b"B" * 16)
    frame = bytearray(sender.seal(SUBJECT, CN.DELIVER, b"body"))
    frame[where] ^= 0x01
    with pytest.raises(SecureIMError):
        receiver.open(SUBJECT, bytes(frame))


def test_a_frame_for_one_node_does_not_open_on_another_subject():
    sender, receiver = CN.BusCodec(KEY, b"A" * 16), CN.BusCodec(KEY, b"B" * 16)
    frame = sender.seal("t.node.one", CN.DELIVER, b"body")
    with pytest.raises(SecureIMError, match="authentication"):
        receiver.open("t.node.two", frame)


def test_a_replayed_or_duplicated_frame_is_refused():
    sender, receiver = CN.BusCodec(KEY, b"A" * 16), CN.BusCodec(KEY, b"B" * 16)
    first, second = sender.seal(SUBJECT, CN.DELIVER, b"1"), sender.seal(SUBJECT, CN.DELIVER, b"2")
    receiver.open(SUBJECT, first)
    receiver.open(SUBJECT, second)
    for again in (first, second):
        with pytest.raises(SecureIMError, match="replayed"):
            receiver.open(SUBJECT, again)


def test_a_stale_frame_is_refused(monkeypatch):
    sender, receiver = CN.BusCodec(KEY, b"A" * 16), CN.BusCodec(KEY, b"B" * 16)
    frame = sender.seal(SUBJECT, CN.DELIVER, b"old")
    later = time.time() + CN.MAX_FRAME_AGE_S + 5
    monkeypatch.setattr(CN.time, "time", lambda: later)
    with pytest.raises(SecureIMError, match="stale"):
        receiver.open(SUBJECT, frame)


@pytest.mark.parametrize("prefix", ["", "a b", "a..b", "x" * 65, "a.*", "a.>"])
def test_a_bad_subject_prefix_is_refused(prefix):
    with pytest.raises(SecureIMError):
        CN.check_prefix(prefix)


def test_fields_round_trip_and_truncation_is_refused():
    packed = CN.pack_fields(b"alice", b"", b"\x00" * 40)
    assert CN.unpack_fields(packed, 3) == [b"alice", b"", b"\x00" * 40]
    for cut in range(1, len(packed)):
        try:
            CN.unpack_fields(packed[:cut], 3)
        except SecureIMError:
            continue
        raise AssertionError(f"a frame cut at {cut} was accepted")


# =============================================================================
# What a node does with what it hears
# =============================================================================
@dataclass(eq=False)
class FakeSession:
    username: str
    login_at: float
    identity_key: bytes = b"\x01" * 32
    source: str = "127.0.0.1"
    sent: list = field(default_factory=list)
    closed_with: str | None = None
    gone: bool = False
    closed: threading.Event = field(default_factory=threading.Event)

    def send(self, msg):
        self.sent.append(msg)
        return True

    def close(self, reason=None):
        self.closed_with = reason


@pytest.fixture
def node(tmp_path):
    config = ServerConfig(data_dir=tmp_path, bcrypt_cost=4)
    from database import open_storage

    storage = open_storage(config.database_url)
    service = ChatService(storage, config)
    service.loop_thread_id = threading.get_ident()  # handlers run here, as on the loop thread
    cluster = CN.NatsCluster("nats://127.0.0.1:1", "t", KEY, "test")
    cluster.bind(service)
    service.cluster = cluster
    yield SimpleNamespace(service=service, cluster=cluster)
    storage.close()


def _local(node, name, login_at):
    session = FakeSession(name, login_at)
    node.service.registry.online[name] = session
    node.service.registry.sessions.add(session)
    return session


_SENDERS: dict[bytes, CN.BusCodec] = {}


def _frame(node, sender: bytes, subject: str, kind: int, body: bytes):
    codec = _SENDERS.setdefault(sender, CN.BusCodec(KEY, sender))  # one sender: rising sequence numbers
    msg = SimpleNamespace(subject=subject, data=codec.seal(subject, kind, body), reply="")
    asyncio.run(node.cluster._on_frame(msg))


def _online(name, login_at, key=b"\x02" * 32):
    return CN.pack_fields(name.encode(), struct.pack(">d", login_at), key)


def test_a_newer_login_elsewhere_replaces_the_session_here(node):
    alice = _local(node, "alice", 100.0)
    _frame(node, b"X" * 16, "t.presence", CN.ONLINE, _online("alice", 200.0))
    assert alice.closed_with == SIGNED_IN_ELSEWHERE
    assert node.service.registry.session_of("alice") is None
    assert node.cluster.is_remote("alice") and node.cluster.identity_of("alice") == b"\x02" * 32


def test_an_older_login_elsewhere_does_not_replace_the_newer_one_here(node):
    alice = _local(node, "alice", 300.0)
    _frame(node, b"X" * 16, "t.presence", CN.ONLINE, _online("alice", 200.0))
    assert alice.closed_with is None and node.service.registry.session_of("alice") is alice
    assert not node.cluster.is_remote("alice")


def test_the_end_of_an_older_session_does_not_hide_the_newer_one(node):
    _frame(node, b"X" * 16, "t.presence", CN.ONLINE, _online("bob", 200.0))
    _frame(node, b"X" * 16, "t.presence", CN.OFFLINE, CN.pack_fields(b"bob", struct.pack(">d", 100.0)))
    assert node.cluster.is_remote("bob")
    _frame(node, b"X" * 16, "t.presence", CN.OFFLINE, CN.pack_fields(b"bob", struct.pack(">d", 200.0)))
    assert not node.cluster.is_remote("bob")


def test_watchers_here_hear_when_a_user_comes_online_elsewhere(node):
    carol = _local(node, "carol", 1.0)
    node.service.registry.watch_unless_online("carol", "dave")
    _frame(node, b"X" * 16, "t.presence", CN.ONLINE, _online("dave", 5.0))
    assert carol.sent == [P.PeerStatus(peer="dave", online=True, known=True, notice=True)]


def test_a_deliver_frame_carries_only_what_may_cross_nodes(node):
    bob = _local(node, "bob", 1.0)
    subject = node.cluster.node_subject(node.cluster.incarnation)
    key = P.ConversationKey(
        conversation_id=1, peer="alice", suite=1, generation=1, key=b"k" * 56, peer_identity=b"\x02" * 32
    )
    _frame(node, b"X" * 16, subject, CN.DELIVER, CN.pack_fields(b"bob", key.encode()))
    assert bob.sent == [] and node.cluster.frames_dropped == 1
    deliver = P.Deliver(conversation_id=1, sender="alice", payload=b"sealed")
    _frame(node, b"X" * 16, subject, CN.DELIVER, CN.pack_fields(b"bob", deliver.encode()))
    assert bob.sent == [deliver]


def test_a_key_frame_for_someone_outside_the_conversation_is_refused(node):
    bob = _local(node, "bob", 1.0)
    subject = node.cluster.node_subject(node.cluster.incarnation)
    key = P.ConversationKey(
        conversation_id=7, peer="mallory", suite=1, generation=1, key=b"k" * 56, peer_identity=b"\x02" * 32
    )
    _frame(node, b"X" * 16, subject, CN.KEY, CN.pack_fields(b"bob", b"alice", b"bob", key.encode()))
    assert bob.sent == [] and 7 not in node.service.registry.conversations
    good = P.ConversationKey(
        conversation_id=7, peer="alice", suite=1, generation=1, key=b"k" * 56, peer_identity=b"\x02" * 32
    )
    _frame(node, b"X" * 16, subject, CN.KEY, CN.pack_fields(b"bob", b"alice", b"bob", good.encode()))
    assert bob.sent == [good] and node.service.registry.conversations[7].members == ("alice", "bob")


def test_a_forged_frame_changes_nothing(node):
    alice = _local(node, "alice", 100.0)
    forged = CN.BusCodec(bytes(32), b"M" * 16)  # a NATS user without the cluster key
    msg = SimpleNamespace(
        subject="t.presence", data=forged.seal("t.presence", CN.ONLINE, _online("alice", 999.0)), reply=""
    )
    asyncio.run(node.cluster._on_frame(msg))
    assert alice.closed_with is None and not node.cluster.is_remote("alice")
    assert node.cluster.frames_dropped == 1


def test_users_of_a_silent_node_go_offline_and_their_peers_hear_it(node, monkeypatch):
    alice = _local(node, "alice", 1.0)
    _frame(node, b"X" * 16, "t.presence", CN.ONLINE, _online("bob", 2.0))
    node.service.learn_conversation(3, ("alice", "bob"), 1)
    node.cluster.connected_since = time.monotonic() - 100  # our own link has been up all along
    heard = node.cluster.nodes[b"X" * 16]
    monkeypatch.setattr(CN.time, "monotonic", lambda: heard + CN.NODE_TIMEOUT_S + 1)
    node.cluster._expire_nodes()
    assert not node.cluster.is_remote("bob")
    assert 3 not in node.service.registry.conversations
    assert P.PeerStatus(peer="bob", online=False, known=True, notice=True) in alice.sent


def test_silence_while_our_own_link_is_down_says_nothing(node, monkeypatch):
    _frame(node, b"X" * 16, "t.presence", CN.ONLINE, _online("bob", 2.0))
    node.cluster.connected_since = None  # we are the one cut off
    heard = node.cluster.nodes[b"X" * 16]
    monkeypatch.setattr(CN.time, "monotonic", lambda: heard + 1000)
    node.cluster._expire_nodes()
    assert node.cluster.is_remote("bob")


def test_a_complete_snapshot_removes_whoever_it_no_longer_lists(node):
    sender = b"X" * 16
    _frame(node, sender, "t.presence", CN.ONLINE, _online("bob", 2.0))
    _frame(node, sender, "t.presence", CN.ONLINE, _online("erin", 2.0))
    subject = node.cluster.node_subject(node.cluster.incarnation)
    _frame(
        node,
        sender,
        subject,
        CN.SNAPSHOT,
        CN.pack_fields(b"snap-1", b"1", b"bob", struct.pack(">d", 2.0), b"\x02" * 32),
    )
    assert node.cluster.is_remote("bob") and not node.cluster.is_remote("erin")


@pytest.mark.parametrize("db", [None, "sqlite:///x.db"])
def test_a_cluster_on_sqlite_is_refused_in_one_line(tmp_path, db):
    from secureim.server.options import build_arg_parser, config_from_args

    argv = ["--data-dir", str(tmp_path), "--cluster", "nats://127.0.0.1:4222"] + (["--db", db] if db else [])
    with pytest.raises(SecureIMError, match="--cluster needs a database every node shares"):
        config_from_args(build_arg_parser().parse_args(argv))


def test_a_relay_for_someone_who_just_left_is_bounced_to_the_sender(node, monkeypatch):
    sent = []
    monkeypatch.setattr(
        node.cluster, "_publish", lambda subject, kind, body, **kw: sent.append((subject, kind, body))
    )
    subject = node.cluster.node_subject(node.cluster.incarnation)
    deliver = P.Deliver(conversation_id=1, sender="alice", payload=b"sealed")
    _frame(node, b"Y" * 16, subject, CN.DELIVER, CN.pack_fields(b"bob", deliver.encode()))  # bob is not here
    assert len(sent) == 1
    to, kind, body = sent[0]
    assert to == node.cluster.node_subject(b"Y" * 16) and kind == CN.DELIVER
    name, inner = CN.unpack_fields(body, 2)
    bounce = P.decode_message(inner)
    assert name == b"alice" and isinstance(bounce, P.Error) and bounce.code == P.ErrorCode.PEER_OFFLINE
    assert "bob is offline" in bounce.reason


def test_a_snapshot_repeating_what_we_know_leaves_conversations_alone(node):
    """Every SYNC (a node starting, a link coming back) repeats unchanged entries: no re-opening storm."""
    alice = _local(node, "alice", 1.0)
    sender = b"X" * 16
    _frame(node, sender, "t.presence", CN.ONLINE, _online("bob", 2.0))
    node.service.learn_conversation(3, ("alice", "bob"), 1)
    alice.sent.clear()
    subject = node.cluster.node_subject(node.cluster.incarnation)
    _frame(
        node,
        sender,
        subject,
        CN.SNAPSHOT,
        CN.pack_fields(b"snap-2", b"1", b"bob", struct.pack(">d", 2.0), b"\x02" * 32),
    )
    assert 3 in node.service.registry.conversations and alice.sent == []


def test_a_user_who_moves_here_ends_the_conversations_with_the_session_elsewhere(node, monkeypatch):
    monkeypatch.setattr(node.cluster, "_publish", lambda *a, **kw: True)
    dave = _local(node, "dave", 1.0)
    _frame(node, b"X" * 16, "t.presence", CN.ONLINE, _online("bob", 2.0))
    node.service.learn_conversation(4, ("bob", "dave"), 1)
    dave.sent.clear()
    bob = _local(node, "bob", 3.0)  # bob logs in on this node
    node.cluster.user_online("bob", bob.login_at, bob.identity_key)
    assert not node.cluster.is_remote("bob") and 4 not in node.service.registry.conversations
    assert dave.sent == [P.PeerStatus(peer="bob", online=True, known=True, notice=True)]


def test_our_newer_session_is_announced_again_when_an_older_one_shows_up(node, monkeypatch):
    sent = []
    monkeypatch.setattr(node.cluster, "_publish", lambda subject, kind, body, **kw: sent.append((kind, body)))
    alice = _local(node, "alice", 300.0)
    _frame(node, b"X" * 16, "t.presence", CN.ONLINE, _online("alice", 200.0))
    assert alice.closed_with is None
    assert sent == [(CN.ONLINE, _online("alice", 300.0, alice.identity_key))]  # that node closes its own


def test_an_online_announcement_for_a_session_that_already_ended_is_not_sent(node, monkeypatch):
    sent = []
    monkeypatch.setattr(node.cluster, "_publish", lambda subject, kind, body, **kw: sent.append(kind))
    node.cluster.user_online("alice", 5.0, b"\x01" * 32)  # alice's session ended before this ran
    assert sent == []
