"""Metrics and health for operators: Prometheus text format and /healthz on 127.0.0.1 (``--metrics-port``).

``ServerMetrics`` holds the counters the server moves (one registry per server,
so several servers in one test process do not mix); ``MetricsEndpoint`` serves
``GET /metrics`` (Prometheus text format) and ``GET /healthz`` (200 ``ok`` when
the database answers and the server accepts connections, 503 with the reason
otherwise: what a load balancer's HTTP health check wants).  Loopback only: the
numbers say who is busy, so they are not for the whole network.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger("secureim.metrics")

METRICS_HOST = "127.0.0.1"


class _CallbackCounter:
    """A counter whose value a callback reads when Prometheus scrapes (a collector)."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self._name, self._doc, self._read = name, documentation, read

    def describe(self):
        return [CounterMetricFamily(self._name, self._doc)]

    def collect(self):
        yield CounterMetricFamily(self._name, self._doc, value=float(self._read()))


class ServerMetrics:
    """Every number the server exports.  Gauges read live state through callbacks (``watch``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Counter("secureim_connections", "TCP connections accepted", registry=r)
        self.connections_refused = Counter(
            "secureim_connections_refused", "TCP connections refused by rate or connection limits", registry=r
        )
        self.logins = Counter("secureim_logins", "Login attempts by result", ["result"], registry=r)
        # Counted by the loop thread as a plain integer (no lock per message), read at scrape time.
        self.relayed_total: Callable[[], float] = lambda: 0
        r.register(
            _CallbackCounter(
                "secureim_messages_relayed",
                "Messages relayed to an online peer",
                lambda: self.relayed_total(),
            )
        )
        self.undelivered = Counter(
            "secureim_messages_undelivered", "Relays refused: peer offline or no conversation", registry=r
        )
        self.stored = Counter(
            "secureim_messages_stored",
            "Messages stored for offline users (no offline store yet: stays 0)",
            registry=r,
        )
        self.relay_latency = Histogram(
            "secureim_relay_latency_seconds",
            "Time from a Relay read to its Deliver queued for the peer (one relay in 16 is timed)",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=r,
        )
        self.room_copies = Counter(
            "secureim_room_copies", "Room message copies sent live or queued, all rooms", registry=r
        )
        self.kicks = Counter("secureim_kicks", "Sessions ended by an administrator or a ban", registry=r)
        self.audit_failures = Counter(
            "secureim_audit_write_failures", "Audit rows that could not be written", registry=r
        )
        self.open_connections = Gauge("secureim_open_connections", "Connections open now", registry=r)
        self.online_users = Gauge("secureim_online_users", "Users logged in now", registry=r)
        self.outbox_bytes = Gauge(
            "secureim_outbox_queued_bytes", "Bytes queued for slow readers, all sessions", registry=r
        )
        self.bcrypt_queue = Gauge(
            "secureim_bcrypt_queue_length", "Password checks waiting for the bcrypt worker", registry=r
        )
        self.puzzle_difficulty = Gauge(
            "secureim_puzzle_difficulty_bits", "Client puzzle bits asked now", registry=r
        )
        self.nats_connected = Gauge(
            "secureim_nats_connected", "1 when connected to the cluster bus (no cluster yet: 0)", registry=r
        )

    def watch(
        self,
        *,
        open_connections: Callable[[], float],
        online_users: Callable[[], float],
        outbox_bytes: Callable[[], float],
        bcrypt_queue: Callable[[], float],
        puzzle_difficulty: Callable[[], float],
    ) -> None:
        self.open_connections.set_function(open_connections)
        self.online_users.set_function(online_users)
        self.outbox_bytes.set_function(outbox_bytes)
        self.bcrypt_queue.set_function(bcrypt_queue)
        self.puzzle_difficulty.set_function(puzzle_difficulty)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        pass


class MetricsEndpoint:
    """``/metrics`` and ``/healthz`` over HTTP on 127.0.0.1; ``health()`` returns None or why not healthy."""

    def __init__(self, metrics: ServerMetrics, health: Callable[[], str | None], port: int) -> None:
        metrics_app = make_wsgi_app(metrics.registry)

        def app(environ, start_response):
            if environ.get("PATH_INFO") == "/healthz":
                try:
                    problem = health()
                except Exception as exc:  # noqa: BLE001 - a failing check is an unhealthy answer, not a crash
                    problem = f"health check failed: {exc.__class__.__name__}"
                status = "200 OK" if problem is None else "503 Service Unavailable"
                body = b"ok\n" if problem is None else f"unavailable: {problem}\n".encode("utf-8", "replace")
                start_response(
                    status,
                    [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
                )
                return [body]
            return metrics_app(environ, start_response)

        self._httpd = make_server(METRICS_HOST, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for serve_forever: only when it runs
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()
