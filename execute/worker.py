"""Execute worker: takes batches by priority (with aging), fires the actions through
the effect ledger and outbox, one script call per partition."""

from __future__ import annotations

import time
from typing import Any

import msgspec

from execute.actions import fulfilment_id, plan
from orderq import keys, metrics
from orderq.schema import unpack_order
from orderq.worker import BatchResult, Entry, StreamWorker, _pairs

LANES = keys.PRIORITIES  # lane 1 vip, 2 new, 3 regular
CLUSTER_BLOCK_MS = 50  # cluster: longest wait on one partition before all are taken from again


class ExecuteWorker(StreamWorker):
    stage = "execute"
    group = keys.GROUP_EXECUTE

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.latencies: list[tuple[str, float]] = []  # (priority, seconds) since accept, per batch
        self._rotation = 0  # cluster: the partition the next idle wait blocks on

    def streams_of(self, p: keys.Partition) -> list[tuple[str, int]]:
        return [(lane, i) for i, lane in enumerate(p.lanes, 1)]

    async def fetch(self, block_ms: int) -> list[Entry]:
        parts = self.r.partitions
        per = max(1, self.batch // len(parts))
        aging_ms = int(self.settings.priority_aging_s * 1000)
        replies = await self.r.run(
            lambda pipe: [
                self.r.script(pipe, "take", p.lanes, [self.group, self.consumer, per, aging_ms]) for p in parts
            ]
        )
        entries: list[Entry] = []
        waits: dict[str, str] = {}
        for p, reply in zip(parts, replies, strict=True):
            if reply and reply[0] == 0:
                for lane, last in zip(p.lanes, reply[1], strict=True):
                    waits[lane] = last.decode() if isinstance(last, bytes) else str(last)
                continue
            for lane_no, msgs in reply:
                stream = p.lanes[int(lane_no) - 1]
                for entry_id, flat in msgs:
                    entries.append(Entry(p, stream, entry_id.decode(), _pairs(flat), int(lane_no)))
        if not entries and block_ms and not self.settings.redis_cluster:
            # Wait (consuming nothing) until any lane gets an entry past what was delivered.
            await self.r.client.xread(waits, count=1, block=block_ms)
        elif not entries and block_ms and waits:
            # Cluster: a read across partitions would be cross-slot. Wait on one partition's
            # lanes (one slot), in rotation, for a short while: no spin, little added latency.
            self._rotation = (self._rotation + 1) % len(parts)
            lanes = parts[self._rotation].lanes
            one = {lane: waits[lane] for lane in lanes if lane in waits}
            if one:
                block = min(block_ms, CLUSTER_BLOCK_MS)
                await self.r.client.execute_command(
                    "XREAD", "COUNT", 1, "BLOCK", block, "STREAMS", *one, *one.values(), **self.r.route(lanes[0])
                )
        return entries

    async def process(self, entries: list[Entry]) -> BatchResult:
        result = BatchResult()
        stage = self.control.stage if self.control else "normal"
        holds = self.control.holds if self.control else {}
        mode = self.settings.breaker_mode
        by_part: dict[keys.Partition, list[object]] = {}
        for e in entries:
            try:
                order = unpack_order(e.get(b"d"))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                result.failed[e.id] = (e, f"undecodable order payload: {exc}")
                continue
            key = order.key
            held = order.ship_to.province in holds
            by_part.setdefault(e.partition, []).append(
                (e, key, "h" if held else "e", fulfilment_id(key), "" if held else plan(order, stage, mode))
            )

        def build(pipe: Any) -> None:
            for p, items in by_part.items():
                ks = [p.counters, *p.lanes, p.deferred, p.held, p.parked, *(p.outbox(a) for a in keys.ACTIONS)]
                args: list[object] = [self.group, self.settings.outbox_trim]
                for e, key, outcome, fid, acts in items:  # type: ignore[misc]
                    ks.append(p.status(key))
                    args += [e.lane, e.id, key, outcome, fid, acts, e.get(b"d")]
                self.r.script(pipe, "execute", ks, args)

        totals = {"executed": 0, "held": 0, "deferred": 0, "dropped": 0}
        now = time.time()
        lat: list[tuple[str, float]] = []
        for res in await self.r.run(build) if by_part else []:
            for name, v in zip(("executed", "held", "deferred", "dropped"), res, strict=False):
                totals[name] += int(v)
        for items in by_part.values():
            for e, _key, outcome, _fid, _acts in items:  # type: ignore[misc]
                if outcome == "e" and e.get(b"ta"):
                    prio = LANES[e.lane - 1]
                    seconds = now - int(e.get(b"ta")) / 1e6
                    lat.append((prio, seconds))
                    metrics.E2E_LATENCY.observe(seconds, prio)
        self.latencies = lat
        result.counts = totals
        return result
