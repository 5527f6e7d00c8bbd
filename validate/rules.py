"""Validation decisions for a whole batch: outcome, priority, reasons, risk score.

The schema was checked at the edge. Here, per batch and in ONE pipelined round trip:
the priority class of each order (``SET NX GET`` per customer) and one call of the
ledger script (orderq/lua/rules.lua) that checks and holds stock, coupons and the
subsidy cap and counts the IP and duplicate windows, atomically per order. What needs
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

from orderq import keys
from orderq.client import Redis
from orderq.schema import Order
from orderq.settings import Settings
from validate import risk

DAY_MS = 24 * 3600 * 1000

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


def queue_classify(pipe: Any, orders: list[Order]) -> None:
    """Queue on ``pipe`` what :func:`read_classify` needs: ``SET NX GET`` records which
    order was the customer's first, so a redelivered order is classified the same way."""
    for o in orders:
        pipe.set(keys.customer_key(o.channel, o.customer.id), o.key, nx=True, get=True, ex=keys.CUSTOMER_TTL_S)


def read_classify(orders: list[Order], firsts: list[Any]) -> list[str]:
    """Priority per order: ``vip`` by tier, ``new`` for a customer's first order seen, else ``regular``."""
    out = []
    for o, first in zip(orders, firsts, strict=True):
        if o.customer.tier == "vip":
            out.append("vip")
        else:
            out.append("new" if first is None or first == o.key.encode() else "regular")
    return out


def ledger_args(settings: Settings) -> list[object]:
    """The ledger script's settings arguments (ARGV[1..12])."""
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
    ]


def order_args(o: Order, accepted_ms: int, base: int, pre_reject: bool, dup: bool = True) -> list[object]:
    """One order's arguments to the ledger script."""
    lines: dict[str, int] = {}
    goods = 0
    for line in o.lines:
        lines[line.sku] = lines.get(line.sku, 0) + line.qty
        price = line.unit_price or line.paid_price
        if price:
            goods += risk.cents(price) * line.qty
    coupon_total = sum(risk.cents(c.amount) for c in o.coupons)
    if not goods:  # no line prices: what was paid plus what the coupons took off
        goods = risk.cents(o.paid_amount) + coupon_total
    day = (accepted_ms + keys.BEIJING_OFFSET_MS) // DAY_MS
    args: list[object] = [
        o.key,
        o.channel,
        accepted_ms,
        base,
        1 if pre_reject else 0,
        o.customer.ip or "",
        risk.fingerprint(o, lines) if dup else "",
        f"{o.channel}:{o.customer.id}:{day}",
        goods,
        coupon_total,
        len(lines),
    ]
    for sku, qty in lines.items():
        args += (sku, qty)
    args.append(len(o.coupons))
    args += [c.code for c in o.coupons]
    return args


def _rank(reason: str) -> int:
    return REASON_ORDER.get(reason.partition(":")[0], len(REASON_ORDER))


async def decide(r: Redis, orders: list[Order], accepted_us: list[int]) -> list[Decision]:
    """Decide a batch in one round trip: priorities plus one ledger script call.

    ``accepted_us`` is each order's accept time (the intake entry's ``ta``): the risk
    windows and the subsidy day count in the server's clock, never the channel's.
    """
    if not orders:
        return []
    # The ledger sees the batch in acceptance order: first come, first served for stock
    # and single-use coupons; the IP and duplicate windows count in arrival order.
    seq = sorted(range(len(orders)), key=lambda i: (accepted_us[i], orders[i].key))
    pre: list[tuple[int, list[str]]] = []
    args = ledger_args(r.settings)
    dup = r.settings.dup_window_s > 0  # 0 turns the duplicate rule off
    for o in orders:
        base, reasons = risk.assess(o)
        cross = any(c.platform != o.channel for c in o.coupons)
        if cross:
            reasons.append("coupon_cross_platform")
        pre.append((base, reasons))
    for i in seq:
        o = orders[i]
        args += order_args(o, accepted_us[i] // 1000, pre[i][0], "coupon_cross_platform" in pre[i][1], dup)

    def build(pipe: Any) -> None:
        queue_classify(pipe, orders)
        r.script(pipe, "rules", [keys.RULES_PREFIX], args)

    res = await r.run(build)
    prios = read_classify(orders, res[: len(orders)])
    rows: list[Any] = [None] * len(orders)
    for i, row in zip(seq, res[len(orders)], strict=True):
        rows[i] = row
    out = []
    for o, prio, (base, reasons), row in zip(orders, prios, pre, rows, strict=True):
        outcome = row[0].decode() if isinstance(row[0], bytes) else str(row[0])
        seen = set(reasons)
        for x in row[2:]:
            text = x.decode()
            if text not in seen:
                seen.add(text)
                reasons.append(text)
        reasons.sort(key=_rank)
        out.append(Decision(order=o, outcome=outcome, priority=prio, reasons=reasons, risk_score=base + int(row[1])))
    return out
