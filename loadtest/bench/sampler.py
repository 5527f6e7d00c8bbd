"""Backlog, deferred syncs and breaker stage of the instance under test, sampled while a phase
runs: the backlog as ``orderq status`` counts it (:func:`orderq.stats.backlog`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from orderq import client as oq_client
from orderq import keys, stats

SAMPLE_S = 0.1  # backlog / breaker stage sampling period
DRAIN_SAMPLE_S = 0.025  # finer while a burst drains: its drain time gives executed orders/s


@dataclass
class Sampler:
    """Backlog, deferred syncs and breaker stage every ``period_s``."""

    r: oq_client.Redis
    period_s: float = SAMPLE_S
    samples: list[tuple[float, int, int, str]] = field(default_factory=list)  # (time, backlog, deferred, stage)
    task: asyncio.Task[None] | None = None
    error: str | None = None

    async def probe(self) -> tuple[int, int, str]:
        """(backlog, deferred syncs, breaker stage): the two reads go out together."""
        (backlog, depth), stage = await asyncio.gather(
            stats.backlog(self.r), self.r.client.hget(keys.BREAKER_KEY, "stage")
        )
        return backlog, depth["deferred"], (stage or b"normal").decode()

    async def _loop(self) -> None:
        while True:
            t0 = time.perf_counter()
            try:
                backlog, deferred, stage = await self.probe()
                self.samples.append((time.perf_counter(), backlog, deferred, stage))
            except Exception as exc:  # a sample lost is not worth the run
                self.error = repr(exc)
            await asyncio.sleep(max(0.0, self.period_s - (time.perf_counter() - t0)))

    def start(self) -> Sampler:
        self.samples.clear()
        self.task = asyncio.create_task(self._loop())
        return self

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    async def until_zero(
        self, since: float, timeout: float, on_backlog: Callable[[int], None] | None = None
    ) -> float | None:
        """First sample time >= ``since`` with backlog 0 (None after ``timeout``); ``on_backlog``
        sees the backlog of each sample from ``since`` on (for a progress display)."""
        deadline = time.perf_counter() + timeout
        seen = 0
        while time.perf_counter() < deadline:
            for t, backlog, _d, _s in self.samples[seen:]:
                if t >= since and on_backlog is not None:
                    on_backlog(backlog)
                if t >= since and backlog == 0:
                    return t
            seen = len(self.samples)
            await asyncio.sleep(self.period_s / 2)
        return None

    def peak(self) -> int:
        return max((b for _t, b, _d, _s in self.samples), default=0)

    def stages(self) -> list[str]:
        return list(dict.fromkeys(s for _t, _b, _d, s in self.samples))
