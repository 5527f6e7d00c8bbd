"""Group commit: the orders of every request that arrives in one event-loop turn are
written together, one intake script call per partition, in one pipelined round trip per
master (plus, on the same connection, one ``WAITAOF`` in ``fsync`` durability and one
``WAIT`` for ``ORDERQ_WAIT_REPLICAS`` replicas). Each request is answered only after its own
write is confirmed.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry

from orderq.client import Redis, cluster_of, load_lua
from orderq.errors import ServerUnavailable
from orderq.keys import Partition

FLUSH_AT = 512  # flush at once when this many orders wait, without waiting for the turn to end


class Committer:
    def __init__(self, r: Redis) -> None:
        self.r = r
        self.settings = r.settings
        self._pending: list[tuple[Partition, str, bytes, str, asyncio.Future[int]]] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._nodes: dict[str, Any] = {}  # cluster: a plain client per master (see _node)

    def submit(self, order_key: str, payload: bytes, tier: str) -> asyncio.Future[int]:
        """Queue one order; the future gives 1 (queued) or 0 (duplicate)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._pending.append((self.r.partition_of(order_key), order_key, payload, tier, fut))
        if len(self._pending) >= FLUSH_AT:
            self._flush()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return fut

    async def wait(self, futures: list[asyncio.Future[int]]) -> list[int]:
        """Results of ``futures``; :class:`ServerUnavailable` when the group write failed or
        passed the ack deadline (the deadline is on the write, not on each request)."""
        if len(futures) == 1:
            return [await futures[0]]
        return list(await asyncio.gather(*futures))

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.create_task(self._write(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _write(self, batch: list[tuple[Partition, str, bytes, str, asyncio.Future[int]]]) -> None:
        by_part: dict[Partition, list[tuple[str, bytes, str, asyncio.Future[int]]]] = {}
        for p, key, payload, tier, fut in batch:
            by_part.setdefault(p, []).append((key, payload, tier, fut))
        cluster = cluster_of(self.r.client)
        if cluster is None:
            await self._write_node(None, by_part)
            return
        # Cluster: one pipeline per master, each on a single connection of its own (see _node).
        by_node: dict[str, dict[Partition, list[tuple[str, bytes, str, asyncio.Future[int]]]]] = {}
        nodes: dict[str, Any] = {}
        for p, items in by_part.items():
            node = cluster.get_node_from_key(p.intake)
            if node is None:  # no master known for the slot (mid-failover): the channel sends again
                _fail(items, ServerUnavailable("no Redis master for the partition"))
                continue
            nodes[node.name] = node
            by_node.setdefault(node.name, {})[p] = items
        await asyncio.gather(*(self._write_node(nodes[name], parts) for name, parts in by_node.items()))

    async def _write_node(
        self, node: Any, by_part: dict[Partition, list[tuple[str, bytes, str, asyncio.Future[int]]]]
    ) -> None:
        """The intake scripts of ``by_part`` (all on one server), then the waits, in one pipeline
        on one connection. ``WAIT``/``WAITAOF`` only cover the writes made on the connection
        they run on, so nothing here may be re-sent elsewhere: redis-py's cluster pipeline
        retries a failed command on another node (a ``WAIT`` cut short by a dying master was
        answered by a healthy master that never saw the writes, and the 202 went out for an
        order the failover then erased). The intake script writes even for a duplicate (its
        counter), so a duplicate's answer waits for the record it found too."""
        ttl = self.settings.status_ttl_s
        deadline_ms = self.settings.ack_deadline_ms
        # One wait of each kind for the whole group: the local append-only file (fsync
        # durability), then ORDERQ_WAIT_REPLICAS replicas holding the writes (WAIT: received;
        # WAITAOF's replica count would add the replicas' once-a-second fsync, about 1 s, to
        # every acknowledgement).
        waits: list[tuple[Any, ...]] = []
        if self.settings.durability == "fsync":
            waits.append(("WAITAOF", 1, 0, deadline_ms))
        if self.settings.wait_replicas:
            waits.append(("WAIT", self.settings.wait_replicas, deadline_ms))

        def build(pipe: Any) -> None:
            for p, items in by_part.items():
                ks = [p.intake, p.counters]
                args: list[Any] = [ttl]
                for key, payload, tier, _ in items:
                    ks.append(p.status(key))
                    args += [key, payload, "vip" if tier == "vip" else ""]
                ks.append(p.cancel_pending)  # a cancel that came before its order (orderq/lifecycle.py)
                self.r.script(pipe, "intake", ks, args)
            for cmd in waits:
                pipe.execute_command(*cmd)

        try:
            async with asyncio.timeout(deadline_ms / 1000):
                if node is None:
                    results = await self.r.run(build)
                else:
                    results = await self._run_on(node, build)
            for cmd, res in zip(waits, results[len(results) - len(waits) :], strict=True):
                if cmd[0] == "WAITAOF" and _answer(res)[0] < 1:
                    raise ServerUnavailable("the write did not reach the append-only file in time")
                if cmd[0] == "WAIT" and (done := _answer(res)) < cmd[1]:
                    raise ServerUnavailable(f"the write reached {done} of {cmd[1]} replicas in time")
        except Exception as exc:
            # Any failure answers the group (503): one left uncaught would leave every request of
            # it waiting forever. redis-py's cluster client raises more than RedisError when a
            # master dies (RedisClusterException, even AttributeError from a closed transport).
            if isinstance(exc, ServerUnavailable):
                err = exc
            elif isinstance(exc, TimeoutError):
                err = ServerUnavailable("Redis did not confirm the write in time")
            else:
                err = ServerUnavailable(f"Redis write failed: {exc}")
            for items in by_part.values():
                _fail(items, err)
            if node is not None and not isinstance(exc, ServerUnavailable):
                self._refresh(next(iter(by_part)))
            return
        for items, res in zip(by_part.values(), results, strict=False):
            for (_, _, _, fut), flag in zip(items, res, strict=True):
                if not fut.done():
                    fut.set_result(int(flag))

    async def _run_on(self, node: Any, build: Any) -> list[Any]:
        """``build``'s pipeline on ``node`` alone, one connection, no retry (a script cache the
        node lost, as a promoted replica may have, is loaded and the pipeline sent once more)."""
        client = self._node(node)
        for attempt in (0, 1):
            pipe = client.pipeline(transaction=False)
            build(pipe)
            try:
                return list(await pipe.execute())
            except NoScriptError:
                if attempt:
                    raise
                for name in ("intake",):
                    await client.script_load(load_lua(name))
        raise AssertionError("unreachable")

    def _node(self, node: Any) -> Any:
        """A plain client for one cluster master, whose connections never retry: an error answers
        503 and the channel sends again, to the master the cluster names by then."""
        client = self._nodes.get(node.name)
        if client is None:
            kw = dict(node.connection_kwargs)
            kw["retry"] = Retry(NoBackoff(), 0)
            pool = aioredis.ConnectionPool(connection_class=node.connection_class, **kw)
            client = self._nodes[node.name] = aioredis.Redis(connection_pool=pool)
        return client

    def _refresh(self, p: Partition) -> None:
        """After a node failed us, let the cluster client learn the topology again (one keyed
        command follows MOVED and refreshes the slot map), so the next group goes to the new
        master. In the background: the failed group is answered already."""

        async def probe() -> None:
            with contextlib.suppress(Exception):
                await self.r.client.exists(p.intake)

        if not any(t.get_name() == "refresh" for t in self._tasks):
            task = asyncio.create_task(probe(), name="refresh")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._pending:
            self._flush()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for client in self._nodes.values():
            await client.aclose()
        self._nodes.clear()


def _answer(res: Any) -> Any:
    """A wait's answer: WAITAOF's [numlocal, numreplicas], WAIT's count of replicas (redis-py
    may wrap a routed command's answer by node name)."""
    if isinstance(res, dict):
        res = next(iter(res.values()))
    return [int(x) for x in res] if isinstance(res, list | tuple) else int(res)


def _fail(items: list[tuple[str, bytes, str, asyncio.Future[int]]], err: ServerUnavailable) -> None:
    """Answer every order of ``items`` with ``err`` (503): none may be left waiting."""
    for _, _, _, fut in items:
        if not fut.done():
            fut.set_exception(err)
