"""Shared control state every process keeps in memory: breaker stage, paused stages,
region holds. Learnt from pub/sub within milliseconds of a change, and re-read from
the keys every second for late joiners and missed messages — never a Redis round
trip per request. If the breaker controller dies, the last stage simply holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from typing import Any

import msgspec
import structlog

from orderq import keys, warehouses
from orderq.client import Redis

log = structlog.get_logger("orderq.control")

REFRESH_S = 1.0  # fallback re-read of the control keys
HEARTBEAT_S = 2.0  # worker registry refresh
CANCEL_AGAIN_S = 0.05  # stop(): a task still running this long after its cancel is cancelled again
DEREGISTER_S = 1.0  # stop(): longest wait to leave the worker registry (Redis may be away)


class Control:
    """In-memory mirror of the control keys, kept fresh in the background."""

    def __init__(self, r: Redis, stage_name: str | None = None) -> None:
        self.r = r
        self.stage = "normal"
        self.backlog = 0
        self.paused: frozenset[str] = frozenset()
        self.holds: dict[str, dict[str, Any]] = {}
        self.warehouses: dict[str, warehouses.Warehouse] = {}
        self._warehouses_raw: dict[bytes, bytes] = {}
        self.stage_name = stage_name
        self.worker_id = f"{stage_name}:{socket.gethostname()}:{os.getpid()}"
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> Control:
        await self.refresh()
        self._tasks.append(asyncio.create_task(self._listen()))
        self._tasks.append(asyncio.create_task(self._periodic()))
        return self

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        if self.stage_name:  # best effort: a stale entry ages out of /v1/stats by its heartbeat
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.r.client.hdel(keys.WORKERS_KEY, self.worker_id), DEREGISTER_S)

    async def refresh(self) -> None:
        pipe = self.r.client.pipeline(transaction=False)
        pipe.hmget(keys.BREAKER_KEY, "stage", "backlog")
        pipe.smembers(keys.PAUSED_KEY)
        pipe.hgetall(keys.HOLDS_KEY)
        pipe.hgetall(keys.WAREHOUSES_KEY)
        if self.stage_name:
            beat = {"stage": self.stage_name, "pid": os.getpid(), "host": socket.gethostname(), "ts": time.time()}
            pipe.hset(keys.WORKERS_KEY, self.worker_id, msgspec.json.encode(beat))
        res = await pipe.execute()
        stage, backlog = res[0]
        new_stage = stage.decode() if stage else "normal"
        self.backlog = int(backlog or 0)
        paused = frozenset(m.decode() for m in res[1])
        holds = {k.decode(): msgspec.json.decode(v) for k, v in res[2].items()}
        if res[3] != self._warehouses_raw:
            self._warehouses_raw = res[3]
            try:
                self.warehouses = warehouses.decode_all(res[3])
            except msgspec.DecodeError as exc:  # written by a newer version? keep the last good set
                log.warning("control.warehouses_unreadable", error=str(exc))
        self.stage, self.paused, self.holds = new_stage, paused, holds

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S if not self.stage_name else min(REFRESH_S, HEARTBEAT_S))
            try:
                await self.refresh()
            except Exception as exc:  # keep the last known state while Redis is away
                log.warning("control.refresh_failed", error=str(exc))

    async def _listen(self) -> None:
        while True:
            pubsub = self.r.client.pubsub()
            try:
                await pubsub.subscribe(keys.EVENTS_CHANNEL)
                async for msg in pubsub.listen():
                    if msg.get("type") == "message":
                        data = msgspec.json.decode(msg["data"])
                        if data.get("stage") and not data.get("paused"):
                            self.stage = data["stage"]
                            self.backlog = int(data.get("backlog", self.backlog))
                        await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("control.subscribe_failed", error=str(exc))
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()


async def cancel_and_wait(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until each has ended, cancelling again while one goes on.

    Once is not enough on Python 3.11: ``asyncio.wait_for`` (redis-py's socket timeout
    around every write) swallows a cancellation that lands as the awaited write completes
    (CPython gh-86296, fixed in 3.12), so a task cancelled while sending a command carries
    on, e.g. into ``pubsub.listen()``, which waits for ever; awaiting it hung the caller."""
    pending = set(tasks)
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=CANCEL_AGAIN_S)
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t  # (done: collects its outcome, so nothing warns "never retrieved")


async def publish(r: Redis, event: dict[str, Any]) -> None:
    """Tell every process that control state changed."""
    await r.client.publish(keys.EVENTS_CHANNEL, msgspec.json.encode(event))


async def set_paused(r: Redis, stage: str, paused: bool) -> None:
    if paused:
        await r.client.sadd(keys.PAUSED_KEY, stage)
    else:
        await r.client.srem(keys.PAUSED_KEY, stage)
    await publish(r, {"paused": stage if paused else "", "resumed": "" if paused else stage})
