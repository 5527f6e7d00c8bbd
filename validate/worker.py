"""Validate worker: reads intake batches, decides, hands off in one script call per partition.

Round trips per batch: the read, one pipeline for the decisions (priorities + the
ledger script, validate/checks.py), one pipeline for the hand-off (one ``handoff`` call
per partition, plus the reason counters). Each process also sweeps region holds that
were lifted (orderq/ledger/holds.py) every few seconds.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import msgspec

from orderq import keys, lifecycle
from orderq.commands import Value
from orderq.control import cancel_and_wait
from orderq.ledger import holds
from orderq.schema import Order, json_encoder, unpack_order
from orderq.wire import Decided
from orderq.worker import BatchResult, Entry, StreamWorker, clear_errors, parse_read
from validate.checks import Decision, decide, open_decisions

SPLIT_AT = 64  # batches this large are decided in two overlapping halves
PAST_LEDGER_MAX = 100_000  # entries remembered as "decided, not handed off" (see give_up)
CLUSTER_BLOCK_MS = 50  # cluster: longest wait on one partition before all are read again


class ValidateWorker(StreamWorker):
    stage = "validate"
    group = keys.GROUP_VALIDATE

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._holds = holds.Sweeper()  # the background hold sweep (and what it remembers)
        self._rotation = 0  # cluster: the partition the next idle wait blocks on
        # entries whose batch got past the ledger script and then failed: they may hold stock
        self._past_ledger: set[tuple[str, str]] = set()
        self._open = open_decisions()  # decisions kept open until handed off (orderq/openrecords.py)
        self._owed = lifecycle.OwedSweep()  # ledger releases of cancelled orders (orderq/lifecycle.py)

    def streams_of(self, p: keys.Partition) -> list[tuple[str, int]]:
        return [(p.intake, 0)]

    async def run(self, drain: bool = False) -> int:
        if drain:  # tests and tools: one sweep, then work until nothing is left
            await holds.sweep(self.r, self._holds.cache)
            return await super().run(drain=True)
        task = asyncio.create_task(self._sweep_holds())
        try:
            return await super().run()
        finally:
            await cancel_and_wait([task])  # not one cancel: a sweep in flight can swallow it (3.11)

    async def _sweep_holds(self) -> None:
        while not self.stopping.is_set():
            try:
                moved = await self._holds.sweep(self.r)
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
        prepares the second half while Redis runs the ledger script on the first. Not while
        the stage is behind with several batches in flight: they overlap already, and one
        call per batch costs Redis and Python less than two (each call reads and writes
        every SKU of its orders once)."""
        if len(orders) < SPLIT_AT or (self.behind and self.loops > 1):
            return await decide(self.r, orders, accepted_us, self._open) if orders else []
        seq = sorted(range(len(orders)), key=lambda i: accepted_us[i])
        halves = (seq[: len(seq) // 2], seq[len(seq) // 2 :])
        out: list[Decision | None] = [None] * len(orders)

        async def half(idx: list[int]) -> None:
            mine = self._open if idx is halves[0] else None  # (one call closes what was handed off)
            ds = await decide(self.r, [orders[i] for i in idx], [accepted_us[i] for i in idx], mine)
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
                orders.append(unpack_order(e.get(b"d")))  # the full checks: validation is the gate
                good.append(e)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                result.failed[e.stream, e.id] = (e, f"undecodable order payload: {exc}")
        accepted_us = [int(e.get(b"ta") or 0) for e in good]
        decisions = await self._decide(orders, accepted_us)
        past = [(e.stream, e.id) for e in good]
        if len(self._past_ledger) > PAST_LEDGER_MAX:  # entries taken over by other workers
            self._past_ledger.clear()
        self._past_ledger.update(past)  # until their hand-off is done
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
                ks = [p.intake, p.counters, *p.lanes, p.review, p.parked, p.errors, p.cancel_owed]
                args: list[Value] = [self.group, ttl, clear_errors([e for e, _ in items])]
                for e, d in items:
                    key = d.order.key
                    ks.append(p.status(key))
                    ta = e.get(b"ta").decode()
                    why = json_encoder.encode(d.reasons).decode() if d.reasons else "[]"
                    head = f"{e.id}\t{d.outcome}\t{d.priority}\t{key}\t{ta}\t{d.risk_score}\t{why}"
                    args += [head, e.get(b"d")]
                self.r.script(pipe, "handoff", ks, args)
            for reason, n in reasons.items():
                pipe.hincrby(keys.REASONS_KEY, reason, n)
            for sku, (op, n) in streaks.items():
                if op == "del":
                    pipe.hdel(keys.OOS_STREAK_KEY, sku)
                elif op == "set":
                    pipe.hset(keys.OOS_STREAK_KEY, sku, n)
                else:
                    pipe.hincrby(keys.OOS_STREAK_KEY, sku, n)

        totals = {"validated": 0, "rejected": 0, "review": 0}
        owing: list[keys.Partition] = []  # partitions where cancelled orders now owe a ledger release
        for p, res in zip(by_part, (await self.r.run(build))[: len(by_part)] if by_part else [], strict=True):
            totals["validated"] += int(res[0])
            totals["rejected"] += int(res[1])
            totals["review"] += int(res[2])
            if int(res[3]):
                owing.append(p)
        if owing:
            await lifecycle.settle_quietly(self.r, owing)
        await self._owed.maybe(self.r)  # what a stopped process left owed
        result.counts = totals
        self._past_ledger.difference_update(past)
        self._open.done(d.order.key for d in decisions)  # handed off: closed with the next decision call
        return result

    async def give_up(self, failed: list[tuple[Entry, str]]) -> None:
        """An order that cannot be validated (its payload breaks a rule, a bug) ends
        ``rejected`` with reason ``unprocessable`` and its error, in the hand-off script,
        holding nothing: it failed before the ledger script decided it. One that failed after
        (its decision may hold stock and coupons) and an entry with no order key of this
        partition (no status record to write) become dead letters of their own: an operator's
        discard releases what the order holds."""
        by_part: dict[keys.Partition, list[tuple[Entry, str, str]]] = {}
        strays: list[tuple[Entry, str]] = []
        for e, error in failed:
            try:
                key = e.get(b"k").decode()
            except UnicodeDecodeError:
                key = ""
            decided = (e.stream, e.id) in self._past_ledger
            self._past_ledger.discard((e.stream, e.id))
            if not decided and ":" in key and "\t" not in key and self.r.partition_of(key) == e.partition:
                by_part.setdefault(e.partition, []).append((e, key, error))
            else:
                strays.append((e, error))
        ttl = self.settings.status_ttl_s
        why = json_encoder.encode(["unprocessable"]).decode()

        def build(pipe: Any) -> None:
            for p, items in by_part.items():
                ks = [p.intake, p.counters, *p.lanes, p.review, p.parked, p.errors, p.cancel_owed]
                args: list[Value] = [self.group, ttl, clear_errors([e for e, _, _ in items])]
                for e, key, error in items:
                    ks.append(p.status(key))
                    ta = (e.get(b"ta") or b"0").decode(errors="replace")
                    ta = ta if ta.isdigit() else "0"
                    args += [f"{e.id}\tx\t\t{key}\t{ta}\t0\t{why}", error[:500]]
                self.r.script(pipe, "handoff", ks, args)
            pipe.hincrby(keys.REASONS_KEY, "unprocessable", sum(len(v) for v in by_part.values()))

        if by_part:
            await self.r.run(build)
        if strays:
            await self.dead_letter(strays)


def oos_streaks(decisions: list[Decision], accepted_us: list[int]) -> dict[str, tuple[str, int]]:
    """What this batch does to each SKU's out-of-stock streak (the alert "one SKU out of
    stock 5 times in a row"): refusals add one each, in acceptance order; an order that
    reserved the SKU ends its streak. Per SKU: ("incr", n), ("set", n) or ("del", 0)."""
    out: dict[str, tuple[str, int]] = {}
    for i in sorted(range(len(decisions)), key=accepted_us.__getitem__):
        d = decisions[i]
        reasons = d.reasons
        for r in reasons:
            if r.startswith("out_of_stock:"):
                sku = r.partition(":")[2]
                op, n = out.get(sku, ("incr", 0))
                out[sku] = (op if op != "del" else "set", n + 1)
        if d.outcome != Decided.REJECTED:
            unknown = {r.partition(":")[2] for r in reasons if r.startswith("unknown_sku:")} if reasons else ()
            for line in d.order.lines:
                if line.sku not in unknown:
                    out[line.sku] = ("del", 0)
    return out
