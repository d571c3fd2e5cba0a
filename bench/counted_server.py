"""The server as the benchmarks run it: server.py's own main, plus its work counters written at exit.

    python bench/counted_server.py --counters PATH [server.py options]

On a clean stop (SIGTERM or SIGINT) it writes ``{"bcrypt_runs_serving": N, ...}`` to PATH:
how many bcrypt hashes and checks this server process ran after startup (auth.bcrypt_runs;
startup itself hashes one dummy password), so a benchmark
can state that a reconnect storm cost no password checks instead of assuming it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import auth  # noqa: E402
import server  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--counters", type=Path, required=True)
    ours, rest = parser.parse_known_args()
    at_start = [0]
    original_start = server.Server.start

    def start(self):
        # Startup hashes the dummy password once (auth.AuthService); only what follows is serving.
        at_start[0] = auth.bcrypt_runs()
        return original_start(self)

    server.Server.start = start
    try:
        return server.main(rest)
    finally:
        total = auth.bcrypt_runs()
        ours.counters.write_text(json.dumps({"bcrypt_runs_at_start": at_start[0],
                                             "bcrypt_runs_serving": total - at_start[0]}))


if __name__ == "__main__":
    sys.exit(main())
