"""The server as the benchmarks run it: server.py's own main, plus its work counters.

    python bench/counted_server.py --counters PATH [server.py options]

It writes ``{"bcrypt_runs_serving": N, ...}`` to PATH: how many bcrypt hashes and
checks this server process ran after startup (auth.bcrypt_runs; startup itself
hashes one dummy password), so a benchmark can state that a reconnect storm cost
no password checks instead of assuming it.  The file is rewritten (atomically)
within a quarter second of every change while the server runs, and once more on
a clean stop (SIGTERM or SIGINT), so a benchmark can read it mid-run and a
process killed with SIGKILL still leaves its last count.

With ``--workers N`` this process is the supervisor: each worker runs through
this file too, with its own counters at ``PATH.wI`` (I = the worker's index).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from secureim.server import accounts as auth
from secureim.server import main as server_main
from secureim.server import net as server_net

WRITE_EVERY_S = 0.25


def _write(path: Path, at_start: int) -> None:
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(
        json.dumps({"bcrypt_runs_at_start": at_start, "bcrypt_runs_serving": auth.bcrypt_runs() - at_start})
    )
    os.replace(tmp, path)


def _count_workers(counters: Path) -> None:
    """Supervisor: start every worker through this file, each with its own counters file."""
    from secureim.server import workers as workers

    workers.SERVER = str(Path(__file__).resolve())
    original_init = workers.Worker.__init__

    def init(self, index, argv):
        original_init(self, index, ["--counters", f"{counters}.w{index}", *argv])

    workers.Worker.__init__ = init


def main() -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--counters", type=Path, required=True)
    ours, rest = parser.parse_known_args()
    at_start = [0]
    stop = threading.Event()
    original_start = server_net.Server.start

    def writer() -> None:
        last = None
        while not stop.wait(WRITE_EVERY_S):  # bounded by the process: a daemon thread
            now = auth.bcrypt_runs()
            if now != last:
                _write(ours.counters, at_start[0])
                last = now

    def start(self):
        # Startup hashes the dummy password once (auth.AuthService); only what follows is serving.
        at_start[0] = auth.bcrypt_runs()
        _write(ours.counters, at_start[0])
        threading.Thread(target=writer, name="bench-counters", daemon=True).start()
        return original_start(self)

    server_net.Server.start = start
    _count_workers(ours.counters)
    try:
        return server_main.main(rest)
    finally:
        stop.set()
        _write(ours.counters, at_start[0])


if __name__ == "__main__":
    sys.exit(main())
