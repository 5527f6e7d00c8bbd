"""Group commit: the orders of every request that arrives in one event-loop turn are
written together, one intake script call per partition, all in one pipelined round
trip (plus, on each master written to, one ``WAITAOF`` in ``fsync`` durability and one
``WAIT`` for ``ORDERQ_WAIT_REPLICAS`` replicas). Each request is answered only after its own
write is confirmed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from orderq.client import Redis
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
        ttl = self.settings.status_ttl_s
        deadline_ms = self.settings.ack_deadline_ms
        # After the writes, on their connection, one wait of each kind for the whole group: the
        # local append-only file (fsync durability), then ORDERQ_WAIT_REPLICAS replicas holding
        # the writes (WAIT: received; WAITAOF's replica count would add the replicas' once-a-second
        # fsync, about 1 s, to every acknowledgement).
        kinds: list[tuple[Any, ...]] = []
        if self.settings.durability == "fsync":
            kinds.append(("WAITAOF", 1, 0, deadline_ms))
        if self.settings.wait_replicas:
            kinds.append(("WAIT", self.settings.wait_replicas, deadline_ms))

        def build(pipe: Any) -> None:
            for p, items in by_part.items():
                ks = [p.intake, p.counters]
                args: list[Any] = [ttl]
                for key, payload, tier, _ in items:
                    ks.append(p.status(key))
                    args += [key, payload, "vip" if tier == "vip" else ""]
                self.r.script(pipe, "intake", ks, args)
            for route, cmd in waits:  # same connection as the writes: they wait for exactly these
                pipe.execute_command(*cmd, **route)

        # Cluster: the waits go to each master written to, routed there: redis-py sends a node's
        # commands in order on one connection, so they wait for exactly these writes.
        routes: list[dict[str, Any]] = []
        if kinds and self.settings.redis_cluster:
            by_node = (self.r.route(p.intake) for p in by_part)
            routes = list({route["target_nodes"].name: route for route in by_node}.values())
        elif kinds:
            routes = [{}]
        waits = [(route, cmd) for route in routes for cmd in kinds]
        try:
            async with asyncio.timeout(deadline_ms / 1000):
                results = await self.r.run(build)
            for (_, cmd), res in zip(waits, results[len(results) - len(waits) :], strict=True):
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
            for _, _, _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            return
        for (_p, items), res in zip(by_part.items(), results, strict=False):
            for (_, _, _, fut), flag in zip(items, res, strict=True):
                if not fut.done():
                    fut.set_result(int(flag))

    async def close(self) -> None:
        if self._pending:
            self._flush()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _answer(res: Any) -> Any:
    """A wait's answer: WAITAOF's [numlocal, numreplicas], WAIT's count of replicas (redis-py
    may wrap a routed command's answer by node name)."""
    if isinstance(res, dict):
        res = next(iter(res.values()))
    return [int(x) for x in res] if isinstance(res, list | tuple) else int(res)
