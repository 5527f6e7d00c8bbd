"""Validate worker: reads intake batches, decides, hands off in one script call per partition.

Round trips per batch: the read, one pipeline for the decisions (priorities + the
ledger script, validate/rules.py), one pipeline for the hand-off (one ``handoff`` call
per partition, plus the reason counters). Each process also sweeps region holds that
were lifted (validate/holds.py) every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any

import msgspec

from orderq import keys, metrics
from orderq.schema import Order, json_encoder, unpack_order
from orderq.worker import BatchResult, Entry, StreamWorker, parse_read
from validate import holds
from validate.rules import Decision, decide

SPLIT_AT = 64  # batches this large are decided in two overlapping halves
CLUSTER_BLOCK_MS = 50  # cluster: longest wait on one partition before all are read again


class ValidateWorker(StreamWorker):
    stage = "validate"
    group = keys.GROUP_VALIDATE

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._held_provinces: dict[str, str] = {}  # held order key -> province, for the sweep
        self._rotation = 0  # cluster: the partition the next idle wait blocks on

    def streams_of(self, p: keys.Partition) -> list[tuple[str, int]]:
        return [(p.intake, 0)]

    async def run(self, drain: bool = False) -> int:
        if drain:  # tests and tools: one sweep, then work until nothing is left
            await holds.sweep(self.r, self._held_provinces)
            return await super().run(drain=True)
        task = asyncio.create_task(self._sweep_holds())
        try:
            return await super().run()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _sweep_holds(self) -> None:
        while not self.stopping.is_set():
            try:
                moved = await holds.sweep(self.r, self._held_provinces)
                if moved:
                    self.log.info("holds.released", orders=moved)
            except Exception as exc:  # Redis away: the next sweep tries again
                self.log.warning("holds.sweep_failed", error=repr(exc))
            await self.sleep(holds.SWEEP_S)

    async def fetch(self, block_ms: int) -> list[Entry]:
        parts = self.r.partitions
        by_stream = {p.intake.encode(): (p, 0) for p in parts}
        if self.settings.redis_cluster:
            return await self._fetch_cluster(block_ms, by_stream)
        reply = await self.r.client.xreadgroup(
            self.group,
            self.consumer,
            {p.intake: ">" for p in parts},
            count=max(1, self.batch // len(parts)) if len(parts) > 1 else self.batch,
            block=block_ms or None,
        )
        return parse_read(reply, by_stream)

    async def _fetch_cluster(self, block_ms: int, by_stream: dict[bytes, tuple[keys.Partition, int]]) -> list[Entry]:
        """Cluster: one read across partitions would be cross-slot. One non-blocking read per
        partition, pipelined (redis-py sends one pipeline per master); when all come back
        empty, a short BLOCK read on one partition, in rotation: waits on real work, no spin."""
        parts = self.r.partitions
        count = max(1, self.batch // len(parts))
        replies = await self.r.run(
            lambda pipe: [self.r.xreadgroup(pipe, self.group, self.consumer, p.intake, count) for p in parts]
        )
        entries = [e for reply in replies for e in parse_read(reply, by_stream)]
        if entries or not block_ms:
            return entries
        self._rotation = (self._rotation + 1) % len(parts)
        p = parts[self._rotation]
        block = min(block_ms, CLUSTER_BLOCK_MS)
        reply = await self.r.xreadgroup(self.r.client, self.group, self.consumer, p.intake, self.batch, block)
        return parse_read(reply, by_stream)

    async def _decide(self, orders: list[Order], accepted_us: list[int]) -> list[Decision]:
        """Decide a batch; a large one in two halves, earlier orders first, so that Python
        prepares the second half while Redis runs the ledger script on the first."""
        if len(orders) < SPLIT_AT:
            return await decide(self.r, orders, accepted_us) if orders else []
        seq = sorted(range(len(orders)), key=lambda i: accepted_us[i])
        halves = (seq[: len(seq) // 2], seq[len(seq) // 2 :])
        out: list[Decision | None] = [None] * len(orders)

        async def half(idx: list[int]) -> None:
            ds = await decide(self.r, [orders[i] for i in idx], [accepted_us[i] for i in idx])
            for i, d in zip(idx, ds, strict=True):
                out[i] = d

        await asyncio.gather(*(half(h) for h in halves))
        return [d for d in out if d is not None]

    async def process(self, entries: list[Entry]) -> BatchResult:
        result = BatchResult()
        good: list[Entry] = []
        orders = []
        for e in entries:
            try:
                orders.append(unpack_order(e.get(b"d")))
                good.append(e)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                result.failed[e.id] = (e, f"undecodable order payload: {exc}")
        accepted_us = [int(e.get(b"ta") or 0) for e in good]
        decisions = await self._decide(orders, accepted_us)
        by_part: dict[keys.Partition, list[tuple[Entry, Decision]]] = {}
        reasons: Counter[str] = Counter()
        for e, d in zip(good, decisions, strict=True):
            by_part.setdefault(e.partition, []).append((e, d))
            for reason in d.reasons:
                reasons[reason.partition(":")[0]] += 1
        streaks = oos_streaks(decisions, accepted_us)
        ttl = self.settings.status_ttl_s

        def build(pipe: Any) -> None:
            for p, items in by_part.items():
                ks = [p.intake, p.counters, *p.lanes, p.review, p.parked]
                args: list[object] = [self.group, ttl]
                for e, d in items:
                    ks.append(p.status(d.order.key))
                    ta = e.get(b"ta").decode()
                    why = json_encoder.encode(d.reasons).decode()
                    head = f"{e.id}\t{d.outcome}\t{d.priority}\t{d.order.key}\t{ta}\t{d.risk_score}\t{why}"
                    args += [head, e.get(b"d")]
                self.r.script(pipe, "handoff", ks, args)
            for reason, n in reasons.items():
                pipe.hincrby(metrics.REASONS_KEY, reason, n)
            for sku, (op, n) in streaks.items():
                if op == "del":
                    pipe.hdel(keys.OOS_STREAK_KEY, sku)
                elif op == "set":
                    pipe.hset(keys.OOS_STREAK_KEY, sku, n)
                else:
                    pipe.hincrby(keys.OOS_STREAK_KEY, sku, n)

        totals = {"validated": 0, "rejected": 0, "review": 0}
        for res in (await self.r.run(build))[: len(by_part)] if by_part else []:
            totals["validated"] += int(res[0])
            totals["rejected"] += int(res[1])
            totals["review"] += int(res[2])
        result.counts = totals
        return result


def oos_streaks(decisions: list[Decision], accepted_us: list[int]) -> dict[str, tuple[str, int]]:
    """What this batch does to each SKU's out-of-stock streak (the alert "one SKU out of
    stock 5 times in a row"): refusals add one each, in acceptance order; an order that
    reserved the SKU ends its streak. Per SKU: ("incr", n), ("set", n) or ("del", 0)."""
    out: dict[str, tuple[str, int]] = {}
    for i in sorted(range(len(decisions)), key=lambda i: accepted_us[i]):
        d = decisions[i]
        short = [r.partition(":")[2] for r in d.reasons if r.startswith("out_of_stock:")]
        for sku in short:
            op, n = out.get(sku, ("incr", 0))
            out[sku] = (op if op != "del" else "set", n + 1)
        if d.outcome != "r":
            unknown = {r.partition(":")[2] for r in d.reasons if r.startswith("unknown_sku:")}
            for line in d.order.lines:
                if line.sku not in unknown:
                    out[line.sku] = ("del", 0)
    return out
