"""A cluster for tests: server.py nodes as processes on one NATS (a per-run prefix) and one MariaDB database."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

import crypto_utils as cu
from cli_helpers import ServerProcess
from db_fixtures import mysql_url

NATS_HOST = os.environ.get("SECUREIM_TEST_NATS_HOST", "127.0.0.1")
NATS_PORT = int(os.environ.get("SECUREIM_TEST_NATS_PORT", "4222"))
NATS_URL = f"nats://{NATS_HOST}:{NATS_PORT}"


def _require_nats(why: str) -> None:
    if os.environ.get("REQUIRE_NATS") == "1":
        pytest.fail(f"REQUIRE_NATS=1 but {why}")
    pytest.skip(f"{why}; set REQUIRE_NATS=1 to fail")


def shared_nats_url() -> str:
    """The machine's NATS server, or skip (fail under REQUIRE_NATS=1)."""
    try:
        socket.create_connection((NATS_HOST, NATS_PORT), timeout=3).close()
    except OSError as exc:
        _require_nats(f"NATS at {NATS_URL} is unreachable ({exc})")
    return NATS_URL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnNats:
    """A nats-server of the test's own on a free port, to stop and start again."""

    def __init__(self, workdir: Path) -> None:
        self.binary = shutil.which("nats-server") or ("/usr/sbin/nats-server"
                                                      if Path("/usr/sbin/nats-server").exists() else None)
        if self.binary is None:
            _require_nats("no nats-server binary to start a private one")
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "-a", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:  # bounded: the port answers, or the test fails
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError("the private nats-server did not start")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


class Cluster:
    """Nodes that share one identity key, one database and one NATS subject prefix."""

    def __init__(self, root: Path, database: str, nats_url: str) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.identity = root / "service_identity.key"
        cu.load_or_create_identity(self.identity)
        self.db_url = mysql_url(database)
        self.nats_url = nats_url
        self.prefix = f"t{secrets.token_hex(4)}"  # this run's subjects only
        self.nodes: list[ServerProcess] = []

    def node(self, *extra: str) -> ServerProcess:
        data_dir = self.root / f"node{len(self.nodes) + 1}"
        node = ServerProcess(data_dir, "--identity-key", str(self.identity), "--db", self.db_url,
                             "--cluster", self.nats_url, "--cluster-prefix", self.prefix, *extra)
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
