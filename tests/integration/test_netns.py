"""Direct mode between separate hosts: network namespaces joined by a switch.

The server, alice and bob each get a namespace (ip netns, veth pairs to a bridge
in a fourth namespace), made and removed by the test.  Skipped, with the reason,
only where namespaces cannot be made (not root, no iproute2); under REQUIRE_NETNS=1
(as in CI) that is a failure instead.  Addresses are the
test's own (10.199.0.0/24 inside its namespaces); nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())
HOSTS = {"srv": "10.199.0.1", "alice": "10.199.0.2", "bob": "10.199.0.3"}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


class Namespaces:
    """Three hosts joined by a switch in a fourth namespace: the kernel's bridge, or
    (``userspace_switch``) the impairing switch below, on the same veth ports."""

    def __init__(self, userspace_switch: bool = False) -> None:
        tag = secrets.token_hex(3)
        self.ns = {name: f"sim{tag}{name}" for name in (*HOSTS, "br")}
        self.veth = {name: f"v{tag}{name[:3]}" for name in HOSTS}
        self.made: list[str] = []
        try:
            for ns in self.ns.values():
                _ip("netns", "add", ns)
                self.made.append(ns)
            br = self.ns["br"]
            if not userspace_switch:
                _ip("-n", br, "link", "add", "br0", "type", "bridge")
                _ip("-n", br, "link", "set", "br0", "up")
            for name, addr in HOSTS.items():
                ns, host_if = self.ns[name], self.veth[name]
                _ip("link", "add", host_if, "type", "veth", "peer", "name", host_if + "b")
                _ip("link", "set", host_if, "netns", ns)
                _ip("link", "set", host_if + "b", "netns", br)
                if not userspace_switch:
                    _ip("-n", br, "link", "set", host_if + "b", "master", "br0")
                _ip("-n", br, "link", "set", host_if + "b", "promisc", "on", "up")
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", host_if)
                _ip("-n", ns, "link", "set", host_if, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except (subprocess.CalledProcessError, FileNotFoundError, OSError) as exc:
            self.remove()
            detail = getattr(exc, "stderr", "") or str(exc)
            _skip_or_fail(f"network namespaces cannot be made here: {detail.strip()}")

    def tx_checksum_off(self) -> None:
        """A userspace switch forwards frames as the host's veth handed them over, with the
        checksum left to offload, so the receiver would drop them: compute checksums in
        software instead (what `ethtool -K IF tx off` does, through the same ioctl)."""
        for name, host_if in self.veth.items():
            subprocess.run(
                ["ip", "netns", "exec", self.ns[name], sys.executable, "-c", TX_CSUM_OFF, host_if],
                check=True,
                capture_output=True,
                timeout=20,
            )

    def run(self, name: str, *argv: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns[name], *argv], text=True, **kw)

    def remove(self) -> None:
        for ns in self.made:
            _ip("netns", "del", ns, check=False)  # deleting a namespace removes its veths


def _skip_or_fail(reason: str) -> None:
    """Skip, with the reason; under REQUIRE_NETNS=1 (CI), fail instead (as REQUIRE_MYSQL=1 does)."""
    if os.environ.get("REQUIRE_NETNS") == "1":
        pytest.fail(f"REQUIRE_NETNS=1 but {reason}")
    pytest.skip(f"{reason}; set REQUIRE_NETNS=1 to fail")


def _need_namespaces() -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        _skip_or_fail("network namespaces need root and iproute2 (ip)")


@pytest.fixture
def hosts():
    _need_namespaces()
    n = Namespaces()
    yield n
    n.remove()


TX_CSUM_OFF = r"""
import ctypes, fcntl, socket, struct, sys
SIOCETHTOOL, ETHTOOL_STXCSUM = 0x8946, 0x17
value = ctypes.create_string_buffer(struct.pack("II", ETHTOOL_STXCSUM, 0))
ifreq = struct.pack("16sP", sys.argv[1].encode(), ctypes.addressof(value)).ljust(40, b"\0")
fcntl.ioctl(socket.socket(socket.AF_INET, socket.SOCK_DGRAM), SIOCETHTOOL, ifreq)
"""


# A learning Ethernet switch over raw sockets that impairs UDP frames the way netem would:
# 20 % loss, 10 % duplication, and a random 0-40 ms delay per frame (so frames reorder).
# Seeded, bounded by its stdin: it stops when the test closes that.
SWITCH = r"""
import heapq, random, select, socket, sys, time
ports = sys.argv[1:]
rng = random.Random(1234)
socks = {}
for name in ports:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind((name, 0))
    socks[s] = name
where, queue, n = {}, [], 0
stats = {"udp": 0, "dropped": 0, "duplicated": 0}
print("switching", flush=True)
def forward(frame, src):
    dst = frame[0:6]
    outs = [where[dst]] if dst in where else [x for x in socks if x is not src]
    for out in outs:
        if out is not src:
            out.send(frame)
while True:
    timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else 0.05
    ready, _, _ = select.select(list(socks) + [sys.stdin], [], [], timeout)
    if sys.stdin in ready:
        break
    for s in ready:
        frame, addr = s.recvfrom(65535)
        if addr[2] == socket.PACKET_OUTGOING:
            continue
        where[frame[6:12]] = s
        if len(frame) > 23 and frame[12:14] == b"\x08\x00" and frame[23] == 17:   # IPv4 UDP
            stats["udp"] += 1
            if rng.random() < 0.20:
                stats["dropped"] += 1
                continue
            copies = 2 if rng.random() < 0.10 else 1
            stats["duplicated"] += copies - 1
            for _ in range(copies):
                n += 1
                heapq.heappush(queue, (time.monotonic() + rng.uniform(0, 0.04), n, frame, s))
        else:
            forward(frame, s)
    now = time.monotonic()
    while queue and queue[0][0] <= now:
        _t, _n, frame, src = heapq.heappop(queue)
        forward(frame, src)
print(stats["udp"], stats["dropped"], stats["duplicated"], flush=True)
"""


CAPTURE = r"""
import socket, sys, select, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind((sys.argv[1], 0))
udp = tcp = 0
print("capturing", flush=True)
while True:
    r, _, _ = select.select([s, sys.stdin], [], [], 30)
    if sys.stdin in r or not r:
        break
    frame = s.recv(65535)
    if len(frame) > 23 and frame[12:14] == b"\x08\x00":  # IPv4
        udp += frame[23] == 17
        tcp += frame[23] == 6
print(udp, tcp, flush=True)
"""


def _start_server(hosts, data_dir: Path):
    proc = hosts.run(
        "srv",
        sys.executable,
        str(ROOT / "server.py"),
        "--host",
        HOSTS["srv"],
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        "--bcrypt-cost",
        "4",
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    port = None
    for line in proc.stdout:
        found = re.search(r"Listening on [\d.]+:(\d+)", line)  # the line starts with a timestamp
        if found:
            port = int(found.group(1))
        if "Ready to accept" in line:
            break
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, port


def _peer(hosts, name, port, peer, mode, count, home):
    return hosts.run(
        name,
        sys.executable,
        str(ROOT / "tests" / "netns_peer.py"),
        HOSTS["srv"],
        str(port),
        name,
        peer,
        mode,
        str(count),
        str(home),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def _lines(proc):
    for line in proc.stdout:
        yield json.loads(line)


def _chat(hosts, tmp_path, count):
    server, port = _start_server(hosts, tmp_path / "srv")
    bob = _peer(hosts, "bob", port, "alice", "receive", count, tmp_path / "bob")
    alice = _peer(hosts, "alice", port, "bob", "send", count, tmp_path / "alice")
    try:
        bob_out, alice_out = _lines(bob), _lines(alice)
        assert next(bob_out)["event"] == "ready" and next(alice_out)["event"] == "ready"
        capture = hosts.run(
            "srv",
            sys.executable,
            "-c",
            CAPTURE,
            hosts.veth["srv"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert capture.stdout.readline().strip() == "capturing"
        alice.stdin.write("go\n")
        alice.stdin.flush()
        assert next(alice_out) == {"event": "direct"}
        received = []
        for event in bob_out:
            if event["event"] == "message":
                received.append((event["text"], event["direct"]))
            if event["event"] == "done":
                break
        sent = next(alice_out)
        bob.stdin.write("quit\n")
        bob.stdin.flush()
        capture.stdin.write("stop\n")
        capture.stdin.flush()
        udp_at_server, tcp_at_server = map(int, capture.stdout.readline().split())
        assert tcp_at_server > 0  # the capture was live: it saw the clients' sessions with the server
        return received, sent, udp_at_server
    finally:
        for p in (alice, bob):
            p.kill()
            p.wait(timeout=10)
        server.terminate()
        server.wait(timeout=20)


def test_direct_messages_never_touch_the_server_host(hosts, tmp_path):
    received, sent, udp_at_server = _chat(hosts, tmp_path, count=30)
    assert received == [(f"m{i}", True) for i in range(30)]  # every message, once, in order, direct
    assert sent["undelivered"] == 0
    assert udp_at_server == 0  # the capture on the server's interface holds no datagram at all


def test_direct_mode_survives_loss_duplication_and_reordering(tmp_path):
    """20 % loss, duplication and reordering on the path between the hosts: every message
    arrives once, in order, directly.  tc netem where the kernel has it; else the same
    impairment applied by a userspace switch between the namespaces."""
    _need_namespaces()
    probe = Namespaces()
    netem = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            probe.ns["alice"],
            "tc",
            "qdisc",
            "add",
            "dev",
            probe.veth["alice"],
            "root",
            "netem",
            "loss",
            "20%",
            "duplicate",
            "10%",
            "delay",
            "20ms",
            "10ms",
            "reorder",
            "25%",
        ],
        capture_output=True,
        text=True,
    )
    if netem.returncode == 0:
        try:
            received, sent, _udp = _chat(probe, tmp_path, count=60)
        finally:
            probe.remove()
    else:
        probe.remove()
        hosts = Namespaces(userspace_switch=True)
        hosts.tx_checksum_off()
        switch = hosts.run(
            "br",
            sys.executable,
            "-c",
            SWITCH,
            *(v + "b" for v in hosts.veth.values()),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert switch.stdout.readline().strip() == "switching"
            received, sent, _udp = _chat(hosts, tmp_path, count=60)
            switch.stdin.write("stop\n")
            switch.stdin.flush()
            udp, dropped, duplicated = map(int, switch.stdout.readline().split())
            assert dropped > 0 and duplicated > 0 and udp > 60  # the path really was impaired
        finally:
            switch.kill()
            switch.wait(timeout=10)
            hosts.remove()
    assert received == [(f"m{i}", True) for i in range(60)]
    assert sent["undelivered"] == 0
