"""The breaker controller: samples the backlog 10 times a second, decides the breaker
level with hysteresis, publishes it (a key for late joiners plus pub/sub), and replays
deferred syncs once the level is back to ``normal``. The same process keeps the
dashboard's history (orderq/history.py) and evaluates the alerts (breaker/alerts.py).

The contract calls the level the breaker's "stage" (``/v1/stats``, the ``breaker.stage_changed``
log event, the ``stage_changes_<level>`` counters, the control key's field): those names stay;
in this package "stage" means a pipeline step only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import structlog

from breaker.alerts import Alerts
from orderq import history, keys, stats
from orderq.client import Redis
from orderq.control import Control, publish
from orderq.runner import Stage
from orderq.settings import Settings

log = structlog.get_logger("orderq.breaker")

SAMPLE_S = 0.1  # contract: level changes are known within 100 ms
REPLAY_BATCH = 200  # deferred syncs replayed per partition per tick


class BreakerLevel(StrEnum):
    """How hard orderq pushes back on new work (contract §6), mildest first."""

    NORMAL = "normal"
    DEGRADED = "degraded"  # executors skip the non-core syncs (deferred or dropped)
    SHEDDING = "shedding"  # the ingress also refuses ``regular`` and ``new`` orders (503)


_RANK = {level: rank for rank, level in enumerate(BreakerLevel)}


@dataclass
class Hysteresis:
    """Pure level decision: degraded at the open depth, shedding at the shed depth; step back
    down only after the backlog has stayed under the lower threshold for the cooldown."""

    settings: Settings
    level: BreakerLevel = BreakerLevel.NORMAL
    below_since: float | None = None

    def decide(self, backlog: int, now: float) -> BreakerLevel:
        s = self.settings
        if backlog >= s.shed_depth:
            target = BreakerLevel.SHEDDING
        elif backlog >= s.breaker_open_depth:
            target = BreakerLevel.DEGRADED
        else:
            target = BreakerLevel.NORMAL
        if _RANK[target] >= _RANK[self.level]:
            self.below_since = None
            self.level = target
            return self.level
        # Stepping down: shedding leaves once under the shed depth for the cooldown; degraded
        # leaves once under the close depth for the cooldown.
        floor = s.shed_depth if self.level == BreakerLevel.SHEDDING else s.breaker_close_depth
        if backlog >= floor:
            self.below_since = None
            return self.level
        if self.below_since is None:
            self.below_since = now
        if now - self.below_since >= s.breaker_cooldown_s:
            if self.level == BreakerLevel.SHEDDING and backlog >= s.breaker_close_depth:
                self.level = BreakerLevel.DEGRADED
                self.below_since = None
            else:
                self.level = BreakerLevel.NORMAL
        return self.level


class Breaker(Stage):
    """The breaker stage. ``run(drain=True)`` decides and replays until no deferred sync is
    left to replay now, without the once-a-second history and alerts."""

    stage = "breaker"

    def __init__(self, r: Redis, control: Control | None = None, consumer: str | None = None) -> None:
        super().__init__(r, control, consumer)
        self.hysteresis = Hysteresis(self.settings)
        self.vip_shed = False
        self.replayed = 0

    def started_fields(self) -> dict[str, Any]:
        return {"open_depth": self.settings.breaker_open_depth, "shed_depth": self.settings.shed_depth}

    def stopped_fields(self) -> dict[str, Any]:
        return {"replayed": self.replayed}

    async def run(self, drain: bool = False) -> int:
        """Returns the deferred syncs replayed."""
        prev = await self.r.client.hget(keys.BREAKER_KEY, "stage")
        if prev:  # a restarted controller resumes where it was
            with contextlib.suppress(ValueError):  # (an unknown value: start from normal)
                self.hysteresis.level = BreakerLevel(prev.decode())
        if drain:
            while True:
                before = self.replayed
                await self.tick(time.monotonic())
                if self.replayed == before:
                    return self.replayed
        # The dashboard's history and the alerts: once a second each, beside the 10/s sampler.
        side = [
            asyncio.create_task(history.run(self.r, self.stopping)),
            asyncio.create_task(Alerts(self.r).run(self.stopping)),
        ]
        try:
            await self._sample()
        finally:
            self.stopping.set()
            await asyncio.gather(*side, return_exceptions=True)
        return self.replayed

    async def _sample(self) -> None:
        while not self.stopping.is_set():
            t0 = time.monotonic()
            try:
                await self.tick(t0)
            except Exception as exc:  # Redis away: the last published level holds
                log.warning("breaker.sample_failed", error=repr(exc))
            await self.sleep(SAMPLE_S - (time.monotonic() - t0))

    async def tick(self, now: float) -> BreakerLevel:
        backlog, _depth = await stats.backlog(self.r)
        before = self.hysteresis.level
        level = self.hysteresis.decide(backlog, now)
        vip_shed = backlog >= self.settings.shed_vip_depth
        changed = level != before or vip_shed != self.vip_shed
        self.vip_shed = vip_shed
        published: dict[str, str | int | float] = {"stage": level, "backlog": backlog, "ts": time.time()}
        await self.r.client.hset(keys.BREAKER_KEY, mapping=published)
        if changed:
            await publish(self.r, {"stage": level, "backlog": backlog})
        if level != before:
            s = self.settings
            log.warning(
                "breaker.stage_changed",
                stage=level,
                previous=before,
                backlog=backlog,
                open_depth=s.breaker_open_depth,
                close_depth=s.breaker_close_depth,
                cooldown_s=s.breaker_cooldown_s,
                shed_depth=s.shed_depth,
                shed_vip_depth=s.shed_vip_depth,
            )
            await self.r.client.hincrby(keys.COUNTERS_GLOBAL, f"stage_changes_{level}", 1)
        if level == BreakerLevel.NORMAL:
            self.replayed += await self.replay_deferred()
        return level

    async def replay_deferred(self) -> int:
        """Replay deferred syncs, each at most once in effect (the replay script checks the ledger)."""
        parts = self.r.partitions
        pipe = self.r.client.pipeline(transaction=False)
        for p in parts:
            pipe.xrange(p.deferred, count=REPLAY_BATCH)
        batches = await pipe.execute()
        if not any(batches):
            return 0

        def build(pipe: Any) -> None:
            for p, entries in zip(parts, batches, strict=True):
                if not entries:
                    continue
                ks = [p.deferred, p.counters, *(p.outbox(a) for a in keys.ACTIONS), p.order_copies, p.copy_refs]
                args: list[bytes | str | int | float] = [self.settings.outbox_trim, self.settings.status_ttl_s]
                for entry_id, f in entries:  # (the script reads each entry's fields itself)
                    ks += [p.status(f[b"k"].decode()), p.payload(f[b"k"].decode())]
                    args.append(entry_id)
                self.r.script(pipe, "replay", ks, args)

        replayed = sum(int(x) for x in await self.r.run(build))
        log.info("breaker.replayed", replayed=replayed)
        return replayed
