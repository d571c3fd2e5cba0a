"""``python server.py --workers N``: N server processes on one port, and the process that minds them.

Each worker is a whole server (``server.py`` with ``--workers 1``) that binds the
same port with SO_REUSEPORT, so the kernel spreads new connections across them.
Users on different workers reach each other through the cluster bus, so more
than one worker needs ``--cluster`` (docs/SCALING.md).  This supervisor starts
them, prints their lines with a ``[worker I]`` prefix, says Ready once every
worker is, restarts a worker that dies (at most ``MAX_RESTARTS`` a minute), and
on SIGTERM or Ctrl-C stops them all.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from secureim.errors import SecureIMError
from secureim.server.config import TIME_FORMAT
from secureim.server.options import config_from_args

MAX_RESTARTS = 5
STOP_GRACE_S = 10.0
READY = "Ready to accept connections."
SERVER = str(Path(__file__).resolve().parents[2] / "server.py")  # the entry point beside the package


def _say(line: str, *, err: bool = False) -> None:
    print(f"{time.strftime(TIME_FORMAT)} {line}", file=sys.stderr if err else sys.stdout, flush=True)


class Worker:
    def __init__(self, index: int, argv: list[str]) -> None:
        self.index, self.argv = index, argv
        self.ready = threading.Event()
        self.proc: subprocess.Popen | None = None
        self.restarts: list[float] = []

    def start(self) -> None:
        self.ready.clear()
        self.proc = subprocess.Popen(
            [sys.executable, SERVER, *self.argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        threading.Thread(target=self._relay_output, args=(self.proc,), daemon=True).start()

    def _relay_output(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            # The worker's own timestamp stays; the prefix says which worker spoke.
            stamp, _, rest = line.partition(" [") if line[:4].isdigit() else ("", "", line)
            text = f"[{rest}" if stamp else rest
            print(f"{stamp or time.strftime(TIME_FORMAT)} [worker {self.index}] {text}", flush=True)
            if READY in line:
                self.ready.set()


def supervise(args: argparse.Namespace, argv: list[str]) -> int:
    if not args.cluster_url:
        _say(
            f"[SERVER]: Cannot start: --workers {args.workers} needs --cluster nats://HOST:PORT "
            "(the workers reach each other's users over NATS) and a MySQL/MariaDB --db.",
            err=True,
        )
        return 1
    try:
        config_from_args(args)  # every mistake in one line from here, not N times from the workers
    except SecureIMError as exc:
        _say(f"[SERVER]: Cannot start: {exc}", err=True)
        return 1
    # Port 0: pick the port here and hold it (bound, not listening: it takes no connections)
    # until every worker listens on it.
    hold = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        hold.bind((args.host, args.port))
    except OSError as exc:
        _say(f"[SERVER]: Cannot start: {args.host}:{args.port}: {exc.strerror or exc}", err=True)
        return 1
    port = hold.getsockname()[1]
    base = args.node_name or f"{socket.gethostname()}:{port}"
    workers = []
    for i in range(args.workers):
        extra = [
            "--workers",
            "1",
            "--port",
            str(port),
            "--reuse-port",
            "--console",
            "off",
            "--node-name",
            f"{base}/w{i}"[:64],
        ]
        if args.metrics_port:  # one endpoint per worker: PORT, PORT+1, ...
            extra += ["--metrics-port", str(args.metrics_port + i)]
        workers.append(Worker(i, [*argv, *extra]))  # argparse: the last occurrence of an option wins

    stopping = threading.Event()

    def stop(signum, frame):  # noqa: ARG001
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _say(f"[SERVER]: Starting {len(workers)} workers on {args.host}:{port}...")
    for w in workers:
        w.start()
    deadline = time.monotonic() + 60
    while not stopping.is_set() and not all(w.ready.is_set() for w in workers):
        dead = [w for w in workers if w.proc is not None and w.proc.poll() is not None]
        if dead or time.monotonic() > deadline:
            _say("[SERVER]: Cannot start: a worker did not start (see its lines above).", err=True)
            _stop_all(workers)
            return 1
        time.sleep(0.05)
    hold.close()
    if not stopping.is_set():
        _say(
            f"[SERVER]: Listening on {args.host}:{port} ({len(workers)} workers, cluster {args.cluster_url})."
        )
        _say(f"[SERVER]: {READY}")
    while not stopping.is_set():
        for w in workers:
            if w.proc is not None and w.proc.poll() is not None and not stopping.is_set():
                now = time.monotonic()
                w.restarts = [t for t in w.restarts if now - t < 60] + [now]
                if len(w.restarts) > MAX_RESTARTS:
                    _say(f"[SERVER]: worker {w.index} keeps failing; stopping.", err=True)
                    _stop_all(workers)
                    return 1
                _say(f"[SERVER]: worker {w.index} exited with status {w.proc.returncode}; restarting it.")
                w.start()
        stopping.wait(0.2)
    _say("[SERVER]: Shutting down...")
    _stop_all(workers)
    _say("[SERVER]: Stopped.")
    return 0


def _stop_all(workers: list[Worker]) -> None:
    for w in workers:
        if w.proc is not None and w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for w in workers:
        if w.proc is None:
            continue
        try:
            w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()
