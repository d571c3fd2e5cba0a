"""Direct mode's datagram channel: loss, duplication, reordering, replay, tampering, strangers."""

from __future__ import annotations

import heapq
import os
import random
import socket
import threading
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import crypto_utils as cu
from secureim.e2e import datagrams as D
from secureim.e2e import sessions as e2e


def _channels(suite_name="3des"):
    """Two channel ends keyed from a real end-to-end session pair."""
    ida, idb = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    suite = cu.get_suite(suite_name)
    a = e2e.E2ESession("alice", ida, "bob", cu.public_bytes(idb), 9, suite)
    b = e2e.E2ESession("bob", idb, "alice", cu.public_bytes(ida), 9, suite)
    k = suite.generate_key()
    sa, sb = a.new_generation(1, k), b.new_generation(1, k)
    reply_a, reply_b = a.receive_share(sb), b.receive_share(sa)  # each answers with an ML-KEM reply
    a.receive_share(reply_b)
    b.receive_share(reply_a)
    return D.DatagramChannel(suite, *a.direct_keys()), D.DatagramChannel(suite, *b.direct_keys())


class LossyNet:
    """A simulated network: loss, duplication and reordering from a seeded RNG, virtual time."""

    def __init__(self, seed: int, loss=0.2, dup=0.1, max_delay_ms=80) -> None:
        self.rng = random.Random(seed)
        self.loss, self.dup, self.max_delay = loss, dup, max_delay_ms
        self.queue: list = []
        self.n = 0

    def send(self, to: str, datagram: bytes, now: int) -> None:
        copies = 0 if self.rng.random() < self.loss else (2 if self.rng.random() < self.dup else 1)
        for _ in range(copies):
            self.n += 1
            heapq.heappush(self.queue, (now + self.rng.randint(1, self.max_delay), self.n, to, datagram))


def _run(a, b, net, messages, now=1_000_000, limit_ms=120_000):
    """Drive both ends until every message is acknowledged (or the virtual time bound)."""
    ends = {"a": a, "b": b}
    delivered, acked, failed = [], set(), []
    for text in messages:
        _mid, dgs = a.send(text, now)
        for d in dgs:
            net.send("b", d, now)
    end = now + limit_ms
    while now < end and (len(acked) < len(messages) and not failed):
        now += 10
        while net.queue and net.queue[0][0] <= now:
            _t, _n, to, d = heapq.heappop(net.queue)
            for ev in ends[to].receive(d, now):
                if isinstance(ev, D.Delivered):
                    delivered.append(ev.payload)
                elif isinstance(ev, D.Acknowledged):
                    acked.add(ev.message_id)
        for name, end_ in ends.items():
            dgs, events = end_.poll(now)
            failed += [e for e in events if isinstance(e, D.DeliveryFailed)]
            for d in dgs:
                net.send("b" if name == "a" else "a", d, now)
    return delivered, acked, failed


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_message_delivered_once_in_order_under_loss_duplication_reordering(seed):
    a, b = _channels()
    net = LossyNet(seed)
    msgs = [f"message {i}".encode() * (1 + (i % 7) * 40) for i in range(150)]  # some span several fragments
    delivered, acked, failed = _run(a, b, net, msgs)
    assert not failed
    assert delivered == msgs  # each once, in order
    assert len(acked) == len(msgs)


def test_a_16_kib_message_is_split_and_reassembled():
    a, b = _channels("aes256")
    big = bytes(range(256)) * 64
    _mid, dgs = a.send(big, 1000)
    assert len(dgs) == 16 and all(len(d) < 1280 for d in dgs)
    events = [e for d in reversed(dgs) for e in b.receive(d, 1000)]
    assert events == [D.Delivered(1, big)]


def test_replayed_datagram_is_refused():
    a, b = _channels()
    _mid, (dg,) = a.send(b"once", 1000)
    assert b.receive(dg, 1000) == [D.Delivered(1, b"once")]
    assert b.receive(dg, 1001) == [] and b.dropped == 1


def test_tampered_datagrams_are_refused():
    a, b = _channels()
    _mid, (dg,) = a.send(b"intact", 1000)
    for pos in (0, 5, 12, len(dg) // 2, len(dg) - 1):
        bad = bytearray(dg)
        bad[pos] ^= 0x40
        assert b.receive(bytes(bad), 1000) == []
    assert b.receive(dg, 1000) == [D.Delivered(1, b"intact")]


def test_datagrams_from_a_stranger_are_refused():
    _a, b = _channels()
    mallory, _ = _channels()  # a valid channel, but not with bob
    _mid, (dg,) = mallory.send(b"hi bob, it's alice", 1000)
    assert b.receive(dg, 1000) == [] and b.dropped == 1


def test_stale_and_future_datagrams_are_refused():
    a, b = _channels()
    _mid, (dg,) = a.send(b"old", 1000)
    assert b.receive(dg, 1000 + D.FRESHNESS_MS + 1) == []
    _mid, (dg2,) = a.send(b"new", 1000 + 2 * D.FRESHNESS_MS)
    assert b.receive(dg2, 1000) == []


def test_unreachable_peer_is_reported_not_silently_lost():
    a, _b = _channels()
    a.send(b"into the void", 0)
    now, failures = 0, []
    while not failures and now < 120_000:
        now += 50
        _dgs, events = a.poll(now)
        failures += events
    assert failures and failures[0].message_id == 1 and "did not acknowledge" in failures[0].reason


def test_reassembly_and_reordering_buffers_are_bounded():
    a, b = _channels()
    # A peer that sends message ids far ahead of what was delivered is not buffered.
    a._next_message_id = D.MAX_PENDING_MESSAGES + 5
    _mid, (dg,) = a.send(b"far ahead", 1000)
    assert b.receive(dg, 1000) == [] and b._incoming == {} and b._complete == {}
    # Half-finished messages are bounded in bytes.
    c, d = _channels()
    big = b"x" * D.MAX_MESSAGE_BYTES
    for _ in range(40):  # 40 x 64 KiB offered, far over the bound
        _m, dgs = c.send(big, 1000)
        for dg in dgs[1:]:  # never the first fragment: nothing completes
            d.receive(dg, 1000)
    assert 0 < d._pending_bytes() <= D.MAX_PENDING_BYTES


def test_replay_window():
    w = D.ReplayWindow(size=64)
    for seq in (5, 3, 70, 10, 69):
        assert w.check(seq)
        w.record(seq)
    assert not w.check(70) and not w.check(10) and not w.check(5)  # seen, or behind the window
    assert w.check(68) and not w.check(6)  # 6 is more than 64 behind 70
    w.record(10_000)
    assert not w.check(70) and w.check(9_999)


def test_over_real_udp_sockets_with_an_impairing_shim():
    """Loopback UDP: both ends in threads, each outgoing datagram passes a lossy shim."""
    a, b = _channels()
    sa, sb = (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
    )
    sa.bind(("127.0.0.1", 0))
    sb.bind(("127.0.0.1", 0))
    rng, lock = random.Random(7), threading.Lock()
    delivered, acked = [], set()
    msgs = [f"udp {i}".encode() * 50 for i in range(60)]
    done = threading.Event()

    def out(sock, dest, dgs):
        for d in dgs:
            with lock:
                r = rng.random()
            if r < 0.2:
                continue
            sock.sendto(d, dest)
            if r > 0.9:
                sock.sendto(d, dest)

    def pump(sock, chan, dest, to_send):
        sock.settimeout(0.02)
        for m in to_send:  # each channel is driven by this one thread only
            _mid, dgs = chan.send(m, int(time.time() * 1000))
            out(sock, dest, dgs)
        deadline = time.monotonic() + 60
        while not done.is_set() and time.monotonic() < deadline:
            now = int(time.time() * 1000)
            try:
                dg, _addr = sock.recvfrom(2048)
                for ev in chan.receive(dg, now):
                    if isinstance(ev, D.Delivered):
                        delivered.append(ev.payload)
                    elif isinstance(ev, D.Acknowledged):
                        acked.add(ev.message_id)
            except TimeoutError:
                pass
            dgs, _events = chan.poll(now)
            out(sock, dest, dgs)
            if len(acked) == len(msgs):
                done.set()

    ta = threading.Thread(target=pump, args=(sa, a, sb.getsockname(), msgs))
    tb = threading.Thread(target=pump, args=(sb, b, sa.getsockname(), []))
    ta.start()
    tb.start()
    ta.join(timeout=70)
    tb.join(timeout=70)
    sa.close()
    sb.close()
    assert delivered == msgs and len(acked) == len(msgs)


# --- with the real server: peer discovery, tickets, fallback --------------------------------
from server_fixtures import chat_pair, logged_in_client, running_server, wait_for

from secureim import client as C
from secureim import proto as P


def _enable_direct(client):
    """enable_direct(), then a round trip on the same session: the server has the endpoint."""
    client.enable_direct()
    client.who()
    wait_for(client, C.WhoList)


def _record_sent(client):
    sent = []
    original = client.direct.sendto

    def record(datagrams):
        datagrams = list(datagrams)
        sent.extend(datagrams)
        original(datagrams)

    client.direct.sendto = record
    return sent


def test_direct_mode_keeps_message_data_off_the_server(tmp_path):
    with running_server(tmp_path / "srv") as server:
        relayed = []
        original = server.service.conversations.relay
        server.service.router.override(P.Relay, lambda s, m: (relayed.append(m.payload), original(s, m)))
        alice, bob = chat_pair(server, tmp_path)
        _enable_direct(bob)
        alice.open_direct("bob")
        wait_for(alice, C.DirectReady, peer="bob")
        wait_for(bob, C.DirectReady, peer="alice")
        before = len(relayed)
        alice.send_message("bob", "peer to peer")
        got = wait_for(bob, C.MessageReceived)
        assert (got.text, got.direct) == ("peer to peer", True)
        # The receipts come back direct too.  Each is awaited before the next message goes: wait_for
        # drops the events it passes, and a receipt may arrive before or after the other's message.
        assert wait_for(alice, C.MessageDelivered).text == "peer to peer"
        bob.send_message("alice", "and back")
        got = wait_for(alice, C.MessageReceived)
        assert (got.text, got.direct) == ("and back", True)
        assert wait_for(bob, C.MessageDelivered).text == "and back"
        assert len(relayed) == before  # the server relayed nothing once the link was up
        alice.close()
        bob.close()


def test_replayed_ticket_stranger_and_tampered_datagrams_are_refused(tmp_path):
    with running_server(tmp_path / "srv") as server:
        alice, bob = chat_pair(server, tmp_path)
        _enable_direct(bob)
        sent = _record_sent(alice)
        alice.open_direct("bob")
        wait_for(alice, C.DirectReady, peer="bob")
        wait_for(bob, C.DirectReady, peer="alice")
        hello, bob_addr = sent[0]
        assert hello[1] == D.TYPE_HELLO
        mallory = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        mallory.bind(("127.0.0.1", 0))
        refused = bob.direct.links.refused
        mallory.sendto(hello, bob_addr)  # the ticket, replayed later
        mallory.sendto(os.urandom(80), bob_addr)  # a stranger
        alice.send_message("bob", "genuine")
        # bob's UDP socket is one FIFO queue: once "genuine" shows, both were handled before it.
        assert wait_for(bob, C.MessageReceived).text == "genuine"
        assert bob.direct.links.refused == refused + 2
        data, _addr = sent[-1]
        tampered = bytearray(data)
        tampered[-1] ^= 1
        channel = bob.direct.links._links["alice"].channel
        dropped = channel.dropped
        alice.direct.udp.sendto(bytes(tampered), bob_addr)  # tampered, from alice's own address
        alice.send_message("bob", "second")
        assert wait_for(bob, C.MessageReceived).text == "second"
        assert channel.dropped == dropped + 1
        assert bob.next_event(timeout=0.3) is None  # nothing was shown for any of them
        mallory.close()
        alice.close()
        bob.close()


def test_no_direct_path_falls_back_to_the_relay(tmp_path):
    with running_server(tmp_path / "srv") as server:
        alice, bob = chat_pair(server, tmp_path)
        _enable_direct(bob)
        bob.direct.udp.close()  # a firewall: nothing reaches bob over UDP
        bob.direct.udp = None
        alice.open_direct("bob")
        fallback = wait_for(alice, C.DirectFallback, peer="bob", timeout=15)
        assert "no direct path" in fallback.reason
        assert not alice.is_direct("bob")
        alice.send_message("bob", "via the relay")
        got = wait_for(bob, C.MessageReceived)
        assert (got.text, got.direct) == ("via the relay", False)
        alice.close()
        bob.close()


def test_direct_request_without_a_conversation_is_refused(tmp_path):
    with running_server(tmp_path / "srv") as server:
        alice = logged_in_client(server, tmp_path / "a", "alice")
        bob = logged_in_client(server, tmp_path / "b", "bob")
        _enable_direct(bob)
        alice.open_direct("bob")
        assert "Open a conversation" in wait_for(alice, C.DirectFallback, peer="bob").reason
        alice.close()
        bob.close()


def test_both_sides_dialling_at_once_end_with_one_working_link(tmp_path):
    with running_server(tmp_path / "srv") as server:
        alice, bob = chat_pair(server, tmp_path)
        _enable_direct(alice)
        _enable_direct(bob)
        alice.open_direct("bob")
        bob.open_direct("alice")
        wait_for(alice, C.DirectReady, peer="bob")
        wait_for(bob, C.DirectReady, peer="alice")
        for i in range(5):
            alice.send_message("bob", f"a{i}")
            bob.send_message("alice", f"b{i}")
        assert [wait_for(bob, C.MessageReceived).text for _ in range(5)] == [f"a{i}" for i in range(5)]
        assert [wait_for(alice, C.MessageReceived).text for _ in range(5)] == [f"b{i}" for i in range(5)]
        alice.close()
        bob.close()


def test_tickets_expire_and_only_the_peer_can_open_them():
    key = cu.random_bytes(32)
    t = D.seal_ticket(key, initiator="alice", host="10.0.0.2", port=4000, conversation_id=7, now_s=1000)
    opened = D.open_ticket(key, t, now_s=1010)
    assert (opened.initiator, opened.host, opened.port, opened.conversation_id) == (
        "alice",
        "10.0.0.2",
        4000,
        7,
    )
    with pytest.raises(Exception, match="expired"):
        D.open_ticket(key, t, now_s=1000 + D.TICKET_LIFETIME_S + 1)  # replayed later
    with pytest.raises(Exception, match="refused"):
        D.open_ticket(cu.random_bytes(32), t, now_s=1010)  # someone else's key
    assert b"alice" not in t


@pytest.mark.parametrize("port", [0, 65536, 2**32 - 1])
def test_bad_endpoint_ports_are_refused(tmp_path, port):
    with running_server(tmp_path / "srv") as server:
        alice = logged_in_client(server, tmp_path / "a", "alice")
        alice.send_frame(P.RegisterEndpoint(port=port))
        assert "between 1 and 65535" in wait_for(alice, C.ServerNotice).text
        assert server.service.registry.session_of("alice").udp_port is None
        alice.close()


def test_direct_request_for_offline_or_unknown_peer(tmp_path):
    with running_server(tmp_path / "srv") as server:
        alice = logged_in_client(server, tmp_path / "a", "alice")
        _enable_direct(alice)
        for peer in ("nobody", "x" * 32):
            alice.open_direct(peer)
            assert "offline" in wait_for(alice, C.DirectFallback, peer=peer).reason
        alice.close()
