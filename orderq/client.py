"""Redis connection, server checks, consumer groups and the Lua scripts.

Every orderq process calls :func:`connect` at start: it resolves the server
(``ORDERQ_REDIS_URL`` or the embedded one found through ``ORDERQ_DATA_DIR``),
refuses a misconfigured one, and loads the scripts once (``EVALSHA`` afterwards).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast, overload

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

from orderq import keys, wire
from orderq.commands import Client, Key, Pipe, StreamRead, Value
from orderq.errors import ConfigError, ServerCheckError
from orderq.settings import Settings

# What "Redis is unavailable" looks like to a caller: redis-py's errors, the cluster client's own
# (not RedisError subclasses), and socket errors. Answered 503 + Retry-After, never 500.
UNAVAILABLE: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError)

SCRIPT_NAMES = (
    "intake",
    "handoff",
    "execute",
    "reclaim",
    "take",
    "replay",
    "ratelimit",
    # validation ledger, review and holds
    "checks",
    "release",
    "restock",
    "review",
    "unhold",
    # downstream dispatch: ack+delete delivered outbox entries, dead-letter given-up ones
    "dispatched",
    # fulfilment routing: warehouses, gifts, freight
    "route",
    # warehouse removal that refuses while the warehouse holds stock
    "retire",
    # an entry that failed alone: dead-lettered at once, its batch-mates go on
    "poison",
    # dead letters an operator replays or discards
    "deadletter",
    # orderq audit and the client-side oracle: status records read per SCAN step
    "audit",
    # the backlog of a partition, sampled by the breaker and /v1/stats (orderq/stats.py)
    "backlog",
    # cancellation: the partition's decision, and the ledger release of what a cancelled order held
    "cancel",
    "unreserve",
    # order events (shipment, delivery, return; trust and conflicts), and a return's units back
    "event",
    "returned",
    # pull connectors (connect/state.py): leases, the fenced cursor, the configured list
    "connect_lease_take",
    "connect_lease_release",
    "connect_advance",
    "connect_configured",
)
URL_FILE = "redis.url"  # written by the embedded server under ORDERQ_DATA_DIR


def load_lua(name: str) -> str:
    return wire.with_tables(resources.files("orderq").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8"))


def resolve_url(settings: Settings) -> str:
    """The server URL: ``ORDERQ_REDIS_URL``, else the embedded server's under the data dir."""
    if settings.redis_url:
        return settings.redis_url
    path = settings.data_dir / URL_FILE
    try:
        url = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(
            "ORDERQ_REDIS_URL",
            f"unset, and no embedded server found under ORDERQ_DATA_DIR={settings.data_dir} "
            "(start one with `orderq up`, or set ORDERQ_REDIS_URL)",
        ) from None
    return url


class _PackInC:
    """Commands packed by hiredis in C. redis-py first passes every argument through its
    Python encoder, one call each: a batch's script call has two keys and two values per order
    (an 800-argument ``EVALSHA`` for 200 orders: 1.2 ms of Python per call here, 0.19 ms in
    C). What hiredis does not take (a bool, a bytearray, None: its TypeError) and a first
    argument of several words (``"CONFIG SET"``) go redis-py's way, its conversions and
    errors unchanged."""

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if (isinstance(first, str) and " " not in first) or (isinstance(first, bytes) and b" " not in first):
            try:
                return [hiredis.pack_command(args)]
            except TypeError:
                pass
        return super().pack_command(*args)  # type: ignore[misc,no-any-return]


class _Connection(_PackInC, aioredis.Connection):
    pass


class _UnixConnection(_PackInC, aioredis.UnixDomainSocketConnection):
    pass


class _SSLConnection(_PackInC, aioredis.SSLConnection):
    pass


_PACKED_IN_C: dict[type, type] = {
    aioredis.Connection: _Connection,
    aioredis.UnixDomainSocketConnection: _UnixConnection,
    aioredis.SSLConnection: _SSLConnection,
}


def make_client(url: str, cluster: bool = False, **kw: object) -> Client:
    """A ``redis.asyncio`` client (or ``RedisCluster``) for ``url``. Replies stay bytes
    (``decode_responses=False``): the types :class:`~orderq.commands.Client` declares. A
    single server's connections pack commands in C (:class:`_PackInC`); the cluster client
    fixes its own connection class."""
    opts: dict[str, object] = {"decode_responses": False, "health_check_interval": 0}
    opts.update(kw)
    if cluster:
        return cast(Client, RedisCluster.from_url(url, **opts))
    client = aioredis.from_url(url, **opts)
    pool = client.connection_pool
    pool.connection_class = _PACKED_IN_C.get(pool.connection_class, pool.connection_class)
    return cast(Client, client)


@dataclass
class Redis:
    """The connected server: client, settings, partitions and loaded scripts."""

    client: Client
    settings: Settings
    url: str
    shas: dict[str, str]

    @property
    def partitions(self) -> tuple[keys.Partition, ...]:
        return keys.partitions(self.settings.partitions)

    def partition_of(self, order_key: str) -> keys.Partition:
        return self.partitions[keys.partition_of(order_key, self.settings.partitions)]

    @property
    def cluster(self) -> RedisCluster | None:
        """The client as a cluster client, for what only a cluster has (its nodes); None on a
        single server."""
        return cluster_of(self.client)

    def route(self, key: str) -> dict[str, ClusterNode | None]:
        """Cluster: ``target_nodes`` for a command on ``key``'s slot. redis-py would otherwise ask
        the server (COMMAND GETKEYS, one round trip) where XREAD/XREADGROUP's keys are, every call."""
        cluster = self.cluster
        if cluster is None:
            return {}
        return {"target_nodes": cluster.get_node_from_key(key)}

    @overload
    def xreadgroup(
        self, target: Pipe, group: str, consumer: str, stream: str, count: int, block: int | None = None
    ) -> object: ...
    @overload
    def xreadgroup(
        self, target: Client, group: str, consumer: str, stream: str, count: int, block: int | None = None
    ) -> Awaitable[StreamRead]: ...
    def xreadgroup(
        self, target: Client | Pipe, group: str, consumer: str, stream: str, count: int, block: int | None = None
    ) -> object:
        """``XREADGROUP ... STREAMS stream >`` on ``target`` (client or pipeline), routed to the
        stream's master on a cluster (redis-py's ``xreadgroup`` takes no ``target_nodes``)."""
        pieces: list[Value] = ["GROUP", group, consumer, "COUNT", count]
        if block is not None:
            pieces += ["BLOCK", block]
        return target.execute_command("XREADGROUP", *pieces, "STREAMS", stream, ">", **self.route(stream))

    def script(self, pipe: Pipe, name: str, keys: Sequence[Key], args: Sequence[Value]) -> Pipe:
        """Queue script ``name`` on ``pipe`` (``EVALSHA``; loaded once at connect). Through
        ``execute_command``: redis-py refuses ``pipe.evalsha`` in a cluster pipeline, though it
        routes the command itself by its first key like any other."""
        pipe.execute_command("EVALSHA", self.shas[name], len(keys), *keys, *args)
        return pipe

    async def run(self, build: Callable[[Pipe], object], raise_on_error: bool = True) -> list[Any]:
        """Build and execute one pipeline (one round trip). A server that lost its script
        cache (restarted) gets the scripts again and the pipeline is re-run: every orderq
        script is idempotent, so a re-run never doubles anything."""
        for attempt in (0, 1):
            pipe = self.client.pipeline(transaction=False)
            build(pipe)
            try:
                replies = list(await pipe.execute(raise_on_error=raise_on_error))
            except NoScriptError:
                if attempt:
                    raise
                await load_scripts(self.client)
                continue
            # Errors handed back per command (raise_on_error=False) include a missing script
            # too, e.g. on a replica promoted by a failover: reload and re-run rather than let
            # healthy entries count a failed delivery each.
            if attempt or not any(isinstance(x, NoScriptError) for x in replies):
                return replies
            await load_scripts(self.client)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self.client.aclose()


def cluster_of(client: Client) -> RedisCluster | None:
    """``client`` as the cluster client it is, else None. (Narrowed from ``object``: mypy holds
    that no RedisCluster can be a :class:`~orderq.commands.Client`, whose replies are bytes
    where redis-py's types say ``bytes | str``, and would skip the narrowed branch unchecked.)"""
    plain: object = client
    return plain if isinstance(plain, RedisCluster) else None


async def check_server(client: Client) -> None:
    """Refuse a server orderq cannot keep its guarantee on; on a cluster, every master."""
    cluster = cluster_of(client)
    if cluster is not None:
        try:
            await cluster.initialize()  # learn the topology: no masters are known before the first command
        except RedisClusterException as exc:
            raise ServerCheckError("ORDERQ_REDIS_CLUSTER", f"is 1, but the server is no cluster node ({exc})") from None
        for node in cluster.get_primaries():  # each master holds some partitions: check them all
            await _check_node(client, f"cluster node {node.host}:{node.port}: ", {"target_nodes": node})
        return
    await _check_node(client, "", {})
    if str((await client.info("cluster")).get("cluster_enabled", 0)) == "1":
        # Plain client on a cluster node: every key of another master's slots would fail (MOVED).
        raise ServerCheckError("ORDERQ_REDIS_CLUSTER", "is 0, but the server is a Redis Cluster node; set it to 1")


async def _check_node(client: Client, where: str, kw: dict[str, ClusterNode]) -> None:
    info = await client.info("server", **kw)
    if isinstance(info, dict) and info and all(isinstance(v, dict) for v in info.values()):
        info = next(iter(info.values()))  # a per-node answer (one node targeted)
    version = str(info.get("valkey_version") or info.get("redis_version") or "0")
    is_valkey = "valkey_version" in info or info.get("server_name") == "valkey"
    major_minor = tuple(int(x) for x in version.split(".")[:2])
    if major_minor < ((7, 2) if is_valkey else (7, 0)):
        raise ServerCheckError(
            "ORDERQ_REDIS_URL", f"{where}server version {version} is too old (need Redis >= 7 / Valkey >= 7.2)"
        )
    policy = await _config_get(client, "maxmemory-policy", kw)
    if policy and policy != "noeviction":
        raise ServerCheckError(
            "ORDERQ_REDIS_URL",
            f"{where}server has maxmemory-policy {policy}; orderq needs noeviction (eviction loses orders)",
        )
    aof = await _config_get(client, "appendonly", kw)
    save = await _config_get(client, "save", kw)
    if aof != "yes" and not save:
        raise ServerCheckError(
            "ORDERQ_REDIS_URL",
            f'{where}server has no persistence (appendonly no, save ""); orderq needs the append-only file',
        )


async def _config_get(client: Client, name: str, kw: dict[str, ClusterNode]) -> str | None:
    try:
        r = await client.config_get(name, **kw)
    except ResponseError:
        return None  # CONFIG may be renamed/disabled on managed servers; nothing to check then
    if isinstance(r, dict) and r and all(isinstance(v, dict) for v in r.values()):
        r = next(iter(r.values()))
    value = r.get(name) if isinstance(r, dict) else None
    if value is None and isinstance(r, dict):
        value = r.get(name.encode())
    return value.decode() if isinstance(value, bytes) else value


async def ensure_groups(r: Redis) -> None:
    """Create the consumer groups at id 0 (never ``$``), idempotently."""
    pipe = r.client.pipeline(transaction=False)
    for p in r.partitions:
        pipe.xgroup_create(p.intake, keys.GROUP_VALIDATE, id="0", mkstream=True)
        for lane in p.lanes:
            pipe.xgroup_create(lane, keys.GROUP_EXECUTE, id="0", mkstream=True)
    for res in await pipe.execute(raise_on_error=False):
        if isinstance(res, Exception) and "BUSYGROUP" not in str(res):
            raise res


async def load_scripts(client: Client) -> dict[str, str]:
    return {name: await client.script_load(load_lua(name)) for name in SCRIPT_NAMES}


async def connect(settings: Settings, check: bool = True, **kw: object) -> Redis:
    """Connect, check the server, ensure groups and load the scripts."""
    url = resolve_url(settings)
    client = make_client(url, settings.redis_cluster, **kw)
    try:
        if check:
            await check_server(client)
        cluster = cluster_of(client)
        masters = len(cluster.get_primaries()) if cluster is not None else 1
        if settings.partitions < masters:
            raise ConfigError(
                "ORDERQ_PARTITIONS",
                f"{settings.partitions} partitions on {masters} cluster masters: "
                "a master without a partition does no work (use >= 4 per master)",
            )
        r = Redis(client=client, settings=settings, url=url, shas=await load_scripts(client))
        await ensure_groups(r)
    except BaseException:
        await client.aclose()
        raise
    return r
