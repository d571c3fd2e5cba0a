"""The values the service binds late and its handlers read per call: the loop, the worker pool,
the cluster, the node name and the cipher suite; and the two ways to move work between threads."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import crypto_utils as cu
from secureim.server.cluster.local import Cluster

log = logging.getLogger("secureim.server")


class Runtime:
    """One object, seen by each handler through the narrow Protocols of ports.py.

    ``suite``, ``cluster``, ``node``, ``loop_thread_id`` are re-bound after construction (tests,
    ``Server.start``): handlers read them from here at call time and never keep a copy."""

    def __init__(self, cluster: Cluster, node: str, suite: cu.Suite) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread_id: int | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.cluster = cluster
        self.node = node
        self.suite = suite

    def attach(
        self, loop: asyncio.AbstractEventLoop, loop_thread_id: int | None, pool: ThreadPoolExecutor
    ) -> None:
        self.loop, self.loop_thread_id, self.pool = loop, loop_thread_id, pool

    def on_loop(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn`` on the loop thread (now, if this is it): relays run there, so it runs between them."""
        if self.loop is None or threading.get_ident() == self.loop_thread_id:
            fn(*args)
            return
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop has stopped
            pass

    def on_loop_thread(self) -> bool:
        """A loop is attached and this is its thread (unlike ``on_loop``, detached is not "the loop")."""
        return self.loop is not None and threading.get_ident() == self.loop_thread_id

    def call_later(self, delay_s: float, fn: Callable[..., object], *args: object) -> None:
        assert self.loop is not None
        self.loop.call_later(delay_s, fn, *args)

    def run_slow(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn`` on a worker thread (database, KDC); at once when no pool is attached (tests)."""
        if self.pool is None:
            fn(*args)
            return
        try:
            self.pool.submit(self._guarded, fn, *args)
        except RuntimeError:  # shutting down
            pass

    @staticmethod
    def _guarded(fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("background task failed")
