"""One chat user inside a network namespace, for test_netns.py.  Prints JSON lines.

    python netns_peer.py HOST PORT USER PEER send|receive COUNT HOME

"send" waits for a line "go" on stdin, opens a conversation and a direct link to
PEER, sends COUNT messages and reports; "receive" reports each message it gets,
then keeps acknowledging until a line on stdin.
Every wait is bounded.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from secureim import client as C

TIMEOUT_S = 60


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def main() -> int:
    host, port, user, peer, mode, count, home = sys.argv[1:8]
    count = int(count)
    client = C.ChatClient(host, int(port), home=Path(home), persist_identity=False)
    client.connect()
    client.register(user, "netns-password")
    client.start()
    client.enable_direct()
    say(event="ready")
    deadline = time.monotonic() + TIMEOUT_S
    if mode == "send":
        if sys.stdin.readline().strip() != "go":
            return 2
        client.open_conversation(peer)
        while time.monotonic() < deadline:
            e = client.next_event(timeout=1)
            if isinstance(e, C.ConversationReady):
                client.open_direct(peer)
            elif isinstance(e, C.DirectReady):
                say(event="direct")
                break
            elif isinstance(e, C.DirectFallback):
                say(event="fallback", reason=e.reason)
                return 1
        for i in range(count):
            client.send_message(peer, f"m{i}")
        undelivered = 0
        while time.monotonic() < deadline:
            e = client.next_event(timeout=1)
            if isinstance(e, C.MessageUndelivered):
                undelivered += 1
            if e is None and _all_acked(client, peer):
                break
        say(event="sent", count=count, undelivered=undelivered)
    else:
        got = 0
        while got < count and time.monotonic() < deadline:
            e = client.next_event(timeout=1)
            if isinstance(e, C.MessageReceived):
                got += 1
                say(event="message", text=e.text, direct=e.direct)
        say(event="done", received=got)
        sys.stdin.readline()  # keep acknowledging until the test says the sender is finished
    client.close()
    return 0


def _all_acked(client: C.ChatClient, peer: str) -> bool:
    with client.direct.lock:
        link = client.direct.links._links.get(peer) if client.direct.links else None
        return link is not None and not link.channel._outgoing


if __name__ == "__main__":
    sys.exit(main())
