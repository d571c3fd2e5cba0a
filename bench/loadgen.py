"""secureim benchmarks: relay, capacity, handshake and reconnect storm, on loopback.

Every mode starts its own server (``server.py`` as a process; SQLite by default,
``--mysql`` for MariaDB), drives it with the project's own client library (real
handshakes, logins and double encryption) from several generator processes,
prints a table, writes JSON (``--json PATH``) and stops the server.  Server CPU,
resident memory and threads come from /proc; generator CPU from getrusage, so
the report shows whether the generator or the server was the bottleneck.

    python bench/loadgen.py relay --clients 100 --messages 200
    python bench/loadgen.py capacity --clients 1000
    python bench/loadgen.py handshake --logins 200
    python bench/loadgen.py storm --clients 1000
    python bench/loadgen.py store --clients 10 --recipients 10 --messages 100   # offline queue, then drain
    python bench/loadgen.py room --members 100 --messages 1000 [--senders 4] [--offline K]   # room fan-out
    python bench/loadgen.py relay --clients 100 --server-workers 2     # server.py --workers 2
    python bench/loadgen.py relay --clients 100 --nodes 3              # 3 nodes, pairs across nodes
    python bench/loadgen.py storm --clients 1000 --nodes 3             # kill a node, its clients resume

``--server-workers N`` and ``--nodes N`` make the server a cluster: a fresh MariaDB
database (dropped after), a NATS subject prefix of the run's own (NATS at
$SECUREIM_BENCH_NATS, default nats://127.0.0.1:4222) and one identity key.  Server
CPU, memory and threads are summed over every server process (a supervisor's
workers, every node), so ``server_cpu_us_per_msg`` compares across shapes.

Every loop is bounded in count and in time (``--timeout``).  docs/PERFORMANCE.md
holds the results on the reference machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import re
import resource
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from secureim import client as C
from secureim import proto as P
from secureim.errors import RoomError

PASSWORD = "benchmark-password"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# =============================================================================
# The server under test
# =============================================================================
NATS_URL = os.environ.get("SECUREIM_BENCH_NATS", "nats://127.0.0.1:4222")
START_TIMEOUT_S = 120.0
STALL_S = 10.0  # relay: a pair with nothing arriving for this long has lost the rest
FD_MARGIN = 256  # files a process needs besides its client sockets (database, NATS, logs, pipes)


def raise_nofile(want: int | None = None) -> int:
    """Raise this process's open-file limit to ``want`` (None: to the hard limit), never past the hard limit.

    Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None else want
    if hard != resource.RLIM_INFINITY:
        target = min(target, hard) if target != resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and (target == resource.RLIM_INFINITY or target > soft):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _server_preexec() -> (
    None
):  # in the server's process, before exec: its own open-file limit, as high as allowed
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (a supervisor's workers), from /proc."""
    out, i = [pid], 0
    while i < len(out):
        p = out[i]
        i += 1
        kids: list[int] = []
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                kids += [int(x) for x in (task / "children").read_text().split()]
        except FileNotFoundError:  # no /proc/PID/task/*/children in this kernel: scan every PPid
            kids = _children_by_scan(p)
        except OSError:
            continue
        out += [k for k in kids if k not in out]
    return out


def _children_by_scan(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def _proc_cpu(pid: int) -> tuple[float, float]:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # gone between the listing and the read
        return 0.0, 0.0
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def _proc_status(pid: int, field: str) -> int:
    return _proc_status_path(Path(f"/proc/{pid}/status"), field)


def _proc_status_path(path: Path, field: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _proc_nofile(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return None if soft == "unlimited" else int(soft)
    except OSError:
        pass
    return None


def mysql_admin(sql: str, args: tuple = ()) -> list:
    import pymysql

    conn = pymysql.connect(host="127.0.0.1", user="root", password="", autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())
    finally:
        conn.close()


def nats_reachable(url: str) -> bool:
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    try:
        socket.create_connection((u.hostname or "127.0.0.1", u.port or 4222), timeout=3).close()
        return True
    except OSError:
        return False


class ServerUnderTest:
    """One ``server.py`` process (with ``workers`` > 1: a supervisor and its worker processes)."""

    def __init__(
        self,
        *,
        cipher: str = "3des",
        bcrypt_cost: int = 4,
        db_url: str | None = None,
        data_dir: Path | None = None,
        port: int = 0,
        extra: tuple[str, ...] = (),
        workers: int = 1,
    ) -> None:
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="secureim-bench-"))
        self.workers = workers
        # bench/counted_server.py is server.py's main plus its bcrypt count (workers: PATH.wI).
        self.counters_dir = Path(tempfile.mkdtemp(prefix="secureim-bench-counters-"))
        self.counters_path = self.counters_dir / "counters.json"
        self.log_path = self.counters_dir / "stderr.log"
        self.last_counters: dict | None = None
        args = [
            sys.executable,
            str(ROOT / "bench" / "counted_server.py"),
            "--counters",
            str(self.counters_path),
            "--port",
            str(port),
            "--data-dir",
            str(self.data_dir),
            "--cipher",
            cipher,
            "--bcrypt-cost",
            str(bcrypt_cost),
            "--puzzle",
            "off",
            "--connections-per-second",
            "1000000",
            "--max-unauthenticated",
            "100000",
            "--max-unauthenticated-per-source",
            "100000",
            "--login-grace",
            "120",
            "--console",
            "off",
        ]
        if db_url:
            args += ["--db", db_url]
        if workers > 1:
            args += ["--workers", str(workers)]
        self.args = args + list(extra)
        self._start()

    def _start(self) -> None:
        import queue

        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            stdin=subprocess.DEVNULL,
            preexec_fn=_server_preexec,
        )
        log.close()
        lines: queue.Queue = queue.Queue()

        def drain(proc=self.proc):
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # bounded: Ready, the end of the output, or the deadline
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.proc.kill()
                self.proc.wait()
                tail = self.log_path.read_text(errors="replace")[-1500:]
                raise RuntimeError(f"the server did not start: {' '.join(self.args[1:])}\n{tail}")
            if "[worker " in line:  # a supervisor's worker speaking: the supervisor says Ready for all
                continue
            m = re.search(r"Listening on ([\d.]+):(\d+)", line)
            if m:
                self.host, self.port = m.group(1), int(m.group(2))
            if "Ready to accept connections" in line:
                break
        self._lines = lines  # the drain thread keeps reading (a full pipe would stall the server)

    def restart(self) -> None:
        """Stop and start again on the same port and data (the reconnect storm)."""
        self.stop(keep_data=True)
        i = self.args.index("--port")
        self.args[i + 1] = str(self.port)
        self._start()

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc.poll() is None else []

    def cpu_split(self) -> tuple[float, float]:
        """(user, system) CPU seconds so far, summed over this process and its workers."""
        u = k = 0.0
        for pid in self.pids():
            a, b = _proc_cpu(pid)
            u, k = u + a, k + b
        return u, k

    def cpu_s(self) -> float:
        return sum(self.cpu_split())

    def rss_kib(self) -> int:
        return sum(_proc_status(p, "VmRSS") for p in self.pids())

    def threads(self) -> int:
        return sum(_proc_status(p, "Threads") for p in self.pids())

    def context_switches(self) -> int:
        """Voluntary and involuntary context switches so far, every thread of every process."""
        n = 0
        for pid in self.pids():
            try:
                tasks = list(Path(f"/proc/{pid}/task").iterdir())
            except OSError:
                continue
            for task in tasks:
                n += _proc_status_path(task / "status", "voluntary_ctxt_switches")
                n += _proc_status_path(task / "status", "nonvoluntary_ctxt_switches")
        return n

    def nofile_limits(self) -> list[int | None]:
        return [_proc_nofile(p) for p in self.pids()]

    def bcrypt_runs(self) -> int:
        """bcrypt runs counted so far, this process and its workers (the files are rewritten as it runs)."""
        n = 0
        for f in self.counters_dir.glob("counters.json*"):
            if f.name.endswith(".tmp"):
                continue
            try:
                n += json.loads(f.read_text()).get("bcrypt_runs_serving", 0)
            except (OSError, ValueError):
                pass
        return n

    def kill(self) -> None:
        """SIGKILL, the whole tree (a supervisor's workers would outlive it otherwise)."""
        for pid in reversed(self.pids()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)

    def stop(self, keep_data: bool = False) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
        # This process's counters (and its workers'); absent if it had to be killed.
        self.last_counters = (
            {"bcrypt_runs_serving": self.bcrypt_runs()} if self.counters_path.exists() else None
        )
        for f in self.counters_dir.glob("counters.json*"):
            f.unlink(missing_ok=True)
        keep = os.environ.get("SECUREIM_BENCH_LOGS")  # a folder: keep every server's stderr there
        if keep and self.log_path.exists():
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(self.log_path, Path(keep) / f"{self.data_dir.name}-{self.proc.pid}.log")
        if not keep_data:
            shutil.rmtree(self.counters_dir, ignore_errors=True)
            shutil.rmtree(self.data_dir, ignore_errors=True)


class Deployment:
    """What a run measures: one server process, one with ``workers`` worker processes, or ``nodes`` nodes.

    More than one process means a cluster: a fresh MariaDB database, a NATS subject prefix of
    this run's own, one identity key for all (tickets made by one node open on another).  The
    database is dropped at the end; the prefix is never used again.
    """

    def __init__(
        self,
        *,
        cipher: str = "3des",
        bcrypt_cost: int = 4,
        mysql: bool = False,
        workers: int = 1,
        nodes: int = 1,
        nats_url: str = NATS_URL,
        server_args: tuple[str, ...] = (),
        settle_s: float = 0.0,
    ) -> None:
        self.clustered = workers > 1 or nodes > 1
        self.mysql = mysql or self.clustered
        self.workers, self.n_nodes = workers, nodes
        self.root = Path(tempfile.mkdtemp(prefix="secureim-bench-run-"))
        self.db_name = None
        self.prefix = None
        self.nodes: list[ServerUnderTest] = []
        self.dead: list[ServerUnderTest] = []
        extra: list[str] = []
        db_url = None
        if self.clustered and not nats_reachable(nats_url):
            raise SystemExit(
                f"--server-workers/--nodes need NATS: nothing answers at {nats_url} "
                "(start nats-server, or set SECUREIM_BENCH_NATS)"
            )
        try:
            if self.mysql:
                self.db_name = os.environ.get("SECUREIM_BENCH_DB") or f"secureim_bench_{secrets.token_hex(4)}"
                mysql_admin(f"CREATE DATABASE IF NOT EXISTS `{self.db_name}`")
                db_url = f"mysql://root@127.0.0.1:3306/{self.db_name}"
            if self.clustered:
                import crypto_utils as cu

                identity = self.root / "service_identity.key"
                cu.load_or_create_identity(str(identity))
                self.prefix = f"bench{secrets.token_hex(4)}"
                extra = [
                    "--identity-key",
                    str(identity),
                    "--cluster",
                    nats_url,
                    "--cluster-prefix",
                    self.prefix,
                ]
            for i in range(nodes):
                node_extra = [*extra, "--node-name", f"bench-node{i}"] if nodes > 1 else list(extra)
                node_extra += server_args
                self.nodes.append(
                    ServerUnderTest(
                        cipher=cipher,
                        bcrypt_cost=bcrypt_cost,
                        db_url=db_url,
                        data_dir=self.root / f"node{i}",
                        extra=tuple(node_extra),
                        workers=workers,
                    )
                )
            if self.clustered and settle_s > 0:
                # Every node has heard every other's heartbeat (1 s) and answered with its snapshot
                # before anyone logs in: the run measures a settled cluster, not its joining.
                time.sleep(settle_s)
        except BaseException:
            self.stop()
            raise

    @property
    def host(self) -> str:
        return self.nodes[0].host

    @property
    def port(self) -> int:
        return self.nodes[0].port

    def endpoints(self) -> list[tuple[str, int]]:
        return [(n.host, n.port) for n in self.nodes]

    def alive(self) -> list[ServerUnderTest]:
        return [n for n in self.nodes if n not in self.dead]

    def cpu_split(self) -> tuple[float, float]:
        parts = [n.cpu_split() for n in self.alive()]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    def cpu_s(self) -> float:
        return sum(self.cpu_split())

    def cpu_per_node(self) -> list[float]:
        return [n.cpu_s() if n not in self.dead else 0.0 for n in self.nodes]

    def rss_kib(self) -> int:
        return sum(n.rss_kib() for n in self.alive())

    def threads(self) -> int:
        return sum(n.threads() for n in self.alive())

    def context_switches(self) -> int:
        return sum(n.context_switches() for n in self.alive())

    def processes(self) -> int:
        return sum(len(n.pids()) for n in self.alive())

    def bcrypt_runs(self) -> int:
        return sum(n.bcrypt_runs() for n in self.alive())

    def check_nofile(self, need: int) -> int:
        """Every server process may open ``need`` files, or stop here with the reason; the smallest limit."""
        limits = [x for n in self.alive() for x in n.nofile_limits()]
        low = min((x for x in limits if x is not None), default=None)
        if low is not None and low < need:
            raise SystemExit(
                f"a server process may open only {low} files, {need} are needed: raise the hard "
                f"limit (ulimit -Hn, or LimitNOFILE) for the user running the benchmark"
            )
        return low if low is not None else -1

    def audit_counts(self, since: float) -> dict[str, int]:
        """Audit rows per event since ``since`` (MariaDB): ``resume`` vs ``login`` shows who needed a password."""
        rows = mysql_admin(
            f"SELECT event, COUNT(*) FROM `{self.db_name}`.audit_log WHERE at >= %s GROUP BY event", (since,)
        )
        return {str(e): int(c) for e, c in rows}

    def shape(self) -> dict:
        return {
            "server_workers": self.workers,
            "nodes": self.n_nodes,
            "server_processes": self.processes(),
            "db": "mysql" if self.mysql else "sqlite",
            "cluster": bool(self.clustered),
        }

    def stop(self) -> None:
        for n in self.nodes:
            try:
                n.stop()
            except Exception:  # noqa: BLE001 - stop the others, drop the database, whatever one did
                pass
        if self.db_name and not os.environ.get("SECUREIM_BENCH_DB"):
            try:
                mysql_admin(f"DROP DATABASE IF EXISTS `{self.db_name}`")
            except Exception:  # noqa: BLE001
                pass
        shutil.rmtree(self.root, ignore_errors=True)


# =============================================================================
# Clients
# =============================================================================
class BenchClient(C.ChatClient):
    """A ChatClient whose incoming messages go to a callback instead of the event queue.

    Made with ``receipts=False``: the figures count the relay's messages, and a real client's
    end-to-end receipt (docs/PROTOCOL.md section 15.4) would be a second relayed message per
    message (batched up to 64 ids when they come fast)."""

    on_message = None

    def _emit(self, event) -> None:
        if isinstance(event, C.MessageReceived) and self.on_message is not None:
            self.on_message(event)
        else:
            super()._emit(event)


def connect_client(host: str, port: int, home: Path, name: str, *, register: bool = True) -> BenchClient:
    for attempt in range(50):  # bounded retries: a busy accept backlog can refuse briefly
        try:
            c = BenchClient(host, port, home=home, persist_identity=False, timeout_s=60, receipts=False)
            c.connect()
            (c.register if register else c.login)(name, PASSWORD)
            c.start()
            return c
        except (C.ConnectionClosed, OSError):
            if attempt == 49:
                raise
            time.sleep(
                0.05 * (attempt + 1)
            )  # backoff between tries of our own client, not a wait for the server
    raise AssertionError("unreachable")


def wait_event(client: C.ChatClient, kind, deadline: float, **fields):
    while time.monotonic() < deadline:
        e = client.next_event(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(e, kind) and all(getattr(e, k) == v for k, v in fields.items()):
            return e
    raise TimeoutError(f"no {kind.__name__} {fields}")


def cpu_self_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# =============================================================================
# Relay
# =============================================================================
def relay_worker(endpoints, pair_ids, messages, window, payload_bytes, barriers, results, timeout_s, tag):
    home = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    try:
        _relay_worker(
            endpoints, pair_ids, messages, window, payload_bytes, barriers, results, timeout_s, tag, home
        )
    except BaseException as exc:  # reported to the parent at once, not found by its timeout
        for barrier in barriers:
            barrier.abort()
        results.put({"error": f"{tag}: {exc!r}"})
        raise
    finally:
        shutil.rmtree(home, ignore_errors=True)


def placement(i: int, n_nodes: int) -> tuple[int, int]:
    """Pair i: the sender on node i % N, the receiver on node (i + 1) % N (different nodes when N > 1)."""
    return i % n_nodes, (i + 1) % n_nodes


def _relay_worker(
    endpoints, pair_ids, messages, window, payload_bytes, barriers, results, timeout_s, tag, home
):
    logged_in, barrier = barriers
    deadline = time.monotonic() + timeout_s
    pairs, cross, routes = [], [], []
    for i in pair_ids:
        sn, rn = placement(i, len(endpoints))
        pairs.append(
            (
                connect_client(*endpoints[sn], home, f"{tag}s{i}"),
                connect_client(*endpoints[rn], home, f"{tag}r{i}"),
            )
        )
        cross.append(sn != rn)
        routes.append(f"{sn}->{rn}")
    # Everyone is logged in (on every generator process) before any conversation opens.
    logged_in.wait(timeout=timeout_s)
    for a, b in pairs:
        a.open_conversation(b.username)
    for a, b in pairs:
        wait_event(a, C.ConversationReady, deadline, peer=b.username)
        wait_event(b, C.ConversationReady, deadline, peer=a.username)
    state = [
        {
            "sent": 0,
            "recv": 0,
            "expected": 0,
            "disorder": 0,
            "duplicates": 0,
            "corrupted": 0,
            "seen": set(),
            "lat": [],
            "cond": threading.Condition(),
        }
        for _ in pairs
    ]
    for (a, b), st in zip(pairs, state, strict=True):

        def on_message(event, st=st, sender=a.username):
            # Every message is checked: from the right sender, with exactly the text sent
            # (sequence number, the pair's tag, the padding), once, and in order.
            parts = event.text.split(" ")
            with st["cond"]:
                try:
                    seq, sent_at = int(parts[0]), float(parts[1])
                    intact = (
                        event.peer == sender
                        and len(parts) == 4
                        and parts[2] == relay_tag(sender, seq)
                        and parts[3] == relay_padding(payload_bytes)
                        and 0 <= seq < messages
                    )
                except (ValueError, IndexError):
                    intact = False
                if not intact:
                    st["corrupted"] += 1
                elif seq in st["seen"]:
                    st["duplicates"] += 1
                else:
                    st["seen"].add(seq)
                    st["lat"].append(time.time() - sent_at)
                    if seq != st["expected"]:
                        st["disorder"] += 1
                    st["expected"] = seq + 1
                    st["recv"] += 1
                    st["progress_at"] = time.monotonic()
                st["cond"].notify()

        b.on_message = on_message
    cpu0 = cpu_self_s()
    barrier.wait(timeout=timeout_s)
    t0 = time.time()

    def stalled(st) -> bool:  # nothing arrived for STALL_S: the rest is lost, not late (caller holds cond)
        return time.monotonic() - st["progress_at"] > STALL_S

    def send_all(a, b, st):
        pad = relay_padding(payload_bytes)
        try:
            for k in range(messages):
                with st["cond"]:
                    while (
                        st["sent"] - st["recv"] >= window and time.monotonic() < deadline and not stalled(st)
                    ):
                        st["cond"].wait(timeout=1)
                    if time.monotonic() >= deadline or st["sent"] - st["recv"] >= window:
                        st["failure"] = st["failure"] or f"{a.username}: stalled after {st['sent']} sent"
                        return
                a.send_message(b.username, f"{k} {time.time():.6f} {relay_tag(a.username, k)} {pad}")
                with st["cond"]:
                    st["sent"] += 1
        except Exception as exc:  # noqa: BLE001 - the server refused or dropped it: reported, not fatal
            with st["cond"]:
                st["failure"] = f"{a.username}: {exc!r}"

    for st in state:
        st["progress_at"], st["failure"] = time.monotonic(), None
    threads = [
        threading.Thread(target=send_all, args=(a, b, st)) for (a, b), st in zip(pairs, state, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1, deadline - time.monotonic()))
    for st in state:  # what was sent arrives, unless it is lost: STALL_S without progress ends the wait
        with st["cond"]:
            while st["recv"] < st["sent"] and time.monotonic() < deadline and not stalled(st):
                st["cond"].wait(timeout=1)
    t1 = max([t0] + [time.time()])
    results.put(
        {
            "t0": t0,
            "t1": t1,
            "sent": sum(s["sent"] for s in state),
            "received": sum(s["recv"] for s in state),
            "disorder": sum(s["disorder"] for s in state),
            "duplicates": sum(s["duplicates"] for s in state),
            "corrupted": sum(s["corrupted"] for s in state),
            "latencies": [x for s in state for x in s["lat"]],
            "cpu_s": cpu_self_s() - cpu0,
            "send_failures": [s["failure"] for s in state if s["failure"]],
            "cross_received": sum(s["recv"] for s, x in zip(state, cross, strict=True) if x),
            "lost_by_route": [(r, messages - s["recv"]) for s, r in zip(state, routes, strict=True)],
        }
    )
    for a, b in pairs:
        a.close(timeout_s=2)
        b.close(timeout_s=2)


def relay_tag(sender: str, seq: int) -> str:
    """A per-message check value: a message relayed to the wrong pair, or altered, fails it."""
    return hashlib.sha256(f"{sender} {seq}".encode()).hexdigest()[:16]


def relay_padding(payload_bytes: int) -> str:
    return "x" * max(1, payload_bytes - 48)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def burst_worker(endpoints, count, start, results):
    """``count`` registrations at once (8 threads), timed: the login burst during a relay run."""
    home = Path(tempfile.mkdtemp(prefix="bench-burst-"))
    start.wait(timeout=600)
    t0 = time.time()
    names = [f"burst{i}" for i in range(count)]

    def one(k, sub):
        for j, name in enumerate(sub):
            host, port = endpoints[(k + 8 * j) % len(endpoints)]  # spread over the nodes
            c = BenchClient(host, port, home=home, persist_identity=False, timeout_s=120, receipts=False)
            c.connect()
            c.register(name, PASSWORD)
            c.close(timeout_s=2)

    threads = [threading.Thread(target=one, args=(k, names[k::8])) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    results.put({"burst_t0": t0, "burst_t1": time.time()})
    shutil.rmtree(home, ignore_errors=True)


def _get(results, timeout_s: float) -> dict:
    out = results.get(timeout=timeout_s)
    if "error" in out:
        raise RuntimeError(f"a generator process failed: {out['error']}")
    return out


def deployment(args, *, bcrypt_cost: int = 4, nodes: int = 1) -> Deployment:
    return Deployment(
        cipher=args.cipher,
        bcrypt_cost=bcrypt_cost,
        mysql=args.mysql,
        workers=args.server_workers,
        nodes=nodes,
        server_args=tuple(args.server_arg),
        settle_s=args.cluster_settle,
    )


def run_relay(args) -> dict:
    server = deployment(args, bcrypt_cost=args.relay_bcrypt_cost, nodes=args.nodes)
    procs = []
    try:
        shape = server.shape()
        endpoints = server.endpoints()
        n_pairs = max(1, args.clients // 2)
        workers = min(args.workers, n_pairs)
        barrier, logged_in = mp.Barrier(workers + 1), mp.Barrier(workers)
        results = mp.Queue()
        for w in range(workers):
            ids = list(range(w, n_pairs, workers))
            p = mp.Process(
                target=relay_worker,
                args=(
                    endpoints,
                    ids,
                    args.messages,
                    args.window,
                    args.payload,
                    (logged_in, barrier),
                    results,
                    args.timeout,
                    f"w{w}",
                ),
            )
            p.start()
            procs.append(p)
        burst_results, burst_start = mp.Queue(), mp.Event()
        burst = None
        if args.login_burst:
            burst = mp.Process(
                target=burst_worker, args=(endpoints, args.login_burst, burst_start, burst_results)
            )
            burst.start()
            procs.append(burst)
        try:
            barrier.wait(timeout=args.timeout)
        except threading.BrokenBarrierError:
            reasons = []
            for _ in range(
                workers
            ):  # every worker's reason: the first failure, and the others' broken barrier
                try:
                    reasons.append(results.get(timeout=10).get("error", "?"))
                except Exception:  # noqa: BLE001 - queue.Empty: that worker said nothing
                    break
            raise RuntimeError(f"a generator process failed: {'; '.join(reasons)}") from None
        burst_start.set()
        (u0, k0), cpu0, node0 = server.cpu_split(), server.cpu_s(), server.cpu_per_node()
        outs = [_get(results, args.timeout + 60) for _ in range(workers)]  # a worker ends by its own timeout
        burst_window = burst_results.get(timeout=args.timeout) if burst is not None else None
        (u1, k1), cpu1, node1 = server.cpu_split(), server.cpu_s(), server.cpu_per_node()
        rss = server.rss_kib()
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        server.stop()
    lat = [x for o in outs for x in o["latencies"]]
    received = sum(o["received"] for o in outs)
    cross = sum(o["cross_received"] for o in outs)
    by_route: dict[str, int] = {}
    for o in outs:  # node -> node: where a cluster loses messages, if it does
        for route, n in o["lost_by_route"]:
            by_route[route] = by_route.get(route, 0) + n
    burst_info = {}
    if burst_window is not None:
        burst_info = {
            "login_burst": args.login_burst,
            "bcrypt_cost": args.relay_bcrypt_cost,
            "burst_duration_s": round(burst_window["burst_t1"] - burst_window["burst_t0"], 2),
        }
    duration = max(o["t1"] for o in outs) - min(o["t0"] for o in outs)
    expected = n_pairs * args.messages
    return {
        "mode": "relay",
        "clients": n_pairs * 2,
        "pairs": n_pairs,
        "messages_per_sender": args.messages,
        "cipher": args.cipher,
        **shape,
        "window": args.window,
        "payload_bytes": args.payload,
        "duration_s": round(duration, 3),
        "msgs_per_s": round(received / duration, 1) if duration > 0 else 0.0,
        # Pairs with the sender and the receiver on different nodes (all of them when nodes > 1).
        "cross_node_msgs": cross,
        "cross_node_msgs_per_s": round(cross / duration, 1) if duration > 0 else 0.0,
        "latency_ms": {p: round(percentile(lat, p) * 1000, 2) for p in (50, 95, 99)}
        | {"max": round(max(lat) * 1000, 2) if lat else None},
        "lost": expected - received,
        "lost_by_route": by_route,
        # Senders that stopped: the server refused a send, or nothing arrived for STALL_S.
        "send_failures": [f for o in outs for f in o["send_failures"]][:20],
        "out_of_order": sum(o["disorder"] for o in outs),
        "duplicates": sum(o["duplicates"] for o in outs),
        "corrupted": sum(o["corrupted"] for o in outs),
        # Summed over every server process (a supervisor's workers, every node).
        "server_cpu_s": round(cpu1 - cpu0, 3),
        "server_user_s": round(u1 - u0, 3),
        "server_system_s": round(k1 - k0, 3),
        "server_cpu_s_per_node": [round(y - x, 3) for x, y in zip(node0, node1, strict=True)],
        "server_cpu_us_per_msg": round((cpu1 - cpu0) / received * 1e6, 1) if received else None,
        "generator_cpu_s": round(sum(o["cpu_s"] for o in outs), 3),
        "generator_processes": workers,
        "server_rss_mib": round(rss / 1024, 1),
    } | burst_info


# =============================================================================
# Capacity
# =============================================================================
def idle_worker(endpoints, ids, ready, done, results, timeout_s, tag):
    threading.stack_size(
        1 << 20
    )  # a receiver thread per idle client: 1 MiB stacks, not 8, at 5,000 a process
    home = Path(tempfile.mkdtemp(prefix="bench-idle-"))
    deadline = time.monotonic() + timeout_s
    clients, errors = [], 0
    lock = threading.Lock()

    def connect_range(sub):
        nonlocal errors
        for i in sub:
            if time.monotonic() >= deadline:
                with lock:
                    errors += 1
                continue
            try:
                c = connect_client(*endpoints[i % len(endpoints)], home, f"{tag}i{i}")
                with lock:
                    clients.append(c)
            except Exception:  # noqa: BLE001 - counted and reported
                with lock:
                    errors += 1

    threads = [threading.Thread(target=connect_range, args=(ids[k::8],)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s)
    results.put({"connected": len(clients), "errors": errors})
    ready.set()
    done.wait(timeout=timeout_s)
    for c in clients:
        c.closed.set()
        try:
            c.sock.close()
        except Exception:  # noqa: BLE001
            pass
    shutil.rmtree(home, ignore_errors=True)


def run_capacity(args) -> dict:
    # Every idle client is a socket in a generator process and one in the server: both need the files.
    per_generator = -(-args.clients // args.workers) + FD_MARGIN
    soft = raise_nofile(per_generator)
    if soft != resource.RLIM_INFINITY and soft < per_generator:
        raise SystemExit(
            f"a generator process may open only {soft} files, {per_generator} are needed: "
            "raise the hard limit (ulimit -Hn) or use more --workers"
        )
    server = deployment(args)
    procs = []
    try:
        shape = server.shape()
        server_nofile = server.check_nofile(args.clients + FD_MARGIN)
        endpoints = server.endpoints()
        time.sleep(0.5)  # let startup's allocations settle before the baseline
        rss0, threads0 = server.rss_kib(), server.threads()
        workers = args.workers
        results, done = mp.Queue(), mp.Event()
        readies = []
        t0 = time.monotonic()
        for w in range(workers):
            ready = mp.Event()
            ids = list(range(w, args.clients, workers))
            p = mp.Process(
                target=idle_worker, args=(endpoints, ids, ready, done, results, args.timeout, f"w{w}")
            )
            p.start()
            procs.append(p)
            readies.append(ready)
        for r in readies:
            r.wait(timeout=args.timeout)
        outs = [results.get(timeout=60) for _ in procs]
        connect_s = time.monotonic() - t0
        connected = sum(o["connected"] for o in outs)
        time.sleep(0.5)
        rss1, threads1 = server.rss_kib(), server.threads()
        # A new user logs in and delivers a message while everyone else is connected:
        # connect, handshake, register, open the conversation, and the message arrives.
        home = Path(tempfile.mkdtemp(prefix="bench-probe-"))
        got = threading.Event()
        b = connect_client(*endpoints[-1], home, "probe_b")
        b.on_message = lambda _event: got.set()
        p0 = time.monotonic()
        a = connect_client(*endpoints[0], home, "probe_a")
        login_s = time.monotonic() - p0
        a.open_conversation("probe_b")
        deadline = time.monotonic() + 60
        wait_event(a, C.ConversationReady, deadline, peer="probe_b")
        a.send_message("probe_b", "hello under load")
        got.wait(timeout=60)
        probe_s = time.monotonic() - p0
        a.close()
        b.close()
        shutil.rmtree(home, ignore_errors=True)
        done.set()
        for p in procs:
            p.join(timeout=120)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        server.stop()
    return {
        "mode": "capacity",
        "clients": args.clients,
        **shape,
        "connected": connected,
        "errors": sum(o["errors"] for o in outs),
        "all_held": connected == args.clients,
        "connect_all_s": round(connect_s, 1),
        "server_rss_mib": round(rss1 / 1024, 1),
        "server_rss_at_start_mib": round(rss0 / 1024, 1),
        # (RSS with everyone connected - RSS before anyone was) / clients, summed over server processes.
        "server_kib_per_idle_client": round((rss1 - rss0) / max(1, connected), 1),
        "server_threads": threads1,
        "threads_at_start": threads0,
        "server_open_files_limit": server_nofile,
        "generator_open_files_limit": soft,
        "new_user_login_s": round(login_s, 3),
        "new_user_login_and_chat_s": round(probe_s, 3),
        "new_user_message_delivered": got.is_set(),
    }


# =============================================================================
# Handshake
# =============================================================================
def microbench_split(bcrypt_cost: int, rounds: int = 20) -> dict:
    """Server CPU per login, split: the DH handshake (X25519 + signature) and the bcrypt check."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from secureim import proto as P
    from secureim.server import accounts as auth

    identity = Ed25519PrivateKey.generate()
    out = {}
    for group in ("x25519", "ffdhe2048"):
        total = 0.0
        for _ in range(rounds):
            client = P.ClientProtocol(group=group)
            hello = client.initiate()
            server = P.ServerProtocol(identity)
            c0 = time.process_time()
            server.receive_data(hello)
            flight = server.data_to_send()
            c1 = time.process_time()
            client.receive_data(flight)
            finished = client.data_to_send()
            c2 = time.process_time()
            server.receive_data(finished)
            total += (c1 - c0) + (time.process_time() - c2)
        out[f"dh_{group}_ms"] = round(total / rounds * 1000, 3)
    stored = auth.hash_password(PASSWORD.encode(), bcrypt_cost)
    c0 = time.process_time()
    n = max(3, rounds // (4 if bcrypt_cost >= 10 else 1))
    for _ in range(n):
        auth.check_password(PASSWORD.encode(), stored)
    out[f"bcrypt_cost{bcrypt_cost}_ms"] = round((time.process_time() - c0) / n * 1000, 2)
    return out


def login_worker(host, port, ids, results, tag, register):
    home = Path(tempfile.mkdtemp(prefix="bench-login-"))
    cpu0, t0, ok = cpu_self_s(), time.time(), 0
    for i in ids:
        c = BenchClient(host, port, home=home, persist_identity=False, timeout_s=60, receipts=False)
        c.connect()
        (c.register if register else c.login)(f"{tag}{i}", PASSWORD)
        c.close(timeout_s=2)
        ok += 1
    results.put({"ok": ok, "t0": t0, "t1": time.time(), "cpu_s": cpu_self_s() - cpu0})
    shutil.rmtree(home, ignore_errors=True)


def run_handshake(args) -> dict:
    rows = []
    for cost in sorted({args.bcrypt_cost, 4}):
        server = deployment(args, bcrypt_cost=cost)
        try:
            row = {"bcrypt_cost": cost, **server.shape()}
            for phase, register in (("register", True), ("login", False)):
                results = mp.Queue()
                cpu0 = server.cpu_s()
                procs = [
                    mp.Process(
                        target=login_worker,
                        args=(
                            server.host,
                            server.port,
                            list(range(w, args.logins, args.workers)),
                            results,
                            "u",
                            register,
                        ),
                    )
                    for w in range(args.workers)
                ]
                for p in procs:
                    p.start()
                outs = [results.get(timeout=args.timeout) for _ in procs]
                for p in procs:
                    p.join(timeout=60)
                duration = max(o["t1"] for o in outs) - min(o["t0"] for o in outs)
                n = sum(o["ok"] for o in outs)
                row[f"{phase}_per_s"] = round(n / duration, 1)
                row[f"{phase}_server_cpu_ms"] = round((server.cpu_s() - cpu0) / n * 1000, 2)
                row[f"{phase}_generator_cpu_s"] = round(sum(o["cpu_s"] for o in outs), 2)
            row.update(microbench_split(cost))
            rows.append(row)
        finally:
            server.stop()
    return {"mode": "handshake", "logins": args.logins, "workers": args.workers, "rows": rows}


# =============================================================================
# Reconnect storm
# =============================================================================
def storm_worker(endpoints, ids, victim, survivors, ready, restarted, results, timeout_s, tag):
    """Clients log in (client i on node i % N) and wait; then either every client comes back after a
    restart (``victim`` None), or the clients of the killed node ``victim`` resume on the ``survivors``."""
    home = Path(tempfile.mkdtemp(prefix="bench-storm-"))
    try:
        _storm_worker(endpoints, ids, victim, survivors, ready, restarted, results, timeout_s, tag, home)
    except BaseException as exc:  # reported to the parent at once, not found by its timeout
        results.put({"error": f"{tag}: {exc!r}"})
        ready.set()
        raise
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _storm_worker(endpoints, ids, victim, survivors, ready, restarted, results, timeout_s, tag, home):
    deadline = time.monotonic() + timeout_s
    clients = [connect_client(*endpoints[i % len(endpoints)], home, f"{tag}c{i}") for i in ids]
    nodes = [i % len(endpoints) for i in ids]
    ready.set()
    restarted.wait(timeout=timeout_s)
    t0 = time.time()
    if victim is None:
        moving = clients  # the server restarted: everyone comes back to it
    else:
        moving = [c for c, n in zip(clients, nodes, strict=True) if n == victim]
        for j, c in enumerate(moving):  # the killed node's clients go to the others, spread evenly
            c.servers = (*c.servers, survivors[(ids[0] + j) % len(survivors)])  # resume() takes the next one
    back = [0]
    errors: list[str] = []
    lock = threading.Lock()

    def reconnect(sub):
        for c in sub:
            last = None
            while time.monotonic() < deadline:
                try:
                    c.resume()  # the ticket, never the password (the server's bcrypt count shows it)
                    with lock:
                        back[0] += 1
                    break
                except (C.ConnectionClosed, OSError, C.ProtocolError) as exc:
                    last = exc
                    time.sleep(0.02 + secrets.randbelow(50) / 1000)  # jittered backoff of the client
            else:
                with lock:
                    errors.append(f"{c.username} did not come back: {last!r}")

    threads = [threading.Thread(target=reconnect, args=(moving[k::8],)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s)
    t_back = time.time()
    # Back and chatting: every client sends one message and receives one, checked for sender
    # and text.  Pairs (0,1), (2,3), ...; with an odd count the last one pairs with the first.
    pairs = [(clients[i], clients[i + 1]) for i in range(0, len(clients) - 1, 2)]
    if len(clients) % 2 and len(clients) > 1:
        pairs.append((clients[-1], clients[0]))
    chatted: set[str] = set()
    for a, b in pairs:
        try:
            a.open_conversation(b.username)
            wait_event(a, C.ConversationReady, deadline, peer=b.username)
            wait_event(b, C.ConversationReady, deadline, peer=a.username)
            for sender, receiver in ((a, b), (b, a)):
                got: list = []
                arrived = threading.Event()
                receiver.on_message = lambda e, got=got, arrived=arrived: (got.append(e), arrived.set())
                text = f"back from {sender.username}"
                sender.send_message(receiver.username, text)
                if not arrived.wait(timeout=max(1, deadline - time.monotonic())):
                    raise TimeoutError(f"{receiver.username} got nothing from {sender.username}")
                if (got[0].peer, got[0].text) != (sender.username, text):
                    raise AssertionError(f"{receiver.username} got {got[0].text!r} from {got[0].peer}")
                chatted.add(sender.username)
        except Exception as exc:  # noqa: BLE001 - reported in the result (and fails the smoke test), not hidden
            errors.append(f"{a.username} and {b.username} could not chat: {exc!r}")
    results.put(
        {
            "moved": len(moving),
            "back": back[0],
            "chatted": len(chatted),
            "errors": errors,
            "t0": t0,
            "t_back": t_back,
            "t1": time.time(),
        }
    )
    for c in clients:
        c.close(timeout_s=1)


def run_storm(args) -> dict:
    server = deployment(args, nodes=args.nodes)
    victim = args.nodes - 1 if args.nodes > 1 else None  # the last node is killed; None: restart the server
    procs = []
    try:
        shape = server.shape()
        endpoints = server.endpoints()
        survivors = [e for i, e in enumerate(endpoints) if i != victim]
        results, restarted = mp.Queue(), mp.Event()
        readies = []
        for w in range(args.workers):
            ready = mp.Event()
            p = mp.Process(
                target=storm_worker,
                args=(
                    endpoints,
                    list(range(w, args.clients, args.workers)),
                    victim,
                    survivors,
                    ready,
                    restarted,
                    results,
                    args.timeout,
                    f"w{w}",
                ),
            )
            p.start()
            procs.append(p)
            readies.append(ready)
        for r in readies:
            r.wait(timeout=args.timeout)
        if victim is None:
            r0 = time.time()
            server.nodes[0].restart()
            bcrypt0 = 0
        else:
            time.sleep(3 * 0.25)  # the survivors' counter files catch up with the logins
            bcrypt0 = sum(n.bcrypt_runs() for i, n in enumerate(server.nodes) if i != victim)
            r0 = time.time()
            server.nodes[victim].kill()
            server.dead.append(server.nodes[victim])
        cpu0 = server.cpu_s()
        restarted.set()
        outs = [_get(results, args.timeout) for _ in procs]
        cpu1 = server.cpu_s()
        audit = None
        if victim is not None:
            time.sleep(3 * 0.25)
            bcrypt1 = server.bcrypt_runs()
            audit = server.audit_counts(r0)
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        server.stop()
    if victim is None:
        # Counted inside the restarted server process (bench/counted_server.py): every bcrypt hash
        # or check it ran, storm and chat included.  0 = nobody needed a password.
        bcrypt = (server.nodes[0].last_counters or {}).get("bcrypt_runs_serving")
    else:  # the survivors' counts from just before the kill to after the chat
        bcrypt = bcrypt1 - bcrypt0
    t_back = max(o["t_back"] for o in outs) - r0
    t_chat = max(o["t1"] for o in outs) - r0
    out = {
        "mode": "storm",
        "clients": args.clients,
        **shape,
        "back": sum(o["back"] for o in outs),
        "moved": sum(o["moved"] for o in outs),
        "chatted_after_storm": sum(o["chatted"] for o in outs),
        "server_bcrypt_runs_after_restart": bcrypt,
        "errors": [e for o in outs for e in o["errors"]],
        "restart_to_all_back_s": round(t_back, 2),
        "restart_to_all_back_and_chatting_s": round(t_chat, 2),
        "server_cpu_s_during_storm": round(cpu1 - cpu0, 2),
    }
    if victim is not None:
        out |= {
            "killed_node": victim,
            "kill_to_all_back_s": round(t_back, 2),
            "kill_to_all_back_and_chatting_s": round(t_chat, 2),
            # Audit rows written since the kill: every moved client should be a resume, none a login.
            "audit_since_kill": audit,
        }
    return out


# =============================================================================
# =============================================================================
# Store and forward: messages for users who are offline, then their login drains the queue
# =============================================================================
def run_store(args) -> dict:
    """``--clients`` senders write ``--messages`` each to ``--recipients`` users who are offline
    (sealed from their prekeys, kept in the queue); then every recipient logs in and takes its
    queue.  Senders keep ``--window`` stores unanswered at most.  No receipts (see BenchClient)."""
    server = deployment(args, bcrypt_cost=args.relay_bcrypt_cost)
    home = Path(tempfile.mkdtemp(prefix="secureim-bench-store-"))
    clients: list[C.ChatClient] = []
    try:
        shape = server.shape()
        host, port = server.host, server.port
        names = [f"r{i}" for i in range(args.recipients)]
        for name in names:  # a real client (prekeys on disk), then away
            c = C.ChatClient(host, port, home=home / name, timeout_s=60, receipts=False)
            c.connect()
            c.register(name, PASSWORD)
            c.start()
            if not c.mailbox.published.wait(30):
                raise RuntimeError(f"{name} did not publish its prekeys")
            c.close()
        senders = [connect_client(host, port, home / f"s{i}", f"s{i}") for i in range(args.clients)]
        clients += senders
        total = args.clients * args.messages
        stored, errors = [0], []
        lock = threading.Lock()

        def write(i: int, sender: C.ChatClient) -> None:
            in_flight = 0
            try:
                for n in range(args.messages):
                    sender.send_offline(names[(i + n) % len(names)], relay_padding(args.payload))
                    in_flight += 1
                    while in_flight >= args.window or (n == args.messages - 1 and in_flight):
                        e = sender.next_event(timeout=args.timeout)
                        if isinstance(e, (C.MessageStored, C.MessageNotStored)):
                            in_flight -= 1
                            with lock:
                                stored[0] += isinstance(e, C.MessageStored)
                        elif e is None:
                            raise RuntimeError("no answer to a store")
            except Exception as exc:  # noqa: BLE001 - reported in the result
                errors.append(f"{type(exc).__name__}: {exc}")

        cpu0, t0 = server.cpu_s(), time.monotonic()
        threads = [threading.Thread(target=write, args=(i, s)) for i, s in enumerate(senders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.timeout)
        t1, cpu1 = time.monotonic(), server.cpu_s()
        rss_after_store = server.rss_kib()
        received = [0]

        def drain(name: str) -> None:
            c = C.ChatClient(host, port, home=home / name, timeout_s=60, receipts=False)
            c.connect()
            c.login(name, PASSWORD)
            clients.append(c)
            want = total // len(names) + (1 if names.index(name) < total % len(names) else 0)
            got = 0
            c.start()
            deadline = time.monotonic() + args.timeout
            while got < want and time.monotonic() < deadline:
                e = c.next_event(timeout=max(0.1, deadline - time.monotonic()))
                if isinstance(e, C.MessageReceived):
                    got += 1
            with lock:
                received[0] += got

        cpu2, t2 = server.cpu_s(), time.monotonic()
        threads = [threading.Thread(target=drain, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.timeout)
        t3, cpu3 = time.monotonic(), server.cpu_s()
    finally:
        for c in clients:
            try:
                c.close(timeout_s=2)
            except Exception:  # noqa: BLE001 - best effort at the end
                pass
        server.stop()
        shutil.rmtree(home, ignore_errors=True)
    return {
        "mode": "store",
        **shape,
        "senders": args.clients,
        "recipients": args.recipients,
        "messages": total,
        "payload_bytes": args.payload,
        "window": args.window,
        "stored": stored[0],
        "store_s": round(t1 - t0, 3),
        "stores_per_s": round(stored[0] / (t1 - t0), 1) if t1 > t0 else 0.0,
        "server_cpu_us_per_store": round((cpu1 - cpu0) / stored[0] * 1e6, 1) if stored[0] else None,
        "server_rss_mib_after_store": round(rss_after_store / 1024, 1),
        "delivered": received[0],
        "drain_s": round(t3 - t2, 3),
        "delivered_per_s": round(received[0] / (t3 - t2), 1) if t3 > t2 else 0.0,
        "server_cpu_us_per_delivery": round((cpu3 - cpu2) / received[0] * 1e6, 1) if received[0] else None,
        "errors": errors[:10],
    }


# =============================================================================
# Room fan-out: one message, every other member a copy (issue 13)
# =============================================================================
ROOM_NAME = "#bench"
ROOM_HEADER = struct.Struct(
    ">HId"
)  # sender index, sequence number, sent at (wall clock): the test payload's head
ROOM_SETTLE_S = 15.0  # at most this long for the server to go quiet after the membership setup


def room_padding(payload_bytes: int) -> bytes:
    """The payload after its header: fixed bytes, checked on every copy (a copy altered or cut fails)."""
    n = max(0, payload_bytes - ROOM_HEADER.size)
    seed = hashlib.sha256(b"secureim room bench").digest()
    return (seed * (n // len(seed) + 1))[:n]


class RoomBenchClient(BenchClient):
    """A ChatClient whose live copies of the bench room's messages are counted where they come in.

    The benchmark's senders put opaque test bytes in RoomSend (the server never reads a room
    payload), so a copy is counted and checked in ``_dispatch`` (after the session record is
    opened and decoded, before the room layer would try a sender key on it).  Everything else,
    membership changes included, goes to the real room client."""

    bench = None  # the worker's _RoomTally, once the room exists

    def _dispatch(self, msg) -> None:
        bench = self.bench
        if bench is not None:
            kind = type(msg)
            if kind is P.RoomMessage and msg.room_id == bench.room_id and not msg.queue_id:
                bench.copy(self, msg)
                return
            if kind is P.RoomSendResult and msg.room_id == bench.room_id:
                bench.answer(self, msg)
                return
        super()._dispatch(msg)


class _RoomTally:
    """Per worker: what the bench room's copies and answers were (each client's counts on itself:
    only its own receiver thread writes them, so no lock on the per-copy path)."""

    def __init__(
        self,
        room_id: int,
        epoch: int,
        senders: list[str],
        messages: int,
        payload_bytes: int,
        recv_slots,
        member_index: dict[str, int],
    ) -> None:
        self.room_id, self.epoch, self.senders, self.messages = room_id, epoch, senders, messages
        self.pad = room_padding(payload_bytes)
        self.recv_slots, self.member_index = recv_slots, member_index

    def attach(self, c: RoomBenchClient) -> None:
        c.copies = c.duplicates = c.disorder = c.corrupted = 0
        c.seen = [bytearray(self.messages) for _ in self.senders]
        c.expect_next = [0] * len(self.senders)
        c.latencies = []
        c.last_copy_at = 0.0
        c.slot = self.member_index[c.username]
        c.answers = c.answers_ok = c.answered_online = c.answered_stored = 0
        c.answer_reasons = []
        c.sent = 0
        c.answer_cond = threading.Condition()
        c.bench = self

    def copy(self, c: RoomBenchClient, msg) -> None:
        payload = msg.payload
        try:
            s, k, sent_at = ROOM_HEADER.unpack_from(payload)
            intact = (
                s < len(self.senders)
                and k < self.messages
                and msg.sender == self.senders[s]
                and msg.epoch == self.epoch
                and payload[ROOM_HEADER.size :] == self.pad
            )
        except struct.error:
            intact = False
        if not intact:
            c.corrupted += 1
            return
        seen = c.seen[s]
        if seen[k]:
            c.duplicates += 1
            return
        seen[k] = 1
        if k != c.expect_next[s]:
            c.disorder += 1
        c.expect_next[s] = k + 1
        now = time.time()
        c.latencies.append(now - sent_at)
        c.last_copy_at = now
        c.copies += 1
        self.recv_slots[c.slot] = c.copies

    def answer(self, c: RoomBenchClient, msg) -> None:
        with c.answer_cond:
            c.answers += 1
            if msg.status == P.RoomStatus.OK:
                c.answers_ok += 1
                c.answered_online += msg.online
                c.answered_stored += msg.stored
                if msg.reason and len(c.answer_reasons) < 5:
                    c.answer_reasons.append(msg.reason[:200])
            elif len(c.answer_reasons) < 5:
                c.answer_reasons.append(f"status {msg.status}: {msg.reason[:200]}")
            c.answer_cond.notify_all()


def room_worker(endpoints, w, workers, plan, sync, shared, results, timeout_s):
    home = Path(tempfile.mkdtemp(prefix="bench-room-"))
    try:
        _room_worker(endpoints, w, workers, plan, sync, shared, results, timeout_s, home)
    except BaseException as exc:  # reported to the parent at once, not found by its timeout
        for barrier in sync["barriers"]:
            barrier.abort()
        results.put({"error": f"room worker {w}: {exc!r}"})
        raise
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _room_admin(admin: C.ChatClient, others: list[str], deadline: float) -> tuple[int, int]:
    """Create the room and invite every other member through the real API (signed changes, each one
    verified by every member).  One session may make 60 changes a minute (room_service): past that
    the admin waits for the minute, bounded by the deadline."""
    admin.rooms.create(ROOM_NAME)
    for user in others:
        while True:
            try:
                admin.rooms.invite(ROOM_NAME, user)
                break
            except RoomError as exc:
                if "Too many room changes" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
    room = admin.rooms.rooms[ROOM_NAME]
    return room.room_id, room.epoch


def _room_worker(endpoints, w, workers, plan, sync, shared, results, timeout_s, home):
    registered, ready, go = sync["barriers"]
    deadline = time.monotonic() + timeout_s
    names, senders, offline = plan["names"], plan["senders"], set(plan["offline"])
    messages, window, payload_bytes = plan["messages"], plan["window"], plan["payload_bytes"]
    per_msg = len(names) - 1 - len(offline)  # live copies of one message: every other member online
    mine = [n for i, n in enumerate(names) if i % workers == w]
    clients: dict[str, RoomBenchClient] = {}
    for name in mine:
        host, port = endpoints[0]
        for attempt in range(50):  # bounded retries, as connect_client
            try:
                # A real client with its store on disk: the prekeys it publishes are how the admin
                # learns (and vouches for) the identity key it adds to the room's roster.
                c = RoomBenchClient(host, port, home=home / name, timeout_s=60, receipts=False)
                c.connect()
                c.register(name, PASSWORD)
                c.start()
                break
            except (C.ConnectionClosed, OSError):
                if attempt == 49:
                    raise
                time.sleep(0.05 * (attempt + 1))
        clients[name] = c
    for name, c in clients.items():
        if not c.mailbox.published.wait(max(1.0, deadline - time.monotonic())):
            raise TimeoutError(f"{name} did not publish its prekeys")
    for name in offline & set(clients):
        clients.pop(name).close(timeout_s=2)  # a member who is away: every message is queued for them
    registered.wait(timeout=timeout_s)
    if w == 0:
        room_id, epoch = _room_admin(clients[names[0]], names[1:], deadline)
        shared["room"][0], shared["room"][1] = room_id, epoch
        sync["room_ready"].set()
    else:
        while not sync["room_ready"].wait(timeout=0.5):  # bounded: the deadline, or another worker failed
            if ready.broken or time.monotonic() > deadline:
                raise TimeoutError("the room was not made (in time)")
    room_id, epoch = shared["room"][0], shared["room"][1]
    # Every member here has verified every change up to the last one (the chain from the admin's key).
    for name, c in clients.items():
        while True:
            room = c.rooms.rooms.get(ROOM_NAME)
            if room is not None and room.epoch >= epoch:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not see the room's last change (epoch {epoch})")
            time.sleep(0.05)
    tally = _RoomTally(
        room_id, epoch, senders, messages, payload_bytes, shared["recv"], {n: i for i, n in enumerate(names)}
    )
    for c in clients.values():
        tally.attach(c)
    ready.wait(timeout=timeout_s)
    go.wait(timeout=timeout_s)
    cpu0, t0 = cpu_self_s(), time.time()
    recv, sent_slots = shared["recv"], shared["sent"]
    limit = window * len(senders) * per_msg  # live copies on their way at most, over every sender
    failures: list[str] = []
    progress = {"copies": 0, "at": time.monotonic()}

    def stalled() -> bool:  # no copy arrived anywhere for STALL_S: what is missing is lost, not late
        total = sum(recv)
        if total != progress["copies"]:
            progress["copies"], progress["at"] = total, time.monotonic()
        return time.monotonic() - progress["at"] > STALL_S

    def send_all(s: int, c: RoomBenchClient) -> None:
        pad = room_padding(payload_bytes)
        try:
            for k in range(messages):
                with c.answer_cond:  # this sender's answers: at most ``window`` outstanding
                    while c.sent - c.answers >= window and time.monotonic() < deadline:
                        c.answer_cond.wait(timeout=1)
                while sum(sent_slots) * per_msg - sum(recv) > limit:  # every member keeps up
                    if time.monotonic() >= deadline or stalled():
                        raise TimeoutError(f"stalled after {k} sent")
                    time.sleep(0.001)
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"out of time after {k} sent")
                ref = struct.pack(">HI10x", s, k)
                payload = ROOM_HEADER.pack(s, k, time.time()) + pad
                with c.answer_cond:
                    c.sent += 1
                c.send_frame(P.RoomSend(room_id=room_id, epoch=epoch, msg_ref=ref, payload=payload))
                sent_slots[s] = k + 1
        except Exception as exc:  # noqa: BLE001 - reported in the result, not fatal to the others
            failures.append(f"{senders[s]}: {exc!r}")

    threads = [
        threading.Thread(target=send_all, args=(s, clients[n])) for s, n in enumerate(senders) if n in clients
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1, deadline - time.monotonic()))
    t_sent = time.time()
    # Every copy for the members here arrives, unless it is lost (bounded: the deadline, or STALL_S
    # with nothing arriving anywhere); then every answer of the senders here.
    total = len(senders) * messages
    want = {n: total - (messages if n in senders else 0) for n in clients}
    while any(c.copies < want[n] for n, c in clients.items()):
        if time.monotonic() >= deadline or stalled():
            break
        time.sleep(0.01)
    for c in clients.values():
        with c.answer_cond:
            while c.answers < c.sent and time.monotonic() < deadline:
                c.answer_cond.wait(timeout=1)
    cs = list(clients.values())
    last = max([c.last_copy_at for c in cs] + [t0])
    results.put(
        {
            "t0": t0,
            "t_sent": t_sent,
            "t1": last,
            "cpu_s": cpu_self_s() - cpu0,
            "sent": sum(c.sent for c in cs),
            "copies": sum(c.copies for c in cs),
            "expected": sum(want.values()),
            "duplicates": sum(c.duplicates for c in cs),
            "out_of_order": sum(c.disorder for c in cs),
            "corrupted": sum(c.corrupted for c in cs),
            "answers": sum(c.answers for c in cs),
            "answers_ok": sum(c.answers_ok for c in cs),
            "answered_online": sum(c.answered_online for c in cs),
            "answered_stored": sum(c.answered_stored for c in cs),
            "answer_reasons": [r for c in cs for r in c.answer_reasons][:10],
            "latencies": [x for c in cs for x in c.latencies],
            "failures": failures,
        }
    )
    for c in cs:
        c.close(timeout_s=2)


def run_room(args) -> dict:
    """``--members`` users in one room (made and filled through the real room API); ``--senders``
    of them send ``--messages`` each; every other online member gets a copy of every message.
    ``--offline K``: K members are away, so each message is also queued K times."""
    members, offline_n = args.members, args.offline
    if members < 2:
        raise SystemExit("room: --members is at least 2")
    if not 0 <= offline_n <= members - 2:
        raise SystemExit("room: --offline is 0 to members - 2 (the admin and one other stay)")
    from secureim.e2e import rooms as R

    if args.payload_bytes < max(R.MIN_MESSAGE_BYTES, ROOM_HEADER.size):
        raise SystemExit(
            f"room: --payload-bytes is at least {R.MIN_MESSAGE_BYTES} (the server refuses shorter)"
        )
    senders_n = max(1, min(args.senders, members - offline_n))
    names = [f"m{i}" for i in range(members)]
    plan = {
        "names": names,
        "senders": names[:senders_n],
        "offline": names[members - offline_n :] if offline_n else [],
        "messages": args.messages,
        "window": args.window,
        "payload_bytes": args.payload_bytes,
    }
    # The server's limit on room messages per session (a token bucket) would decide the rate: set
    # past anything two cores reach, so the figures are the fan-out's own.
    args.server_arg = ["--room-sends-per-second", "100000", *args.server_arg]
    server = deployment(args, bcrypt_cost=args.relay_bcrypt_cost)
    server.check_nofile(members + FD_MARGIN)
    workers = max(1, min(args.workers, members))
    sync = {
        "barriers": (mp.Barrier(workers + 1), mp.Barrier(workers + 1), mp.Barrier(workers + 1)),
        "room_ready": mp.Event(),
    }
    shared = {
        "room": mp.RawArray("q", 2),
        "recv": mp.RawArray("q", members),
        "sent": mp.RawArray("q", members),
    }
    results = mp.Queue()
    procs = []
    registered, ready, go = sync["barriers"]
    try:
        shape = server.shape()
        for w in range(workers):
            p = mp.Process(
                target=room_worker,
                args=(server.endpoints(), w, workers, plan, sync, shared, results, args.timeout),
            )
            p.start()
            procs.append(p)
        s0 = time.monotonic()
        try:
            registered.wait(timeout=args.timeout)
            t_registered = time.monotonic()
            ready.wait(timeout=args.timeout)
            setup_s = time.monotonic() - s0
            # The membership setup queued every change for every member (their Acks are database
            # work): the measurement starts once the server has gone quiet (bounded).
            quiet = False
            settle_end = time.monotonic() + ROOM_SETTLE_S
            while time.monotonic() < settle_end:
                c0 = server.cpu_s()
                time.sleep(0.5)
                if server.cpu_s() - c0 <= 0.02:
                    quiet = True
                    break
            go.wait(timeout=args.timeout)
        except threading.BrokenBarrierError:
            raise RuntimeError(
                f"a generator process failed: {results.get(timeout=10).get('error', '?')}"
            ) from None
        (u0, k0), cpu0, cs0 = server.cpu_split(), server.cpu_s(), server.context_switches()
        outs = [_get(results, args.timeout + 60) for _ in range(workers)]
        (u1, k1), cpu1, cs1 = server.cpu_split(), server.cpu_s(), server.context_switches()
        rss = server.rss_kib()
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        server.stop()
    lat = [x for o in outs for x in o["latencies"]]
    copies = sum(o["copies"] for o in outs)
    sent = sum(o["sent"] for o in outs)
    stored = sum(o["answered_stored"] for o in outs)
    t0, t1 = min(o["t0"] for o in outs), max(o["t1"] for o in outs)
    duration = t1 - t0
    cpu = cpu1 - cpu0
    delivered = (
        copies + stored
    )  # live copies counted by the members, plus the queued ones the server reported
    return {
        "mode": "room",
        "members": members,
        "senders": senders_n,
        "offline": offline_n,
        "messages_per_sender": args.messages,
        "window": args.window,
        "payload_bytes": args.payload_bytes,
        "cipher": args.cipher,
        **shape,
        "generator_processes": workers,
        "setup_s": round(setup_s, 1),
        "register_s": round(t_registered - s0, 1),
        "server_quiet_before_run": quiet,
        "messages_sent": sent,
        "copies_per_message_live": members - 1 - offline_n,
        "copies_expected": sum(o["expected"] for o in outs),
        "copies_received": copies,
        "lost": sum(o["expected"] for o in outs) - copies,
        "duplicates": sum(o["duplicates"] for o in outs),
        "out_of_order": sum(o["out_of_order"] for o in outs),
        "corrupted": sum(o["corrupted"] for o in outs),
        "answers_ok": sum(o["answers_ok"] for o in outs),
        "answers": sum(o["answers"] for o in outs),
        "answered_online": sum(o["answered_online"] for o in outs),
        "stored_copies": stored,
        "answer_reasons": [r for o in outs for r in o["answer_reasons"]][:10],
        "send_failures": [f for o in outs for f in o["failures"]][:10],
        "duration_s": round(duration, 3),
        "send_s": round(max(o["t_sent"] for o in outs) - t0, 3),
        "msgs_per_s": round(sent / duration, 1) if duration > 0 else 0.0,
        "copies_per_s": round(copies / duration, 1) if duration > 0 else 0.0,
        "latency_ms": {p: round(percentile(lat, p) * 1000, 2) for p in (50, 95, 99)}
        | {"max": round(max(lat) * 1000, 2) if lat else None},
        "server_cpu_s": round(cpu, 3),
        "server_user_s": round(u1 - u0, 3),
        "server_system_s": round(k1 - k0, 3),
        "server_cpu_us_per_copy": round(cpu / delivered * 1e6, 1) if delivered else None,
        "server_cpu_us_per_message": round(cpu / sent * 1e6, 1) if sent else None,
        # Every server thread's context switches over the run (a worker thread handing the GIL
        # or a lock to another, the loop waking): per delivered copy.
        "server_context_switches_per_copy": round((cs1 - cs0) / delivered, 2) if delivered else None,
        "generator_cpu_s": round(sum(o["cpu_s"] for o in outs), 3),
        "generator_cpu_us_per_copy": round(sum(o["cpu_s"] for o in outs) / copies * 1e6, 1)
        if copies
        else None,
        "server_rss_mib": round(rss / 1024, 1),
    }


def print_table(result: dict) -> None:
    rows = result.get("rows", [result])
    for row in rows:
        width = max(len(k) for k in row)
        for k, v in row.items():
            print(f"  {k:<{width}}  {v}")
        print()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["relay", "capacity", "handshake", "storm", "store", "room"])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--messages", type=int, default=200, help="relay, store, room: messages per sender")
    p.add_argument("--window", type=int, default=8, help="relay, store, room: messages in flight per sender")
    p.add_argument("--payload", type=int, default=100, help="relay: message size in bytes")
    p.add_argument("--recipients", type=int, default=10, help="store: offline users written to")
    p.add_argument("--members", type=int, default=100, help="room: members of the one room")
    p.add_argument("--senders", type=int, default=4, help="room: members who send (--messages each)")
    p.add_argument(
        "--payload-bytes",
        type=int,
        default=249,
        help="room: the opaque RoomSend payload (249: a 100-byte text sealed for a 3des room)",
    )
    p.add_argument(
        "--offline",
        type=int,
        default=0,
        metavar="K",
        help="room: K members logged out, so every message is also queued K times",
    )
    p.add_argument("--logins", type=int, default=100, help="handshake: logins per phase")
    p.add_argument(
        "--bcrypt-cost", type=int, default=12, help="handshake: the configured cost (4 is also run)"
    )
    p.add_argument("--relay-bcrypt-cost", type=int, default=4, help="relay: the server's bcrypt cost")
    p.add_argument(
        "--login-burst", type=int, default=0, help="relay: this many logins at once during the run"
    )
    p.add_argument("--cipher", choices=["3des", "aes256"], default="3des")
    p.add_argument("--mysql", action="store_true", help="MariaDB at 127.0.0.1:3306 instead of SQLite")
    p.add_argument("--workers", type=int, default=2, help="generator processes")
    p.add_argument(
        "--server-workers",
        type=int,
        default=1,
        metavar="N",
        help="relay/capacity/handshake/storm: server.py --workers N (a cluster on NATS and MariaDB)",
    )
    p.add_argument(
        "--cluster-settle",
        type=float,
        default=0.0,
        metavar="S",
        help="with --server-workers/--nodes: seconds between every process Ready and the first "
        "login, for the nodes to hear each other (0: log in while they still join)",
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more server.py argument, as is (repeat: --server-arg=--log-level --server-arg=INFO)",
    )
    p.add_argument(
        "--nodes",
        type=int,
        default=1,
        metavar="N",
        help="relay/storm: N server.py processes as one cluster (NATS, MariaDB, one identity); "
        "relay pairs span two nodes, the storm kills one node",
    )
    p.add_argument("--timeout", type=float, default=600, help="upper bound on the whole run, seconds")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    args = p.parse_args(argv)
    if args.server_workers < 1 or args.nodes < 1:
        p.error("--server-workers and --nodes are at least 1")
    if args.nodes > 1 and args.mode not in ("relay", "storm"):
        p.error("--nodes is for relay and storm")
    raise_nofile()  # every client is a socket: as many files as the hard limit allows (capacity checks)
    run = {
        "relay": run_relay,
        "capacity": run_capacity,
        "handshake": run_handshake,
        "storm": run_storm,
        "store": run_store,
        "room": run_room,
    }[args.mode]
    result = run(args)
    result["machine"] = {"cores": os.cpu_count(), "python": sys.version.split()[0]}
    print(f"secureim {args.mode} benchmark")
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
