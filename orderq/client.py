"""Redis connection, server checks, consumer groups and the Lua scripts.

Every orderq process calls :func:`connect` at start: it resolves the server
(``ORDERQ_REDIS_URL`` or the embedded one found through ``ORDERQ_DATA_DIR``),
refuses a misconfigured one, and loads the scripts once (``EVALSHA`` afterwards).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

from orderq import keys
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
    # validation ledger, review and holds (issue 4)
    "rules",
    "release",
    "restock",
    "review",
    "unhold",
    # downstream dispatch (issue 6): ack+delete delivered outbox entries, dead-letter given-up ones
    "dispatched",
    # fulfilment routing (issue 9): warehouses, gifts, freight
    "route",
    # warehouse removal that refuses while the warehouse holds stock (issue 13)
    "retire",
    # an entry that failed alone: dead-lettered at once, its batch-mates go on (issue 13)
    "poison",
    # dead letters an operator replays or discards (issue 13)
    "deadletter",
    # orderq audit and the client-side oracle: status records read per SCAN step (issue 13)
    "audit",
)
URL_FILE = "redis.url"  # written by the embedded server under ORDERQ_DATA_DIR


def load_lua(name: str) -> str:
    return resources.files("orderq").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


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


def make_client(url: str, cluster: bool = False, **kw: Any) -> Any:
    """A ``redis.asyncio`` client (or ``RedisCluster``) for ``url``."""
    opts: dict[str, Any] = {"decode_responses": False, "health_check_interval": 0}
    opts.update(kw)
    if cluster:
        return RedisCluster.from_url(url, **opts)
    return aioredis.from_url(url, **opts)


@dataclass
class Redis:
    """The connected server: client, settings, partitions and loaded scripts."""

    client: Any
    settings: Settings
    url: str
    shas: dict[str, str]

    @property
    def partitions(self) -> tuple[keys.Partition, ...]:
        return keys.partitions(self.settings.partitions)

    def partition_of(self, order_key: str) -> keys.Partition:
        return self.partitions[keys.partition_of(order_key, self.settings.partitions)]

    def route(self, key: str) -> dict[str, Any]:
        """Cluster: ``target_nodes`` for a command on ``key``'s slot. redis-py would otherwise ask
        the server (COMMAND GETKEYS, one round trip) where XREAD/XREADGROUP's keys are, every call."""
        if not self.settings.redis_cluster:
            return {}
        return {"target_nodes": self.client.get_node_from_key(key)}

    def xreadgroup(
        self, target: Any, group: str, consumer: str, stream: str, count: int, block: int | None = None
    ) -> Any:
        """``XREADGROUP ... STREAMS stream >`` on ``target`` (client or pipeline), routed to the
        stream's master on a cluster (redis-py's ``xreadgroup`` takes no ``target_nodes``)."""
        pieces: list[Any] = ["GROUP", group, consumer, "COUNT", count]
        if block is not None:
            pieces += ["BLOCK", block]
        return target.execute_command("XREADGROUP", *pieces, "STREAMS", stream, ">", **self.route(stream))

    def script(self, pipe: Any, name: str, keys: Sequence[Any], args: Sequence[Any]) -> None:
        """Queue script ``name`` on ``pipe`` (``EVALSHA``; loaded once at connect). Through
        ``execute_command``: redis-py refuses ``pipe.evalsha`` in a cluster pipeline, though it
        routes the command itself by its first key like any other."""
        pipe.execute_command("EVALSHA", self.shas[name], len(keys), *keys, *args)

    async def run(self, build: Callable[[Any], object], raise_on_error: bool = True) -> list[Any]:
        """Build and execute one pipeline (one round trip). A server that lost its script
        cache (restarted) gets the scripts again and the pipeline is re-run: every orderq
        script is idempotent, so a re-run never doubles anything."""
        for attempt in (0, 1):
            pipe = self.client.pipeline(transaction=False)
            build(pipe)
            try:
                return list(await pipe.execute(raise_on_error=raise_on_error))
            except NoScriptError:
                if attempt:
                    raise
                await load_scripts(self.client)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self.client.aclose()


async def check_server(client: Any) -> dict[str, Any]:
    """Refuse a server orderq cannot keep its guarantee on; on a cluster, every master."""
    if isinstance(client, RedisCluster):
        try:
            await client.initialize()  # learn the topology: no masters are known before the first command
        except RedisClusterException as exc:
            raise ServerCheckError("ORDERQ_REDIS_CLUSTER", f"is 1, but the server is no cluster node ({exc})") from None
        out: dict[str, Any] = {}
        for node in client.get_primaries():  # each master holds some partitions: check them all
            out = await _check_node(client, f"cluster node {node.host}:{node.port}: ", {"target_nodes": node})
        return out
    out = await _check_node(client, "", {})
    if str((await client.info("cluster")).get("cluster_enabled", 0)) == "1":
        # Plain client on a cluster node: every key of another master's slots would fail (MOVED).
        raise ServerCheckError("ORDERQ_REDIS_CLUSTER", "is 0, but the server is a Redis Cluster node; set it to 1")
    return out


async def _check_node(client: Any, where: str, kw: dict[str, Any]) -> dict[str, Any]:
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
    return {"version": version, "valkey": is_valkey, "aof": aof == "yes"}


async def _config_get(client: Any, name: str, kw: dict[str, Any] | None = None) -> str | None:
    try:
        r = await client.config_get(name, **(kw or {}))
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


async def load_scripts(client: Any) -> dict[str, str]:
    shas = {}
    for name in SCRIPT_NAMES:
        sha = await client.script_load(load_lua(name))
        shas[name] = sha.decode() if isinstance(sha, bytes) else str(sha)
    return shas


async def connect(settings: Settings, check: bool = True, **kw: Any) -> Redis:
    """Connect, check the server, ensure groups and load the scripts."""
    url = resolve_url(settings)
    client = make_client(url, settings.redis_cluster, **kw)
    try:
        if check:
            await check_server(client)
        if settings.redis_cluster and settings.partitions < len(client.get_primaries()):
            raise ConfigError(
                "ORDERQ_PARTITIONS",
                f"{settings.partitions} partitions on {len(client.get_primaries())} cluster masters: "
                "a master without a partition does no work (use >= 4 per master)",
            )
        r = Redis(client=client, settings=settings, url=url, shas=await load_scripts(client))
        await ensure_groups(r)
    except BaseException:
        await client.aclose()
        raise
    return r
