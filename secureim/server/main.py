"""``python server.py``: the command line, logging, and the process's life."""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time

from secureim.errors import (
    SecureIMError,
)
from secureim.server import admin, workers
from secureim.server.admin import AdminOps
from secureim.server.config import TIME_FORMAT
from secureim.server.console import ServerConsole
from secureim.server.net import Server
from secureim.server.options import build_arg_parser, config_from_args

log = logging.getLogger("secureim.server")


# =============================================================================
# Command line
# =============================================================================


class LinePrinter:
    """Console lines from the loop and the workers, printed by a thread of their own, so a slow
    terminal or a pipe nobody reads never stalls the server.  Bounded: past MAX_LINES waiting, a
    line is dropped and counted (the count is printed with the next line that fits)."""

    MAX_LINES = 10_000

    def __init__(self) -> None:
        self._lines: queue.Queue[str] = queue.Queue(maxsize=self.MAX_LINES)
        self._dropped = 0
        threading.Thread(target=self._run, name="console-out", daemon=True).start()

    def put(self, line: str) -> None:
        try:
            self._lines.put_nowait(f"{time.strftime(TIME_FORMAT)} {line}")
        except queue.Full:
            self._dropped += 1

    def _run(self) -> None:
        while True:
            line = self._lines.get()
            if self._dropped:
                dropped, self._dropped = self._dropped, 0
                print(
                    f"{time.strftime(TIME_FORMAT)} [SERVER]: ({dropped} console lines dropped: the "
                    "console was not read)",
                    flush=True,
                )
            print(line, flush=True)
            self._lines.task_done()

    def drain(self, timeout_s: float = 5.0) -> None:
        """Wait (bounded) until every waiting line is printed."""
        deadline = time.monotonic() + timeout_s
        while self._lines.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)


def _raise_fd_limit() -> None:
    """One descriptor per connection: lift the soft limit (often 1,024) to the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, OSError, ValueError):  # not POSIX, or not allowed: keep what we have
        pass


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):  # noqa: ARG001 - signal handler signature
    raise _Stop()


def _stdin_is_our_terminal() -> bool:
    """A terminal, and we are in its foreground (``server.py &`` must not stop on reading it)."""
    try:
        return (
            sys.stdin is not None and sys.stdin.isatty() and os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
        )
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["admin"]:  # the operator's command line (admin.py)
        return admin.main(argv[1:])
    args = build_arg_parser().parse_args(argv)
    if args.workers > 1:
        return workers.supervise(args, argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt=TIME_FORMAT
    )

    def say(line: str) -> None:
        print(f"{time.strftime(TIME_FORMAT)} {line}", flush=True)

    say("[SERVER]: Initializing...")
    _raise_fd_limit()
    try:
        config = config_from_args(args)
        printer = LinePrinter()
        server = Server(config, announce=printer.put)
        host, port = server.start()
    except (SecureIMError, OSError) as exc:
        print(f"{time.strftime(TIME_FORMAT)} [SERVER]: Cannot start: {exc}", file=sys.stderr, flush=True)
        return 1
    say("[SERVER]: Initialization complete.")
    say(f"[SERVER]: Listening on {host}:{port} ({config.cipher}, database: {server.storage.backend}).")
    say(f"[SERVER]: Server identity fingerprint: {server.fingerprint}")
    if server.metrics_endpoint is not None:
        say(
            f"[SERVER]: Metrics on http://127.0.0.1:{server.metrics_endpoint.port}/metrics"
            f" (health: /healthz)."
        )
    if args.console == "on" or (args.console == "auto" and _stdin_is_our_terminal()):
        if hasattr(
            signal, "SIGTTIN"
        ):  # sent to the background later: a read fails (the console ends), no stop
            signal.signal(signal.SIGTTIN, signal.SIG_IGN)
        ServerConsole(
            AdminOps(server.storage, "console", bcrypt_cost=config.bcrypt_cost), sys.stdin, say
        ).start()
        say("[SERVER]: Console ready; type /help.")
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:  # "Ready" inside the try: a SIGTERM right after it still stops cleanly
        say("[SERVER]: Ready to accept connections.")
        server.serve_forever()
    except _Stop:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        say("[SERVER]: Shutting down...")
        server.shutdown()
        printer.drain()
        say("[SERVER]: Stopped.")
    return 0


def run() -> None:
    """``python server.py`` and the ``secureim-server`` command."""
    sys.exit(main())
