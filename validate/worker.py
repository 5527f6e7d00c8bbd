"""Validate worker: reads intake batches, decides, hands off in one script call per partition."""

from __future__ import annotations

from typing import Any

import msgspec

from orderq import keys
from orderq.schema import json_encoder, unpack_order
from orderq.worker import BatchResult, Entry, StreamWorker, parse_read
from validate.rules import decide


class ValidateWorker(StreamWorker):
    stage = "validate"
    group = keys.GROUP_VALIDATE

    def streams_of(self, p: keys.Partition) -> list[tuple[str, int]]:
        return [(p.intake, 0)]

    async def fetch(self, block_ms: int) -> list[Entry]:
        parts = self.r.partitions
        by_stream = {p.intake.encode(): (p, 0) for p in parts}
        reply = await self.r.client.xreadgroup(
            self.group,
            self.consumer,
            {p.intake: ">" for p in parts},
            count=max(1, self.batch // len(parts)) if len(parts) > 1 else self.batch,
            block=block_ms or None,
        )
        return parse_read(reply, by_stream)

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
        decisions = await decide(self.r.client, orders) if orders else []
        by_part: dict[keys.Partition, list[tuple[Entry, object]]] = {}
        for e, d in zip(good, decisions, strict=True):
            by_part.setdefault(e.partition, []).append((e, d))
        ttl = self.settings.status_ttl_s

        def build(pipe: Any) -> None:
            for p, items in by_part.items():
                ks = [p.intake, p.counters, *p.lanes, p.review, p.parked]
                args: list[object] = [self.group, ttl]
                for e, d in items:
                    ks.append(p.status(d.order.key))
                    args += [
                        e.id,
                        d.outcome,
                        d.priority,
                        d.order.key,
                        e.get(b"d"),
                        e.get(b"ta"),
                        json_encoder.encode(d.reasons),
                        d.risk_score,
                    ]
                self.r.script(pipe, "handoff", ks, args)

        totals = {"validated": 0, "rejected": 0, "review": 0}
        for res in await self.r.run(build) if by_part else []:
            totals["validated"] += int(res[0])
            totals["rejected"] += int(res[1])
            totals["review"] += int(res[2])
        result.counts = totals
        return result
