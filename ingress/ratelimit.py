"""Per-channel token buckets (``ORDERQ_CHANNEL_RATE``) shared by all ingress processes.

Requests gathered in one event-loop turn ask Redis in one script call; channels
without a configured rate cost nothing.
"""

from __future__ import annotations

import asyncio
from typing import Any

from orderq import keys
from orderq.client import Redis

BURST_S = 1.0  # a bucket holds this many seconds of its rate: absorbs jitter, not floods


class Limiter:
    def __init__(self, r: Redis) -> None:
        self.r = r
        self.rates = dict(r.settings.channel_rate)
        self._pending: list[tuple[str, int, asyncio.Future[int]]] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    def limited(self, channel: str) -> bool:
        return channel in self.rates

    async def take(self, channel: str, n: int) -> int:
        """0 when ``n`` orders of ``channel`` may pass, else seconds to wait (Retry-After)."""
        if channel not in self.rates:
            return 0
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._pending.append((channel, n, fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        task = asyncio.create_task(self._ask(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ask(self, batch: list[tuple[str, int, asyncio.Future[int]]]) -> None:
        ks = [keys.bucket_key(ch) for ch, _, _ in batch]
        args: list[Any] = []
        for ch, n, _ in batch:
            rate = self.rates[ch]
            args += [n, rate, max(float(n), rate * BURST_S)]
        try:
            (waits,) = await self.r.run(lambda pipe: self.r.script(pipe, "ratelimit", ks, args))
        except Exception as exc:
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (*_, fut), wait in zip(batch, waits, strict=True):
            if not fut.done():
                fut.set_result(int(wait))
