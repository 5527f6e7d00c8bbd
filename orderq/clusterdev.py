"""``orderq cluster-dev``: a local Redis Cluster (Valkey, 3 masters) for development and tests.

Each node is the embedded ``valkey-server`` on a free loopback port, with its own data
directory under ``ORDERQ_DATA_DIR/cluster/<port>`` and the same durability settings as the
embedded single server (append-only file, ``appendfsync everysec``, ``noeviction``). Slots
are assigned in contiguous thirds (``CLUSTER ADDSLOTSRANGE``) and the nodes introduced with
``CLUSTER MEET``: no ``valkey-cli`` needed. Masters only: a dev cluster needs no failover.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis

from orderq.errors import OrderqError
from orderq.server import DURABLE_CONFIG, die_with_parent, find_binary, free_port

SLOTS = 16384
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0


class ClusterNode:
    """One master: its port, cluster bus port, directory and process."""

    def __init__(self, root: Path, port: int, bus_port: int) -> None:
        self.port = port
        self.bus_port = bus_port
        self.dir = root / str(port)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "valkey.conf"
        conf.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    "bind 127.0.0.1",
                    f"dir {self.dir}",
                    "cluster-enabled yes",
                    f"cluster-port {self.bus_port}",
                    "cluster-config-file nodes.conf",
                    "cluster-node-timeout 5000",
                    *DURABLE_CONFIG,
                    f"logfile {self.dir / 'valkey.log'}",
                    "latency-tracking no",
                ]
            )
            + "\n",
            encoding="utf-8",
        )
        self.proc = subprocess.Popen(
            [find_binary(), str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches orderq, which stops the nodes itself
            preexec_fn=die_with_parent,
        )

    def wait_up(self, deadline: float) -> None:
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise OrderqError(f"valkey-server exited with {self.proc.returncode}; see {self.dir / 'valkey.log'}")
            try:
                with self.client() as c:
                    c.ping()
                return
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise OrderqError(f"cluster node {self.port} did not answer; see {self.dir / 'valkey.log'}")
            time.sleep(0.02)

    def terminate(self) -> None:
        """SIGTERM: Valkey shuts down gracefully on it (fsyncs the append-only file)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def wait(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class DevCluster:
    """A fresh local cluster of ``masters`` nodes under ``data_dir/cluster``; ``start()`` / ``stop()``."""

    def __init__(self, data_dir: Path, masters: int = 3) -> None:
        self.root = Path(data_dir).resolve() / "cluster"
        self.masters = masters
        self.nodes: list[ClusterNode] = []

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self) -> DevCluster:
        # A fresh cluster each time: a node keeps its identity and slots in nodes.conf,
        # and a half-remembered topology from an earlier run would never reach state ok.
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        ports: set[int] = set()
        while len(ports) < 2 * self.masters:
            ports.add(free_port())
        it = iter(sorted(ports))
        self.nodes = [ClusterNode(self.root, next(it), next(it)) for _ in range(self.masters)]
        try:
            for n in self.nodes:
                n.start()
            deadline = time.monotonic() + START_TIMEOUT_S
            for n in self.nodes:
                n.wait_up(deadline)
            self._create(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self, deadline: float) -> None:
        """Slots in contiguous ranges, one per master, then MEET, then wait for state ok."""
        for i, n in enumerate(self.nodes):
            lo, hi = i * SLOTS // self.masters, (i + 1) * SLOTS // self.masters - 1
            with n.client() as c:
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
        with self.nodes[0].client() as c:
            for n in self.nodes[1:]:
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", n.port, n.bus_port)
        while True:
            if all(self._ok(n) for n in self.nodes):
                return
            if time.monotonic() > deadline:
                raise OrderqError(f"cluster did not reach cluster_state:ok; see logs under {self.root}")
            time.sleep(0.05)

    def _ok(self, n: ClusterNode) -> bool:
        try:
            with n.client() as c:
                info = c.execute_command("CLUSTER", "INFO")
                slots = c.execute_command("CLUSTER", "SLOTS")
        except (redis.RedisError, OSError):
            return False
        text = info.decode() if isinstance(info, bytes) else str(info)
        # Every node must know every master's slots, not just report ok on its own.
        return "cluster_state:ok" in text and len(slots) == self.masters

    def stop(self) -> None:
        for n in self.nodes:  # all at once, then wait for each
            n.terminate()
        for n in self.nodes:
            n.wait()

    def kill(self) -> None:
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is None:
                n.proc.kill()
                n.proc.wait()


def main(data_dir: Path, masters: int = 3) -> int:
    """Run until Ctrl-C / SIGTERM, then stop every node gracefully."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster = DevCluster(data_dir, masters).start()
    try:
        print(f"orderq: dev cluster of {masters} masters up: {' '.join(cluster.urls)}", file=sys.stderr)
        print(f"export ORDERQ_REDIS_CLUSTER=1 ORDERQ_REDIS_URL={cluster.url}", flush=True)
        while not stop.is_set():
            if any(n.proc is not None and n.proc.poll() is not None for n in cluster.nodes):
                print("orderq: a cluster node exited; stopping the others", file=sys.stderr)
                return 1
            stop.wait(0.5)
        return 0
    finally:
        cluster.stop()
