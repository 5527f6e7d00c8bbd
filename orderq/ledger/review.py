"""The manual review queue: list it oldest first, approve or reject one order.

An order in review is parked in its partition (``review`` zset + ``parked`` payload)
and keeps its stock; neither its status record nor its ledger record expires while it
waits (the status TTL starts at the decision). Approve moves it into its ready lane,
atomically (review.lua). Reject settles it as rejected, then returns what it held in the
ledger (release.lua); the two live in different slots, so the release follows the status
change and is idempotent: a reject repeated after a crash in between completes the release.
"""

from __future__ import annotations

import heapq
from typing import Any

from orderq import keys, wire
from orderq.client import Redis
from orderq.ledger import stock
from orderq.schema import Order, any_json_decoder, coupon_cents, goods_cents, sku_totals, utc_iso

MAX_LIST = 1000


async def list_review(r: Redis, limit: int = 100) -> list[dict[str, Any]]:
    """The ``limit`` oldest orders in review, over all partitions. Two round trips."""
    parts = r.partitions
    pipe = r.client.pipeline(transaction=False)
    for p in parts:
        pipe.zrange(p.review, 0, limit - 1, withscores=True)
    rows = await pipe.execute()
    merged = heapq.merge(*([(score, m.decode(), p) for m, score in ms] for p, ms in zip(parts, rows, strict=True)))
    oldest = [row for _, row in zip(range(limit), merged, strict=False)]
    if not oldest:
        return []
    pipe = r.client.pipeline(transaction=False)
    for _, key, p in oldest:
        pipe.hmget(p.status(key), "r", "rs")
    items = []
    for (score, key, _), (reasons, score_rs) in zip(oldest, await pipe.execute(), strict=True):
        items.append(
            {
                "order_key": key,
                "reasons": any_json_decoder.decode(reasons) if reasons else [],
                "risk_score": int(score_rs or 0),
                "since": utc_iso(int(score)),
            }
        )
    return items


async def decide(r: Redis, order_key: str, decision: str) -> tuple[bool, str]:
    """Approve or reject ``order_key``. Returns (decided now, status after).

    Status after ``""``: no such order. A reject repeated on a rejected order releases
    again (a no-op unless the first release was cut short)."""
    p = r.partition_of(order_key)
    ks = [p.review, p.parked, *p.lanes, p.counters, p.status(order_key)]
    ttl = r.settings.status_ttl_s
    res = await r.run(lambda pipe: r.script(pipe, "review", ks, [decision, order_key, ttl]))
    done, status = int(res[0][0]), res[0][1]
    status = status.decode() if isinstance(status, bytes) else str(status)
    if decision == "reject" and status == "rejected":
        await stock.release(r, [order_key])
    if status == ("validated" if decision == "approve" else "rejected"):
        # what the order held is settled (released, or going on to execution): its ledger
        # record, kept without a TTL while the order was in review, now ages like the status
        await r.client.expire(keys.ledger_key(order_key), ttl)
    return bool(done), status


def freight_hold(o: Order, accepted_us: int) -> bytes:
    """The ledger record (wire.ReviewHold) of an order the execute stage sends to review for its
    freight, or of a dead letter discarded: what it holds since validation, for release.lua."""
    return wire.encode_hold(
        wire.ReviewHold(
            outcome=wire.Decided.REVIEW,
            extra_score=0,
            reasons=["freight_over_limit"],
            held=[x for sku, qty in sku_totals(o.lines).items() for x in (sku, qty)],
            coupons=[c.code for c in o.coupons],
            day=keys.beijing_day(accepted_us // 1000),
            customer=f"{o.channel}:{o.customer.id}",
            goods=goods_cents(o),
            coupon_cents=coupon_cents(o),
        )
    )
