"""Validation decisions for a whole batch: outcome, priority, reasons, risk score.

The schema was checked at the edge. Here, per batch and in ONE round trip: one call of
the ledger script (orderq/lua/checks.lua) that tells each customer's first order (for
priority ``new``), checks and holds stock, coupons and the subsidy cap and counts the
IP and duplicate windows, atomically per order. The batch travels as one msgpack
argument and the answer as one msgpack string: argument packing in redis-py costs more
than the Lua work, so orders are never spread over thousands of arguments; the keys the
call touches come in KEYS, each distinct one once (LedgerKeys). What needs
only the order itself (virtual phones, pickup points, half prices, a coupon of another
platform) is decided here in Python before that call.

Outcomes (wire.Decided): ``r`` rejected (out_of_stock, unknown_sku under ``reject``, coupon_*,
subsidy_cap), else ``w`` review (risk score >= ORDERQ_RISK_REVIEW_SCORE,
duplicate_suspect, unknown_sku under ``review``), else ``v`` validated. A rejected
order holds nothing; an order in review keeps its reservation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from orderq import keys, wire
from orderq.client import Redis
from orderq.commands import Value
from orderq.ledger import stock
from orderq.openrecords import OpenRecords
from orderq.schema import Order, coupon_cents, goods_cents, money, sku_totals
from orderq.settings import Settings
from orderq.wire import Decided, DecisionRow, Status
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
    outcome: Decided = Decided.VALIDATED
    priority: str = "regular"
    reasons: list[str] = field(default_factory=list)
    risk_score: int = 0


def open_decisions() -> OpenRecords:
    """A validate worker's decisions kept open until handed off (the ledger's bucket forgets them
    after a day; an order in the intake or a validate dead letter may wait longer)."""
    return OpenRecords(keys.DECIDED_OPEN_KEY, frozenset({Status.ACCEPTED}))


def ledger_args(settings: Settings) -> list[Value]:
    """The ledger script's settings arguments (ARGV[1..12])."""
    return [
        stock.buffer_ppm(settings.stock_buffer),
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


class LedgerKeys:
    """The KEYS of one ledger script call: KEYS[1] the open decisions, then every other ledger
    key the batch touches, each once; the rows name them by index. (A batch's orders share
    their SKUs, coupons and time buckets: one KEYS entry each keeps the call's arguments, which
    redis-py packs one by one, few; each is looked up by what names it, its name made once.)"""

    __slots__ = ("_buckets", "_codes", "_customers", "_days", "_hours", "_index", "_skus", "names")

    def __init__(self) -> None:
        self.names: list[str] = [keys.DECIDED_OPEN_KEY]
        self._index: dict[str, int] = {}
        self._hours: dict[int, tuple[int, int, int]] = {}
        self._buckets: dict[int, tuple[int, int]] = {}
        self._days: dict[int, int] = {}
        self._skus: dict[str, int] = {}
        self._codes: dict[str, int] = {}
        self._customers: dict[str, int] = {}

    def of(self, name: str) -> int:
        """``name``'s index in KEYS (1-based, as Lua counts), added on first use."""
        i = self._index.get(name)
        if i is None:
            self.names.append(name)
            i = self._index[name] = len(self.names)
        return i

    def hour(self, hour: int) -> tuple[int, int, int]:
        """The decisions of an accept hour, its IP bucket and the one before."""
        found = self._hours.get(hour)
        if found is None:
            of = self.of
            found = self._hours[hour] = (of(keys.decided_key(hour)), of(keys.ip_key(hour)), of(keys.ip_key(hour - 1)))
        return found

    def dup(self, bucket: int) -> tuple[int, int]:
        """A duplicate window's bucket and the one before."""
        found = self._buckets.get(bucket)
        if found is None:
            found = self._buckets[bucket] = (self.of(keys.dup_key(bucket)), self.of(keys.dup_key(bucket - 1)))
        return found

    def day(self, day: int) -> int:
        found = self._days.get(day)
        if found is None:
            found = self._days[day] = self.of(keys.subsidy_key(day))
        return found

    def sku(self, sku: str) -> int:
        """The index of ``sku``'s stock key; its holders key is the next one."""
        found = self._skus.get(sku)
        if found is None:
            self.names += (keys.stock_key(sku), keys.holders_key(sku))
            found = self._skus[sku] = len(self.names) - 1
        return found

    def coupon(self, code: str) -> int:
        found = self._codes.get(code)
        if found is None:
            found = self._codes[code] = self.of(keys.coupon_key(code))
        return found

    def customer(self, channel: str, customer_id: str, field: str) -> int:
        """``field``: "<channel>:<customer id>", what names the customer in the batch."""
        found = self._customers.get(field)
        if found is None:
            found = self._customers[field] = self.of(keys.customer_key(channel, customer_id))
        return found

    def record(self, order_key: str) -> int:
        """An order's ledger record (not shared: an order twice in a batch writes it twice, the
        same record, as it would in two batches)."""
        self.names.append(keys.ledger_key(order_key))
        return len(self.names)


def order_row(
    o: Order,
    accepted_ms: int,
    base: int,
    pre_reject: bool,
    ks: LedgerKeys,
    dup_window_ms: int = 0,
    approval: bool = False,
) -> DecisionRow:
    """One order as the ledger script reads it (an element of its msgpack batch), its keys
    added to ``ks``. ``dup_window_ms`` 0: the duplicate rule is off."""
    lines = sku_totals(o.lines)
    key = o.key
    channel = o.channel
    ip = o.customer.ip or ""
    fp = risk.fingerprint(o, lines) if dup_window_ms else ""
    day = keys.beijing_day(accepted_ms)
    decided, ip_key, ip_prev = ks.hour(accepted_ms // 3_600_000)
    if not ip:
        ip_key = ip_prev = 0
    dup_key, dup_prev = ks.dup(accepted_ms // dup_window_ms) if fp else (0, 0)
    customer = f"{channel}:{o.customer.id}"
    sku_index = ks.sku
    return DecisionRow(
        key,
        channel,
        customer,
        accepted_ms,
        base,
        1 if pre_reject else 0,
        ip,
        fp,
        day,
        goods_cents(o),
        coupon_cents(o) if o.coupons else 0,
        [x for sku, qty in lines.items() for x in (sku, qty, sku_index(sku))],
        [x for c in o.coupons for x in (c.code, ks.coupon(c.code))] if o.coupons else [],
        str(accepted_ms),
        1 if approval else 0,
        decided,
        ks.customer(channel, o.customer.id, customer),
        ks.record(key),
        ip_key,
        ip_prev,
        dup_key,
        dup_prev,
        ks.day(day),
    )


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
            out.append(Decision(order=o, outcome=Decided.REVIEW, priority=prio, reasons=["approval_required"]))
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
    dup_ms = r.settings.dup_window_s * 1000  # 0 turns the duplicate rule off
    pre: list[tuple[int, list[str]]] = []
    settings = r.settings
    for o in orders:
        base, reasons = risk.assess(o)
        if o.coupons and any(c.platform != o.channel for c in o.coupons):
            reasons.append("coupon_cross_platform")
        if needs_approval(settings, o):
            reasons.append("approval_required")
        pre.append((base, reasons))
    ks = LedgerKeys()
    batch = [
        order_row(
            orders[i],
            accepted_us[i] // 1000,
            pre[i][0],
            "coupon_cross_platform" in pre[i][1],
            ks,
            dup_ms,
            "approval_required" in pre[i][1],
        )
        for i in seq
    ]
    closing: list[str] = []
    if open_records is not None:
        await open_records.sweep(r)
        closing = open_records.take()
    args = [*ledger_args(r.settings), wire.decision_rows(batch), msgpack_encode(closing) if closing else ""]
    try:
        (raw,) = await r.run(lambda pipe: r.script(pipe, "checks", ks.names, args))
    except BaseException:
        if open_records is not None:
            open_records.give_back(closing)
        raise
    replies: list[Any] = [None] * len(orders)
    for i, reply in zip(seq, wire.decode_replies(raw), strict=True):
        replies[i] = reply
    out = []
    for o, (base, reasons), reply in zip(orders, pre, replies, strict=True):
        if reply.reasons:
            seen = set(reasons)
            for text in reply.reasons:
                if text not in seen:
                    seen.add(text)
                    reasons.append(text)
        if len(reasons) > 1:
            reasons.sort(key=_rank)
        prio = "vip" if o.customer.tier == "vip" else ("new" if reply.first_order else "regular")
        score = base + reply.extra_score
        out.append(Decision(order=o, outcome=reply.outcome, priority=prio, reasons=reasons, risk_score=score))
    return out


msgpack_encode = msgspec.msgpack.Encoder().encode
