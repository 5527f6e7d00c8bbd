"""``orderq cluster-dev``: a local Redis Cluster (Valkey, 3 masters, optionally replicas) for
development and tests.

Each node is the embedded ``valkey-server`` on a free loopback port, with its own data
directory under ``ORDERQ_DATA_DIR/cluster/<port>`` and the same durability settings as the
embedded single server (append-only file, ``appendfsync everysec``, ``noeviction``): a
replica keeps its own append-only file too. Slots are assigned in contiguous ranges
(``CLUSTER ADDSLOTSRANGE``), the nodes introduced with ``CLUSTER MEET`` and each replica
attached to its master with ``CLUSTER REPLICATE``: no ``valkey-cli`` needed.

With replicas the nodes fail over by themselves: a master unreachable for
``cluster-node-timeout`` (2 s here) is marked failed and its replica elected in its place.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

from orderq.errors import OrderqError
from orderq.server import DURABLE_CONFIG, free_port, spawn

SLOTS = 16384
START_TIMEOUT_S = 30.0  # six nodes, MEET gossip and the replicas' first sync on a busy machine
STOP_TIMEOUT_S = 15.0
# How long a node may be unreachable before the others mark it failed. Masters only: a failed
# master takes the whole cluster down (full coverage lost) until it is back, so be patient.
# With replicas: a dead master's replica is elected after about this long plus the election
# (a few hundred ms), so keep it short for a dev cluster; in production weigh false failovers.
NODE_TIMEOUT_MS = 5000
FAILOVER_NODE_TIMEOUT_MS = 2000


class ClusterNode:
    """One node (a master, or a replica when ``master`` is set): its port, cluster bus port,
    directory and process."""

    def __init__(
        self, root: Path, port: int, bus_port: int, node_timeout_ms: int, master: ClusterNode | None = None
    ) -> None:
        self.port = port
        self.bus_port = bus_port
        self.node_timeout_ms = node_timeout_ms
        self.master = master  # the master this node was started to replicate, if any
        self.dir = root / str(port)
        self.proc: subprocess.Popen[bytes] | None = None
        self.id = ""  # CLUSTER MYID, once up

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

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
                    f"cluster-node-timeout {self.node_timeout_ms}",
                    # A (re)joining replica gets its copy at once; the default waits 5 s in case
                    # more replicas arrive to share the transfer.
                    "repl-diskless-sync-delay 0",
                    *DURABLE_CONFIG,
                    f"logfile {self.dir / 'valkey.log'}",
                    "latency-tracking no",
                ]
            )
            + "\n",
            encoding="utf-8",
        )
        self.proc = spawn(conf)

    def wait_up(self, deadline: float) -> None:
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise OrderqError(f"valkey-server exited with {self.proc.returncode}; see {self.dir / 'valkey.log'}")
            try:
                with self.client() as c:
                    c.ping()
                    self.id = _text(c.execute_command("CLUSTER", "MYID"))
                return
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise OrderqError(f"cluster node {self.port} did not answer; see {self.dir / 'valkey.log'}")
            time.sleep(0.02)

    def role(self) -> str:
        """``master`` or ``slave`` as the node itself says now; ``""`` if it does not answer."""
        try:
            with self.client() as c:
                return _text(c.execute_command("ROLE")[0])
        except (redis.RedisError, OSError):
            return ""

    def kill(self) -> None:
        """SIGKILL, as a crash would: no append-only file fsync, no goodbye to the cluster."""
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()

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
    """A fresh local cluster under ``data_dir/cluster``: ``masters`` masters and ``replicas``
    replicas of each; ``start()`` / ``stop()``. ``nodes`` are the masters as started (a
    failover changes who is master: see :meth:`wait_failover`), ``replica_nodes`` the rest."""

    def __init__(self, data_dir: Path, masters: int = 3, replicas: int = 0, node_timeout_ms: int | None = None) -> None:
        if masters < 1 or replicas < 0:
            raise OrderqError(f"a cluster needs at least 1 master and 0 or more replicas, got {masters} / {replicas}")
        self.root = Path(data_dir).resolve() / "cluster"
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms or (FAILOVER_NODE_TIMEOUT_MS if replicas else NODE_TIMEOUT_MS)
        self.nodes: list[ClusterNode] = []
        self.replica_nodes: list[ClusterNode] = []

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def all_nodes(self) -> list[ClusterNode]:
        return self.nodes + self.replica_nodes

    def start(self) -> DevCluster:
        # A fresh cluster each time: a node keeps its identity and slots in nodes.conf,
        # and a half-remembered topology from an earlier run would never reach state ok.
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        count = self.masters * (1 + self.replicas)
        ports: set[int] = set()
        while len(ports) < 2 * count:
            ports.add(free_port())
        it = iter(sorted(ports))
        timeout = self.node_timeout_ms
        self.nodes = [ClusterNode(self.root, next(it), next(it), timeout) for _ in range(self.masters)]
        self.replica_nodes = [
            ClusterNode(self.root, next(it), next(it), timeout, master=m)
            for m in self.nodes
            for _ in range(self.replicas)
        ]
        try:
            for n in self.all_nodes:
                n.start()
            deadline = time.monotonic() + START_TIMEOUT_S
            for n in self.all_nodes:
                n.wait_up(deadline)
            self._create(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self, deadline: float) -> None:
        """Slots in contiguous ranges, one per master, then MEET; once every node knows every
        other, each replica REPLICATEs its master; then wait for state ok and synced replicas."""
        for i, n in enumerate(self.nodes):
            lo, hi = i * SLOTS // self.masters, (i + 1) * SLOTS // self.masters - 1
            with n.client() as c:
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
        with self.nodes[0].client() as c:
            for n in self.all_nodes[1:]:
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", n.port, n.bus_port)
        if self.replica_nodes:
            # CLUSTER REPLICATE needs the master known to the replica (gossip spreads MEET).
            self._until(
                lambda: all(self._knows_all(n) for n in self.all_nodes), deadline, "every node to know every other"
            )
            for n in self.replica_nodes:
                assert n.master is not None
                with n.client() as c:
                    c.execute_command("CLUSTER", "REPLICATE", n.master.id)
        self._until(lambda: all(self._ok(n) for n in self.all_nodes), deadline, "cluster_state:ok with synced replicas")

    def _until(self, check: Callable[[], bool], deadline: float, what: str) -> None:
        while not check():
            if time.monotonic() > deadline:
                raise OrderqError(f"cluster-dev: timed out waiting for {what}; see logs under {self.root}")
            time.sleep(0.05)

    def _knows_all(self, n: ClusterNode) -> bool:
        try:
            with n.client() as c:
                lines = _text(c.execute_command("CLUSTER", "NODES")).splitlines()
        except (redis.RedisError, OSError):
            return False
        known = {line.split()[0] for line in lines if "handshake" not in line and "noaddr" not in line}
        return {m.id for m in self.all_nodes} <= known

    def _ok(self, n: ClusterNode) -> bool:
        try:
            with n.client() as c:
                info = _text(c.execute_command("CLUSTER", "INFO"))
                slots = c.execute_command("CLUSTER", "SLOTS")
                repl = c.info("replication")
        except (redis.RedisError, OSError):
            return False
        # Every node must know every master's slots, not just report ok on its own; a replica
        # must have finished its first sync, a master must see its replicas online. (CLUSTER
        # SLOTS lists a replica only once its replication offset is past 0: not a sign to use.)
        if n.master is None:
            synced = int(repl.get("connected_slaves", 0)) == self.replicas
        else:
            synced = repl.get("master_link_status") == "up" and repl.get("master_port") == n.master.port
        return "cluster_state:ok" in info and len(slots) == self.masters and synced

    def master_nodes(self) -> list[ClusterNode]:
        """The live nodes that are masters now (after a failover, promoted replicas too)."""
        return [n for n in self.all_nodes if n.alive and n.role() == "master"]

    def wait_failover(self, dead: ClusterNode, timeout: float = 30.0) -> ClusterNode:
        """After ``dead`` (a master) was killed: wait until one of its replicas is master and
        every live node reports ``cluster_state:ok`` again; return the new master."""
        deadline = time.monotonic() + timeout
        candidates = [n for n in self.replica_nodes if n.master is dead]
        if not candidates:
            raise OrderqError(f"cluster-dev: :{dead.port} was started without replicas; nothing can take over")
        promoted: list[ClusterNode] = []

        def done() -> bool:
            promoted[:] = [n for n in candidates if n.alive and n.role() == "master"]
            return bool(promoted) and all(self._state_ok(n) for n in self.all_nodes if n.alive)

        self._until(done, deadline, f"a replica of :{dead.port} to take over")
        return promoted[0]

    def restart(self, node: ClusterNode, timeout: float = START_TIMEOUT_S) -> None:
        """Start a killed node again on its own data directory. It rejoins under the identity in
        its ``nodes.conf``; a master that was failed over comes back as a replica of its
        successor, which sends it a full copy. Returns once it is synced (or serving)."""
        node.start()
        deadline = time.monotonic() + timeout
        node.wait_up(deadline)

        def back() -> bool:
            try:
                with node.client() as c:
                    repl = c.info("replication")
                    info = _text(c.execute_command("CLUSTER", "INFO"))
            except (redis.RedisError, OSError):
                return False
            return "cluster_state:ok" in info and (
                repl.get("role") == "master" or repl.get("master_link_status") == "up"
            )

        self._until(back, deadline, f"restarted node :{node.port} to rejoin")

    def _state_ok(self, n: ClusterNode) -> bool:
        try:
            with n.client() as c:
                return "cluster_state:ok" in _text(c.execute_command("CLUSTER", "INFO"))
        except (redis.RedisError, OSError):
            return False

    def stop(self) -> None:
        for n in self.all_nodes:  # all at once, then wait for each
            n.terminate()
        for n in self.all_nodes:
            n.wait()

    def kill(self) -> None:
        for n in self.all_nodes:
            n.kill()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def main(data_dir: Path, masters: int = 3, replicas: int = 0) -> int:
    """Run until Ctrl-C / SIGTERM, then stop every node gracefully. Masters only, a node that
    exits stops the rest (the cluster is down without it); with replicas the cluster fails
    over and keeps running, and each exit is reported once."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster = DevCluster(data_dir, masters, replicas).start()
    try:
        shape = f"{masters} masters" + (f" + {replicas} replica(s) each" if replicas else "")
        print(f"orderq: dev cluster of {shape} up: masters {' '.join(cluster.urls)}", file=sys.stderr)
        if replicas:
            pairs = " ".join(f":{n.port}->:{n.master.port}" for n in cluster.replica_nodes if n.master is not None)
            print(f"orderq: replicas {pairs} (cluster-node-timeout {cluster.node_timeout_ms} ms)", file=sys.stderr)
        print(f"export ORDERQ_REDIS_CLUSTER=1 ORDERQ_REDIS_URL={cluster.url}", flush=True)
        reported: set[int] = set()
        while not stop.is_set():
            gone = [n for n in cluster.all_nodes if n.proc is not None and n.proc.poll() is not None]
            if gone and not replicas:
                print("orderq: a cluster node exited; stopping the others", file=sys.stderr)
                return 1
            if len(gone) == len(cluster.all_nodes):
                print("orderq: every cluster node exited", file=sys.stderr)
                return 1
            for n in gone:
                if n.port not in reported:
                    reported.add(n.port)
                    print(
                        f"orderq: cluster node :{n.port} exited; its replica takes over if it was a master",
                        file=sys.stderr,
                    )
            stop.wait(0.5)
        return 0
    finally:
        cluster.stop()
