"""Domain handlers driven through their Protocols (secureim/server/ports.py): no sockets, no database."""

from __future__ import annotations

import threading
import time
from collections import deque

import crypto_utils as cu
from secureim import proto as P
from secureim.server.cluster.local import LocalCluster
from secureim.server.config import ServerConfig
from secureim.server.kdc import Conversations
from secureim.server.metrics import ServerMetrics
from secureim.server.moderation import AddressBans, Moderation
from secureim.server.presence import Presence
from secureim.server.registry import LiveConversation, Registry


class FakeSession:
    def __init__(self, username: str | None, source: str = "198.51.100.7") -> None:
        self.username = username
        self.source = source
        self.identity_key = b"\x01" * 32
        self.login_at = 1.0
        self.sent: list[P.Message] = []
        self.closed = threading.Event()
        self.closed_with: str | None = None
        self.gone = False
        self.offline_opens: deque = deque()

    def send(self, msg: P.Message) -> bool:
        self.sent.append(msg)
        return not self.closed.is_set()

    def close(self, reason: str | None = None) -> None:
        self.closed_with = reason
        self.closed.set()


class FakeRuntime:
    """Threads + ClusterSlot + SuiteSlot + NodeName, all inline."""

    def __init__(self) -> None:
        self.cluster = LocalCluster()
        self.suite = cu.get_suite("aes256")
        self.node = "test-node"
        self.slow: list[tuple] = []
        self.looped: list[tuple] = []

    def on_loop(self, fn, *args) -> None:
        self.looped.append((fn, args))
        fn(*args)

    def run_slow(self, fn, *args) -> None:
        self.slow.append((fn, args))

    def on_loop_thread(self) -> bool:
        return True

    def call_later(self, delay_s, fn, *args) -> None:
        raise AssertionError("not in these tests")


class NoStore:
    def get_password_hash(self, username):
        return None

    def open_conversation(self, user_a, user_b):
        return 1

    def record_key_generation(self, conversation_id):
        return 1

    def session_ended(self, node, username):
        self.ended = (node, username)


def _online(registry: Registry, *sessions: FakeSession) -> None:
    for s in sessions:
        registry.online[s.username] = s  # type: ignore[assignment]


def _conversations(config: ServerConfig | None = None) -> tuple[Conversations, Registry, FakeRuntime]:
    registry, runtime = Registry(), FakeRuntime()
    kdc = Conversations(registry, NoStore(), runtime, ServerMetrics(), config or ServerConfig())
    return kdc, registry, runtime


def test_relay_reaches_the_peer_and_counts():
    kdc, registry, _runtime = _conversations()
    alice, bob = FakeSession("alice"), FakeSession("bob")
    _online(registry, alice, bob)
    registry.conversations[7] = LiveConversation(7, ("alice", "bob"), 1, time.monotonic())
    kdc.relay(alice, P.Relay(conversation_id=7, payload=b"sealed"))  # type: ignore[arg-type]
    assert bob.sent == [P.Deliver(conversation_id=7, sender="alice", payload=b"sealed")]
    assert alice.sent == [] and kdc.relayed == 1


def test_relay_into_a_conversation_one_is_not_in_is_refused():
    kdc, registry, _runtime = _conversations()
    alice, bob, mallory = FakeSession("alice"), FakeSession("bob"), FakeSession("mallory")
    _online(registry, alice, bob, mallory)
    registry.conversations[7] = LiveConversation(7, ("alice", "bob"), 1, time.monotonic())
    kdc.relay(mallory, P.Relay(conversation_id=7, payload=b"x"))  # type: ignore[arg-type]
    assert bob.sent == [] and [type(m) for m in mallory.sent] == [P.Error]
    assert mallory.sent[0].code == P.ErrorCode.NOT_A_MEMBER


def test_a_due_rekey_holds_the_frames_and_goes_to_a_worker():
    kdc, registry, runtime = _conversations(ServerConfig(rekey_after_messages=2, min_rekey_interval_s=0))
    alice, bob = FakeSession("alice"), FakeSession("bob")
    _online(registry, alice, bob)
    conv = registry.conversations[7] = LiveConversation(7, ("alice", "bob"), 1, time.monotonic())
    for _ in range(3):
        kdc.relay(alice, P.Relay(conversation_id=7, payload=b"m"))  # type: ignore[arg-type]
    assert len(bob.sent) == 2 and conv.held == [(alice, P.Relay(conversation_id=7, payload=b"m"))]
    assert [args for _fn, args in runtime.slow] == [(7, ("alice", "bob"))]
    fn, args = runtime.slow[0]
    fn(*args)  # the worker's job: a new key for both, then the held frame
    kinds = [type(m) for m in bob.sent]
    assert kinds == [P.Deliver, P.Deliver, P.ConversationKey, P.Deliver] and conv.held is None
    assert [type(m) for m in alice.sent] == [P.ConversationKey]


def test_presence_tells_the_peers_and_books_the_end_on_a_worker():
    registry, runtime, store = Registry(), FakeRuntime(), NoStore()
    lines: list[str] = []
    presence = Presence(registry, store, runtime, lines.append)
    bob = FakeSession("bob")
    _online(registry, bob)
    presence.notify("alice", ["bob", "carol"], online=False)
    assert bob.sent == [P.PeerStatus(peer="alice", online=False, known=True, notice=True)]
    presence.who(bob, P.WhoRequest())  # type: ignore[arg-type]
    assert bob.sent[-1] == P.WhoResponse(users=("bob",), total=1)
    presence.session_ended("alice")
    assert store.ended == ("test-node", "alice")


def test_moderation_kicks_through_the_session_list():
    registry = Registry()
    alice = FakeSession("alice")
    _online(registry, alice)
    metrics = ServerMetrics()
    moderation = Moderation(NoStore(), AddressBans(), metrics, registry)  # type: ignore[arg-type]
    assert not moderation.kick("nobody", "x")
    assert moderation.kick("alice", "Bye now.") and alice.closed_with == "Bye now."
