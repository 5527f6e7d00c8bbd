"""Execute worker: takes batches by priority (with aging), fires the actions through
the effect ledger and outbox, one script call per partition."""

from __future__ import annotations

import time
from typing import Any

import msgspec

from execute.actions import fulfilment_id, plan
from execute.routing import Routed, Router, RulesError
from orderq import keys, lifecycle, metrics
from orderq.commands import Value
from orderq.errors import ConfigError
from orderq.ledger import review
from orderq.schema import Order, json_encoder, unpack_queued
from orderq.wire import Executed, RouteOutcome
from orderq.worker import BatchResult, Entry, StreamWorker, _pairs

LANES = keys.PRIORITIES  # lane 1 vip, 2 new, 3 regular
# One order of a batch as the execute script gets it: entry, order key, outcome, fulfilment id,
# actions, route, more reasons; and its routing decision (None: not routed)
Row = tuple[Entry, str, Executed, str, str, str, str, Routed | None]
CLUSTER_BLOCK_MS = 50  # cluster: longest wait on one partition before all are taken from again


class ExecuteWorker(StreamWorker):
    stage = "execute"
    group = keys.GROUP_EXECUTE

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        try:
            self.router = Router(self.settings.routing_dir)
        except RulesError as exc:  # the stage cannot route: it does not start (exit 2)
            raise ConfigError("ORDERQ_ROUTING_DIR", str(exc)) from None
        self._rotation = 0  # cluster: the partition the next idle wait blocks on
        self._owed = lifecycle.OwedSweep()  # ledger releases of cancelled orders (orderq/lifecycle.py)

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

    def reload(self) -> None:
        """SIGHUP: read the routing rules again; a bad file keeps the rules in force."""
        try:
            rules = self.router.reload()
        except RulesError as exc:
            self.log.error("execute.rules_reload_failed", error=str(exc))
            return
        self.log.info("execute.rules_reloaded", source=rules.source, rules=[r.name for r in rules.rules])

    async def process(self, entries: list[Entry]) -> BatchResult:
        result = BatchResult()
        stage = self.control.stage if self.control else "normal"
        holds = self.control.holds if self.control else {}
        whs = self.control.warehouses if self.control else {}
        mode = self.settings.breaker_mode
        items: list[tuple[Entry, Order, bool]] = []
        ready: list[int] = []  # (indices in items) not held: routed before they execute
        gifts = False
        for e in entries:
            try:
                order = unpack_queued(e.get(b"d"))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                result.failed[e.stream, e.id] = (e, f"undecodable order payload: {exc}")
                continue
            held = order.ship_to.province in holds
            if not held:
                ready.append(len(items))
                gifts = gifts or bool(order.gifts)
            items.append((e, order, held))
        routes: list[Routed | None] = [None] * len(items)  # by position in items
        if ready and (whs or gifts):
            decided = await self.router.route(
                self.r,
                whs,
                [items[i][1] for i in ready],
                [items[i][0].get(b"ap") == b"1" for i in ready],
                [int(items[i][0].get(b"ta") or 0) for i in ready],
            )
            for i, routed in zip(ready, decided, strict=True):
                routes[i] = routed
        by_part: dict[keys.Partition, list[Row]] = {}
        freight_review = 0
        reviewed: list[tuple[Entry, Order]] = []
        ttl = self.settings.status_ttl_s
        gift_oos: list[str] = []
        for (e, order, held), d in zip(items, routes, strict=True):
            key = order.key
            route = more = ""
            if held:
                outcome, acts = Executed.HELD, ""
            elif d is not None and d.outcome == RouteOutcome.REVIEW:
                outcome, acts, more = Executed.REVIEW, "", '["freight_over_limit"]'
                freight_review += 1
                reviewed.append((e, order))
            else:
                outcome = Executed.EXECUTED
                picks = d.picks if d is not None and d.routed else None
                acts = plan(order, stage, mode, picks)
                if d is not None and d.routed:
                    route = d.route
                if d is not None and d.gift_out_of_stock:
                    more = json_encoder.encode([f"gift_out_of_stock:{sku}" for sku in d.gift_out_of_stock]).decode()
                    gift_oos += d.gift_out_of_stock
            by_part.setdefault(e.partition, []).append((e, key, outcome, fulfilment_id(key), acts, route, more, d))

        def build(pipe: Any) -> None:
            for p, rows in by_part.items():
                ks = [
                    p.counters,
                    *p.lanes,
                    p.deferred,
                    p.held,
                    p.parked,
                    p.review,
                    *(p.outbox(a) for a in keys.ACTIONS),
                    p.errors,
                    p.cancel_owed,
                    p.order_copies,
                    p.copy_refs,
                ]
                again = " ".join([f"{row[0].lane}:{row[0].id}" for row in rows if row[0].delivered_again])
                args: list[Value] = [self.group, self.settings.outbox_trim, ttl, again]
                for e, key, outcome, fid, acts, route, more, _d in rows:
                    ks += [p.status(key), p.payload(key)]
                    args += [f"{e.lane}\t{e.id}\t{key}\t{outcome}\t{fid}\t{acts}\t{route}\t{more}", e.get(b"d")]
                self.r.script(pipe, "execute", ks, args)
            # what an order sent to review for its freight holds from validation: a reviewer's
            # reject releases by it (in the pipeline, so it exists before the review does); no
            # TTL while it waits, the decision starts one (orderq/ledger/review.py)
            for e, order in reviewed:
                pipe.set(keys.ledger_key(order.key), review.freight_hold(order, int(e.get(b"ta") or 0)), nx=True)
            # reason counters of the operators' view (a redelivered batch may count again)
            if freight_review:
                pipe.hincrby(keys.REASONS_KEY, "freight_over_limit", freight_review)
            if gift_oos:
                pipe.hincrby(keys.REASONS_KEY, "gift_out_of_stock", len(gift_oos))
            # the ship_lag alert's view: an executed order waits for its shipment (orderq/lifecycle.py)
            now_ms = int(time.time() * 1000)
            for p, rows in by_part.items():
                waiting = {row[1]: now_ms for row in rows if row[2] == Executed.EXECUTED}
                if waiting:
                    pipe.zadd(lifecycle.unshipped_key(p), waiting, nx=True)

        totals = {"executed": 0, "held": 0, "deferred": 0, "dropped": 0, "review": 0}
        replies = (await self.r.run(build))[: len(by_part)] if by_part else []
        owing: list[keys.Partition] = []  # partitions where cancelled orders now owe a ledger release
        for p, rows, res in zip(by_part, by_part.values(), replies, strict=True):
            if len(res) > 7 and int(res[7]):
                owing.append(p)
            for name, v in zip(("executed", "held", "deferred", "dropped", "", "review"), res, strict=False):
                if name:
                    totals[name] += int(v)
            missing = {int(i) for i in res[6]} if len(res) > 6 else set()
            for i in missing:  # no status record: not executed, not acknowledged
                e = rows[i - 1][0]
                result.failed[e.stream, e.id] = (e, "status record missing: not executed (its effect ledger is gone)")
            # executed: their route records need not be kept open any longer (execute/routing.py)
            self.router.executed(
                row[1]
                for n, row in enumerate(rows, 1)
                if (d := row[7]) is not None and d.recorded and row[2] == Executed.EXECUTED and n not in missing
            )
        if owing:
            await lifecycle.settle_quietly(self.r, owing)
        await self._owed.maybe(self.r)  # what a stopped process left owed
        now = time.time()
        observe = metrics.E2E_LATENCY.observe
        for rows in by_part.values():
            for row in rows:
                if row[2] == Executed.EXECUTED and (ta := row[0].get(b"ta")):
                    observe(now - int(ta) / 1e6, LANES[row[0].lane - 1])
        result.counts = totals
        return result
