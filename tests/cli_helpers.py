"""Drive the real server.py and client.py as processes (the client in a pseudo-terminal)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pexpect

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 20
SERVER_STAMP = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} ")  # before every [SERVER]: line


def unstamped(lines: list[str]) -> list[str]:
    """The server's console lines without their timestamps."""
    return [SERVER_STAMP.sub("", line) for line in lines]


LIVE_SERVERS: list[ServerProcess] = []  # stopped after every test, whatever happened (conftest.py)


class ServerProcess:
    """``python server.py --port 0``; ready once it prints "Ready to accept connections."."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.data_dir = data_dir
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "server.py"),
                "--port",
                "0",
                "--data-dir",
                str(data_dir),
                "--bcrypt-cost",
                "4",
                *extra,
            ],
            stdin=subprocess.DEVNULL,  # never the developer's terminal: no server console in tests
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(data_dir.parent),
        )
        LIVE_SERVERS.append(self)
        self.lines: list[str] = []
        for line in self._read_until("[SERVER]: Ready to accept connections."):
            m = re.search(r"Listening on ([\d.]+):(\d+)", line)
            if m:
                self.host, self.port = m.group(1), int(m.group(2))
            m = re.search(r"fingerprint: (SHA256:\S+)", line)
            if m:
                self.fingerprint = m.group(1)

    def _read_until(self, marker: str):
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"server exited early: {self.lines} {self.proc.stderr.read()}")
            self.lines.append(line.rstrip("\n"))
            yield line
            if marker in line:
                return

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        self.lines += out.splitlines()
        self.errors = err  # the log (stderr)
        return self.proc.returncode


def spawn_client(
    server: ServerProcess | None, home: Path, *extra: str, port: int | None = None, cwd: Path | None = None
) -> pexpect.spawn:
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm", COLUMNS="200", LINES="50")
    args = [
        str(ROOT / "client.py"),
        "--home",
        str(home),
        "--port",
        str(port if port is not None else server.port),
        *extra,
    ]
    child = pexpect.spawn(
        sys.executable,
        args,
        env=env,
        encoding="utf-8",
        timeout=TIMEOUT_S,
        dimensions=(50, 200),
        cwd=str(cwd or home.parent),
    )
    return child


def login_flow(child: pexpect.spawn, username: str, password: str, *, new: bool) -> None:
    child.expect_exact("[CLIENT]: Connection successful.")
    child.expect_exact("[CLIENT]: Username:")
    child.sendline(username)
    child.expect_exact("[CLIENT]: Password:")
    child.sendline(password)
    if new:
        child.expect_exact("Unknown user or wrong password.")
        child.expect_exact("(y/n)")
        child.sendline("y")
        child.expect("Confirm")
        child.sendline(password)
        child.expect_exact("[CLIENT]: Account created.")
    child.expect_exact("[CLIENT]: User logged in successfully.")


def quit_client(child: pexpect.spawn) -> int:
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus
