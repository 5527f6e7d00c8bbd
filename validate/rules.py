"""Validation decisions for a whole batch: outcome, priority, reasons, risk score.

The schema was checked at the edge. Here, per batch and in ONE round trip: one call of
the ledger script (orderq/lua/rules.lua) that tells each customer's first order (for
priority ``new``), checks and holds stock, coupons and the subsidy cap and counts the
IP and duplicate windows, atomically per order. The batch travels as one msgpack
argument and the answer as one msgpack string: argument packing in redis-py costs more
than the Lua work, so orders are never spread over thousands of arguments. What needs
only the order itself (virtual phones, pickup points, half prices, a coupon of another
platform) is decided here in Python before that call.

Outcomes: ``r`` rejected (out_of_stock, unknown_sku under ``reject``, coupon_*,
subsidy_cap), else ``w`` review (risk score >= ORDERQ_RISK_REVIEW_SCORE,
duplicate_suspect, unknown_sku under ``review``), else ``v`` validated. A rejected
order holds nothing; an order in review keeps its reservation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from orderq import keys
from orderq.client import Redis
from orderq.openrecords import OpenRecords
from orderq.schema import Order, coupon_cents, goods_cents, money, sku_totals
from orderq.settings import Settings
from validate import risk

# Reasons are listed in this order (stock first, risk last); a code's prefix before ':'.
REASON_ORDER = {
    code: i
    for i, code in enumerate(
        (
            "out_of_stock",
            "unknown_sku",
            "coupon_cross_platform",
            "coupon_expired",
            "coupon_used",
            "subsidy_cap",
            "risk_virtual_phone",
            "risk_ip_burst",
            "risk_pickup_point_address",
            "risk_price_anomaly",
            "duplicate_suspect",
            "approval_required",
        )
    )
}


@dataclass(slots=True)
class Decision:
    """What validation decided for one order."""

    order: Order
    outcome: str = "v"  # v validated · r rejected · w review
    priority: str = "regular"
    reasons: list[str] = field(default_factory=list)
    risk_score: int = 0


def open_decisions() -> OpenRecords:
    """A validate worker's decisions kept open until handed off (the ledger's bucket forgets them
    after a day; an order in the intake or a validate dead letter may wait longer)."""
    return OpenRecords(keys.DECIDED_OPEN_KEY, frozenset({"accepted"}))


def ledger_args(settings: Settings) -> list[object]:
    """The ledger script's settings arguments (ARGV[1..13])."""
    return [
        keys.RULES_PREFIX,
        round(settings.stock_buffer * 1_000_000),
        settings.unknown_sku,
        settings.ip_orders_per_hour,
        keys.IP_WINDOW_MS,
        risk.WEIGHTS["risk_ip_burst"],
        settings.risk_review_score,
        settings.dup_window_s * 1000,
        round(settings.subsidy_cap * 10_000),
        settings.status_ttl_s,
        keys.LEDGER_REPLAY_TTL_S,
        keys.SUBSIDY_TTL_S,
        keys.CUSTOMER_TTL_S,
    ]


def order_row(
    o: Order, accepted_ms: int, base: int, pre_reject: bool, dup: bool = True, approval: bool = False
) -> list[object]:
    """One order as the ledger script reads it (an element of its msgpack batch)."""
    lines = sku_totals(o.lines)
    flat = [x for sku, qty in lines.items() for x in (sku, qty)]
    return [
        o.key,
        o.channel,
        f"{o.channel}:{o.customer.id}",
        accepted_ms,
        base,
        1 if pre_reject else 0,
        o.customer.ip or "",
        risk.fingerprint(o, lines) if dup else "",
        keys.beijing_day(accepted_ms),
        goods_cents(o),
        coupon_cents(o),
        flat,
        [c.code for c in o.coupons],
        str(accepted_ms),  # Lua formats numbers slowly
        1 if approval else 0,
    ]


def _rank(reason: str) -> int:
    return REASON_ORDER.get(reason.partition(":")[0], len(REASON_ORDER))


async def passthrough(r: Redis, orders: list[Order], accepted_us: list[int]) -> list[Decision]:
    """``ORDERQ_RULES=off``: priority only (one pipelined round trip), every order validated.
    The customer's first order is remembered with ``SET NX GET`` under the same key the
    ledger uses, so a redelivered order is classified the same way again."""
    seq = sorted(range(len(orders)), key=lambda i: (accepted_us[i], orders[i].key))  # first come, first seen
    pipe = r.client.pipeline(transaction=False)
    for i in seq:
        o = orders[i]
        pipe.set(keys.customer_key(o.channel, o.customer.id), o.key, nx=True, get=True, ex=keys.CUSTOMER_TTL_S)
    firsts: list[Any] = [None] * len(orders)
    for i, first in zip(seq, await pipe.execute(), strict=True):
        firsts[i] = first
    out = []
    for o, first in zip(orders, firsts, strict=True):
        first_order = first is None or first == o.key.encode()
        prio = "vip" if o.customer.tier == "vip" else ("new" if first_order else "regular")
        if needs_approval(r.settings, o):  # a manager's approval is not a validation rule
            out.append(Decision(order=o, outcome="w", priority=prio, reasons=["approval_required"]))
        else:
            out.append(Decision(order=o, priority=prio))
    return out


def needs_approval(settings: Settings, o: Order) -> bool:
    """``paid_amount`` at or above ``ORDERQ_APPROVAL_AMOUNT`` (0: approvals off)."""
    limit = settings.approval_amount
    return bool(limit) and money(o.paid_amount) >= limit


async def decide(
    r: Redis, orders: list[Order], accepted_us: list[int], open_records: OpenRecords | None = None
) -> list[Decision]:
    """Decide a batch with one ledger script call (one round trip).

    ``accepted_us`` is each order's accept time (the intake entry's ``ta``): the risk
    windows and the subsidy day count in the server's clock, never the channel's.
    ``open_records``: the worker's (open_decisions()); the call closes the decisions of the
    orders it handed off since, and sweeps a page when due.
    """
    if not orders:
        return []
    if not r.settings.rules:
        if open_records is not None:
            open_records.take()  # pass-through decides nothing: nothing is open
        return await passthrough(r, orders, accepted_us)
    # The ledger sees the batch in acceptance order: first come, first served for stock
    # and single-use coupons; the IP and duplicate windows count in arrival order.
    seq = sorted(range(len(orders)), key=lambda i: (accepted_us[i], orders[i].key))
    dup = r.settings.dup_window_s > 0  # 0 turns the duplicate rule off
    pre: list[tuple[int, list[str]]] = []
    for o in orders:
        base, reasons = risk.assess(o)
        if any(c.platform != o.channel for c in o.coupons):
            reasons.append("coupon_cross_platform")
        if needs_approval(r.settings, o):
            reasons.append("approval_required")
        pre.append((base, reasons))
    batch = [
        order_row(
            orders[i],
            accepted_us[i] // 1000,
            pre[i][0],
            "coupon_cross_platform" in pre[i][1],
            dup,
            "approval_required" in pre[i][1],
        )
        for i in seq
    ]
    closing: list[str] = []
    if open_records is not None:
        await open_records.sweep(r)
        closing = open_records.take()
    args = [*ledger_args(r.settings), msgpack_encode(batch), msgpack_encode(closing) if closing else ""]
    try:
        (raw,) = await r.run(lambda pipe: r.script(pipe, "rules", [keys.RULES_PREFIX], args))
    except BaseException:
        if open_records is not None:
            open_records.give_back(closing)
        raise
    rows: list[Any] = [None] * len(orders)
    for i, row in zip(seq, _decode_rows(raw), strict=True):
        rows[i] = row
    out = []
    for o, (base, reasons), row in zip(orders, pre, rows, strict=True):
        outcome, extra, first = row[0], row[1], row[2]
        seen = set(reasons)
        for text in row[3:]:
            if text not in seen:
                seen.add(text)
                reasons.append(text)
        reasons.sort(key=_rank)
        prio = "vip" if o.customer.tier == "vip" else ("new" if first else "regular")
        out.append(Decision(order=o, outcome=outcome, priority=prio, reasons=reasons, risk_score=base + int(extra)))
    return out


msgpack_encode = msgspec.msgpack.Encoder().encode
_decode_rows = msgspec.msgpack.Decoder(list[list[Any]]).decode
