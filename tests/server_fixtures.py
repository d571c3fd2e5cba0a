"""A real server on a loopback port (0 = any free one), in-process, for integration tests."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

from secureim import client as clientlib
from secureim.server.config import ServerConfig
from secureim.server.net import Server

TEST_BCRYPT_COST = 4
PASSWORD = "correct horse battery"


@contextmanager
def running_server(data_dir: Path, port: int = 0, **overrides):
    config = ServerConfig(
        host="127.0.0.1", port=port, data_dir=data_dir, bcrypt_cost=TEST_BCRYPT_COST, **overrides
    )
    server = Server(config)
    server.start()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(timeout=10)


class RecordingSuite:
    """Wraps the server's suite and records every conversation key the KDC generates."""

    def __init__(self, suite):
        self._suite = suite
        self.keys = []

    def generate_key(self):
        key = self._suite.generate_key()
        self.keys.append(key)
        return key

    def __getattr__(self, name):
        return getattr(self._suite, name)


def make_client(server, home: Path, **kw) -> clientlib.ChatClient:
    host, port = server.server_address
    client = clientlib.ChatClient(host, port, home=home, **kw)
    client.connect()
    return client


def logged_in_client(
    server, home: Path, username: str, *, register: bool = True, password: str = PASSWORD, **kw
) -> clientlib.ChatClient:
    client = make_client(server, home, **kw)
    (client.register if register else client.login)(username, password)
    client.start()
    return client


def chat_pair(server, home_root: Path, names=("alice", "bob")):
    """Two registered users with an open, end-to-end secured conversation."""
    a = logged_in_client(server, home_root / names[0], names[0])
    b = logged_in_client(server, home_root / names[1], names[1])
    a.open_conversation(names[1])
    wait_for(a, clientlib.ConversationReady, peer=names[1])
    ready = wait_for(b, clientlib.ConversationReady, peer=names[0])
    assert ready.opened_by_peer
    return a, b


def wait_for(client: clientlib.ChatClient, kind, timeout: float = 10.0, **fields):
    """Take events until one of type ``kind`` with ``fields`` arrives; fail on timeout."""
    seen = []
    while True:
        event = client.next_event(timeout=timeout)
        if event is None:
            raise AssertionError(f"no {kind.__name__} {fields} within {timeout}s; saw {seen}")
        if isinstance(event, kind) and all(getattr(event, k) == v for k, v in fields.items()):
            return event
        seen.append(event)
