"""The breaker controller: samples the backlog 10 times a second, decides the stage
with hysteresis, publishes it (a key for late joiners plus pub/sub), and replays
deferred syncs once the stage is back to ``normal``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import structlog

from orderq import keys, stats
from orderq.client import Redis
from orderq.control import publish
from orderq.settings import Settings

log = structlog.get_logger("orderq.breaker")

SAMPLE_S = 0.1  # contract: stage changes are known within 100 ms
REPLAY_BATCH = 200  # deferred syncs replayed per partition per tick


@dataclass
class Hysteresis:
    """Pure stage decision: open at the open depth, shed at the shed depth; step back
    down only after the backlog has stayed under the lower threshold for the cooldown."""

    settings: Settings
    stage: str = "normal"
    below_since: float | None = None

    def decide(self, backlog: int, now: float) -> str:
        s = self.settings
        if backlog >= s.shed_depth:
            target = "shedding"
        elif backlog >= s.breaker_open_depth:
            target = "degraded"
        else:
            target = "normal"
        rank = {"normal": 0, "degraded": 1, "shedding": 2}
        if rank[target] >= rank[self.stage]:
            self.below_since = None
            self.stage = target
            return self.stage
        # Stepping down: shedding leaves once under the shed depth for the cooldown; degraded
        # leaves once under the close depth for the cooldown.
        floor = s.shed_depth if self.stage == "shedding" else s.breaker_close_depth
        if backlog >= floor:
            self.below_since = None
            return self.stage
        if self.below_since is None:
            self.below_since = now
        if now - self.below_since >= s.breaker_cooldown_s:
            self.stage = "degraded" if self.stage == "shedding" and backlog >= s.breaker_close_depth else "normal"
            if self.stage == "degraded":
                self.below_since = None
        return self.stage


class Breaker:
    def __init__(self, r: Redis) -> None:
        self.r = r
        self.settings = r.settings
        self.h = Hysteresis(self.settings)
        self.stopping = asyncio.Event()
        self.vip_shed = False

    async def run(self) -> None:
        prev = await self.r.client.hget(keys.BREAKER_KEY, "stage")
        if prev:
            self.h.stage = prev.decode()  # a restarted controller resumes where it was
        while not self.stopping.is_set():
            t0 = time.monotonic()
            try:
                await self.tick(t0)
            except Exception as exc:  # Redis away: the last published stage holds
                log.warning("breaker.sample_failed", error=repr(exc))
            delay = SAMPLE_S - (time.monotonic() - t0)
            if delay > 0:
                try:
                    await asyncio.wait_for(self.stopping.wait(), delay)
                except TimeoutError:
                    pass

    async def tick(self, now: float) -> str:
        backlog, _depth = await stats.backlog(self.r)
        before = self.h.stage
        stage = self.h.decide(backlog, now)
        vip_shed = backlog >= self.settings.shed_vip_depth
        changed = stage != before or vip_shed != self.vip_shed
        self.vip_shed = vip_shed
        await self.r.client.hset(keys.BREAKER_KEY, mapping={"stage": stage, "backlog": backlog, "ts": time.time()})
        if changed:
            await publish(self.r, {"stage": stage, "backlog": backlog})
        if stage != before:
            s = self.settings
            log.warning(
                "breaker.stage_changed",
                stage=stage,
                previous=before,
                backlog=backlog,
                open_depth=s.breaker_open_depth,
                close_depth=s.breaker_close_depth,
                cooldown_s=s.breaker_cooldown_s,
                shed_depth=s.shed_depth,
                shed_vip_depth=s.shed_vip_depth,
            )
            await self.r.client.hincrby(keys.COUNTERS_GLOBAL, f"stage_changes_{stage}", 1)
        if stage == "normal":
            await self.replay_deferred()
        return stage

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
                ks = [p.deferred, p.counters, *(p.outbox(a) for a in keys.ACTIONS)]
                args: list[object] = [self.settings.outbox_trim, self.settings.status_ttl_s]
                for entry_id, f in entries:
                    key = f[b"k"].decode()
                    ks.append(p.status(key))
                    args += [entry_id, key, f[b"a"], f[b"f"], f[b"d"]]
                self.r.script(pipe, "replay", ks, args)

        replayed = sum(int(x) for x in await self.r.run(build))
        log.info("breaker.replayed", replayed=replayed)
        return replayed
