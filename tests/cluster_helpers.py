"""A cluster for tests: server.py nodes as processes on one NATS (a per-run prefix) and one MariaDB database."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from cli_helpers import ServerProcess
from db_fixtures import mysql_url

import crypto_utils as cu

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
        self.binary = shutil.which("nats-server") or (
            "/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None
        )
        if self.binary is None:
            _require_nats("no nats-server binary to start a private one")
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        """Start it and wait for its own "Server is ready" line (its log goes to stderr)."""
        self.proc = subprocess.Popen(
            [self.binary, "-a", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        ready = threading.Event()

        def read_log(stream) -> None:  # and keep reading, so the pipe never fills
            for line in stream:
                if "Server is ready" in line:
                    ready.set()

        threading.Thread(target=read_log, args=(self.proc.stderr,), daemon=True).start()
        if not ready.wait(timeout=10) or self.proc.poll() is not None:
            raise AssertionError("the private nats-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


class ClusterNode(ServerProcess):
    """A node whose log (stderr) is read as it comes, so a test can wait for a line of it."""

    def __init__(self, *args: str | Path) -> None:
        super().__init__(*args)
        self.log: list[str] = []
        self._logged = threading.Condition()
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            with self._logged:
                self.log.append(line.rstrip("\n"))
                self._logged.notify_all()

    def wait_log(self, text: str, *, after: int = 0, timeout_s: float = 20.0) -> int:
        """Wait for a log line containing ``text`` past line ``after``; its index."""
        with self._logged:
            found = self._logged.wait_for(
                lambda: (
                    next((i for i in range(after, len(self.log)) if text in self.log[i]), None) is not None
                ),
                timeout=timeout_s,
            )
            if not found:
                raise AssertionError(f"no log line {text!r} within {timeout_s}s: {self.log[after:]}")
            return next(i for i in range(after, len(self.log)) if text in self.log[i])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self._reader.join(timeout=5)
        self.lines += out.splitlines()
        self.errors = "\n".join(self.log)
        return self.proc.returncode


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

    def node(self, *extra: str) -> ClusterNode:
        data_dir = self.root / f"node{len(self.nodes) + 1}"
        node = ClusterNode(
            data_dir,
            "--identity-key",
            str(self.identity),
            "--db",
            self.db_url,
            "--cluster",
            self.nats_url,
            "--cluster-prefix",
            self.prefix,
            *extra,
        )
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
