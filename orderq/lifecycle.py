"""An order's life after acceptance (contract §5): cancellation and interception; the events of
the systems downstream (shipment, delivery, return) and whose word the public status follows.

A cancel is decided in the order's partition, in one script (orderq/lua/cancel.lua) that runs
in the same slot as every stage's hand-off: an order still waiting (accepted, validated, in
review, held) becomes ``cancelled`` there, and the stage scripts skip (and acknowledge) an entry
whose order is cancelled, so it never executes whatever batch it is in. An executed order
becomes ``intercepting`` and a ``wms.intercept`` action goes to its outbox once in effect; a
shipped one is ``too_late``. A cancel that overtakes its order leaves a pending mark the intake
script reads when the order arrives (it is acknowledged as usual and ends ``cancelled``).

What a cancelled order holds lives in the validation ledger, another slot: the script that
cancels it (review, held: its parked payload) or skips its entry (accepted, validated: the
entry's payload) writes a *release owed* record in the partition, and :func:`settle_owed` then
releases in the ledger (orderq/lua/unreserve.lua, idempotent) and deletes the record if
unchanged. A crash in between leaves the record, which the next settle of that partition (a
worker's after its next skip, or the sweep every ``SWEEP_S``) completes. An order validated or
routed after its cancel holds what it took then: the stage that skips it owes that release too.
"""

from __future__ import annotations

import datetime as dt
import enum
import functools
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec
import structlog
from msgspec import Meta

from orderq import keys
from orderq.client import Redis
from orderq.commands import Value
from orderq.schema import Order, any_json_decoder, coupon_cents, goods_cents, sku_totals, unpack_order
from orderq.settings import Settings
from orderq.wire import Field, parse_route

log = structlog.get_logger("orderq.lifecycle")

CancelReason = Literal["buyer_cancelled", "refund", "fraud", "out_of_stock", "other"]
SWEEP_S = 60.0  # a pass over the partitions' owed releases, per worker process, this often
SCAN_COUNT = 200  # owed records per HSCAN page (one release call per page)
# The release mark makes the subsidy's release happen once per order; it outlives every day
# total it could touch (keys.SUBSIDY_TTL_S after its day) by a day of validation delay.
RELEASE_MARK_TTL_S = keys.SUBSIDY_TTL_S + 24 * 3600
NOTE_MAX = 500


class CancelBody(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /v1/orders/{channel}/{order_id}/cancel``'s body."""

    reason: CancelReason
    note: Annotated[str, msgspec.Meta(max_length=NOTE_MAX)] = ""


class Answer(enum.StrEnum):
    """What a cancel did (cancel.lua's answer); a repeat answers the same."""

    CANCELLED = "cancelled"  # no core action had taken effect: it never executes
    INTERCEPTING = "intercepting"  # wms.pick went out: the warehouse is asked to stop the parcel
    CANCEL_PENDING = "cancel_pending"  # the order is not known yet: it ends cancelled when it comes
    TOO_LATE = "too_late"  # shipped: a return is the way
    NOT_CANCELLABLE = "not_cancellable"  # rejected: nothing to cancel


def cancel_call(r: Redis, order_key: str, reason: str, note: str) -> tuple[list[str], list[Value]]:
    """cancel.lua's KEYS and ARGV for one order."""
    p = r.partition_of(order_key)
    s = r.settings
    ks = [p.status(order_key), p.counters, p.cancel_pending, p.cancel_owed, p.review, p.held, p.parked]
    ks += [p.outbox("wms.intercept"), *p.lanes, p.payload(order_key)]
    maxlen = 0 if "wms.intercept" in s.webhooks else s.outbox_maxlen
    clean = " ".join(note.split())[:NOTE_MAX]  # one line: the pending mark is tab-separated
    return ks, ["cancel", order_key, reason, clean, s.status_ttl_s, maxlen]


async def cancel(r: Redis, order_key: str, reason: str, note: str = "") -> Answer:
    """Cancel ``order_key`` (contract §5); releases what it holds when that is known now."""
    ks, args = cancel_call(r, order_key, reason, note)
    res = (await r.run(lambda pipe: r.script(pipe, "cancel", ks, args)))[0]
    answer = Answer(res[0].decode() if isinstance(res[0], bytes) else str(res[0]))
    if int(res[1]):
        await settle_owed(r, [r.partition_of(order_key)])
    log.info("order.cancel", order_key=order_key, reason=reason, outcome=answer.value)
    return answer


@dataclass(slots=True)
class Owed:
    """One release owed, as read."""

    key: str
    raw: bytes  # the record as read: deleted only if unchanged
    accepted_us: int
    order: Order


def parse_owed(key: str, raw: bytes) -> Owed | None:
    """The record -> its order; None when its payload does not decode (nothing can be released)."""
    try:
        _seq, ta, payload = raw.split(b"|", 2)
        return Owed(key, raw, int(ta or 0), unpack_order(payload))
    except (ValueError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def unreserve_call(items: list[Owed], warehouses: list[str]) -> tuple[list[str], list[Value]]:
    """unreserve.lua's KEYS and ARGV: every key it touches, built here from each order."""
    ks: list[str] = []
    args: list[Value] = [RELEASE_MARK_TTL_S]
    for it in items:
        o = it.order
        skus = list({**sku_totals(o.lines), **sku_totals(o.gifts)})
        codes = list(dict.fromkeys(c.code for c in o.coupons))
        day = keys.beijing_day(it.accepted_us // 1000)
        ks += [keys.cancel_release_mark(it.key), keys.ledger_key(it.key), keys.subsidy_key(day)]
        ks += [keys.coupon_key(c) for c in codes]
        for sku in skus:
            ks += [keys.stock_key(sku), keys.holders_key(sku)]
        ks += [keys.wh_holders_key(sku, wh) for sku in skus for wh in warehouses]
        customer = f"{o.channel}:{o.customer.id}"
        args += [it.key, customer, goods_cents(o), coupon_cents(o), len(codes), len(skus), len(warehouses)]
        args += warehouses
    return ks, args


async def settle_owed(r: Redis, parts: list[keys.Partition] | tuple[keys.Partition, ...]) -> int:
    """Release what the cancelled orders of ``parts`` owe (every page of each partition's owed
    hash), then delete each record unless a stage owed a new one meanwhile. Idempotent.
    Returns the units released."""
    whs = sorted(k.decode() for k in await r.client.hkeys(keys.WAREHOUSES_KEY))
    units = 0
    for p in parts:
        cursor = 0
        while True:
            cursor, page = await r.client.hscan(p.cancel_owed, cursor, count=SCAN_COUNT)
            if page:
                units += await _settle_page(r, p, page, whs)
            if not cursor:
                break
    return units


async def _settle_page(r: Redis, p: keys.Partition, page: dict[bytes, bytes], whs: list[str]) -> int:
    items: list[Owed] = []
    done: list[Value] = []
    for k, raw in page.items():
        key = k.decode(errors="replace")
        it = parse_owed(key, raw)
        if it is None:
            log.error("order.release_unreadable", order_key=key)  # nothing to release by: it goes
        else:
            items.append(it)
        done += [key, raw]
    units = 0
    if items:
        ks, args = unreserve_call(items, whs)
        units = int((await r.run(lambda pipe: r.script(pipe, "unreserve", ks, args)))[0])
    await r.run(lambda pipe: r.script(pipe, "cancel", [p.cancel_owed], ["settled", *done]))
    if items:
        log.info("order.released", orders=[it.key for it in items], units=units)
    return units


async def finish_cancel(r: Redis, order_key: str) -> int:
    """Settle the releases owed in ``order_key``'s partition (an intercepted order's script wrote
    one): returns the units released."""
    return await settle_owed(r, [r.partition_of(order_key)])


async def settle_quietly(r: Redis, parts: list[keys.Partition]) -> int:
    """:func:`settle_owed` for a stage whose script just owed releases: never raises (but a
    cancel), since its batch is done; what it leaves owed the sweep completes."""
    try:
        return await settle_owed(r, parts)
    except Exception as exc:
        log.warning("order.release_deferred", error=repr(exc)[:300])
        return 0


class OwedSweep:
    """A worker's periodic pass over every partition's owed releases: completes what a process
    that stopped between a cancel and its release left owed (and a return's units, the same way)."""

    def __init__(self) -> None:
        self._next = 0.0  # the first call sweeps: a restart is when a process left some owed

    async def maybe(self, r: Redis) -> int:
        """Sweep when due; never raises (but a cancel): the batch it follows must not fail for it."""
        now = time.monotonic()
        if now < self._next:
            return 0
        self._next = now + SWEEP_S
        try:
            units = await settle_owed(r, r.partitions)
            await settle_all_returns(r)  # returns cut short between their two steps, likewise
            return units
        except Exception as exc:
            log.warning("order.release_sweep_failed", error=repr(exc)[:300])
            return 0


# --- Order events from the systems downstream (contract §5) ----------------------------------
# One event is one event.lua call in the order's partition (dedup, timeline, sources, trust,
# conflicts, the shipment's effects), then, for a return, the units given back in the ledger
# slot (returned.lua) and, for an intercepted order, its release (settle_owed above).

EventSource = Literal["carrier", "wms", "erp", "channel"]
EventStatus = Literal[
    "packed", "intercepted", "intercept_failed", "shipped", "delivered", "return_requested", "returned"
]
# carrier names, tracking numbers, warehouse ids: printable text, bounded (a record keeps them)
Label = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]*$")]
RETURN_MARK_TTL_S = 30 * 24 * 3600  # a return's "given back" marker: far beyond any retry of it
SHIP_SYNC = "channel.ship_sync"  # the tracking number back to the platform
SHIPPED_SMS = "notify.sms"  # ... and the buyer's shipping notice (kind "shipped")


def returns_owed_key(p: keys.Partition) -> str:
    """Hash: order key -> units ("<sku>\\t<qty>\\t<warehouse>" lines) a return owes back to stock,
    written by event.lua, deleted once returned.lua gave them back in the ledger slot."""
    return f"{p.base}:rto"


def returned_mark_key(order_key: str) -> str:
    """String, in the ledger slot: the returned order's units were given back (returned.lua)."""
    return f"{keys.LEDGER_PREFIX}rto:{order_key}"


def event_trim(s: Settings) -> str:
    """event.lua's outbox trim ("name=maxlen,..."): an action with a webhook is never trimmed, nor
    notify.sms here: execute.lua trims it, counting down the order copies its entries reference."""
    return f"{SHIPPED_SMS}=0,{SHIP_SYNC}={0 if SHIP_SYNC in s.webhooks else s.outbox_maxlen}"


class OrderEvent(msgspec.Struct, frozen=True):
    """The body of ``POST /v1/orders/{channel}/{order_id}/events``. ``at`` (RFC 3339 with an
    offset) defaults to the time it was received."""

    source: EventSource
    status: EventStatus
    at: Annotated[dt.datetime, Meta(tz=True)] | None = None
    carrier: Label | None = None
    tracking_no: Label | None = None
    warehouse: Label | None = None


decode_event = msgspec.json.Decoder(OrderEvent).decode


def event_problems(doc: object) -> list[tuple[str, str]]:
    """Every failing path of an event body (already JSON) as (path, message), for the 422."""
    if not isinstance(doc, dict):
        return [("$", "expected an object")]
    out: list[tuple[str, str]] = []
    for f in msgspec.structs.fields(OrderEvent):
        if f.name not in doc:
            if f.required:
                out.append((f.name, f"Object missing required field `{f.name}`"))
            continue
        try:
            msgspec.convert(doc[f.name], f.type)
        except msgspec.ValidationError as exc:
            out.append((f.name, str(exc).partition(" - at ")[0]))
    return out


@dataclass(frozen=True, slots=True)
class EventResult:
    """What an event did: ``outcome`` applied | duplicate | missing (no such order)."""

    outcome: str
    status: str  # the public status after it
    before: str
    conflict: bool


def _utc(at: dt.datetime | None) -> str:
    t = (at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def apply_event(r: Redis, order_key: str, ev: OrderEvent) -> EventResult:
    """Apply one event to its order (idempotent by source, status and tracking number), then
    settle what it owes in the ledger slot: a return's units, an interception's release."""
    p = r.partition_of(order_key)
    s = r.settings
    units = await _return_units(r, p, order_key) if ev.status == "returned" else ""
    args: list[Value] = [
        ev.source,
        ev.status,
        _utc(ev.at),
        ev.carrier or "",
        ev.tracking_no or "",
        ev.warehouse or "",
        ",".join(s.source_trust),
        s.status_ttl_s,
        event_trim(s),
        order_key,
        units,
    ]
    ks = [
        p.status(order_key),
        p.counters,
        p.outbox(SHIPPED_SMS),
        p.outbox(SHIP_SYNC),
        returns_owed_key(p),
        p.cancel_owed,
        unshipped_key(p),
        p.payload(order_key),
    ]
    (res,) = await r.run(lambda pipe: r.script(pipe, "event", ks, args))
    outcome, status, before, conflict, return_owed, cancel_owed = (
        x.decode() if isinstance(x, bytes) else x for x in res
    )
    if int(return_owed):
        await settle_returns(r, p, [order_key])
    if int(cancel_owed):
        await finish_cancel(r, order_key)
    log.info(
        "lifecycle.event",
        order_key=order_key,
        source=ev.source,
        reported=ev.status,
        outcome=outcome,
        status=status,
        before=before,
        conflict=bool(int(conflict)),
    )
    return EventResult(outcome, status, before, bool(int(conflict)))


async def _return_units(r: Redis, p: keys.Partition, order_key: str) -> str:
    """The units a return gives back, as returned.lua takes them ("<sku>\\t<qty>\\t<warehouse>"
    lines): each parcel of the order's route from its warehouse (gifts too: the route allocated
    them); an order not routed, its lines from the warehouse its shipments name when they name
    one, else the default warehouse. Read before the event: route and payload never change after
    execution. (A record written before payloads had their own key keeps its payload in the hash.)"""
    record, kept = await r.run(
        lambda pipe: [
            pipe.hmget(p.status(order_key), [Field.ROUTE, Field.PAYLOAD, Field.SHIPMENTS]),
            pipe.get(p.payload(order_key)),
        ]
    )
    route, payload, shipments = record
    payload = kept or payload
    units: dict[tuple[str, str], int] = {}
    if route:
        for parcel in parse_route(route.decode()):
            for sku, qty in parcel.lines + parcel.gifts:
                units[sku, parcel.warehouse] = units.get((sku, parcel.warehouse), 0) + qty
    elif payload:
        whs = {s.get("warehouse") for s in any_json_decoder.decode(shipments)} if shipments else set()
        wh = whs.pop() if len(whs) == 1 and None not in whs else keys.DEFAULT_WAREHOUSE
        for sku, qty in sku_totals(unpack_order(payload).lines).items():
            units[sku, wh] = qty
    return "\n".join(f"{sku}\t{qty}\t{wh}" for (sku, wh), qty in units.items())


async def settle_returns(r: Redis, p: keys.Partition, order_keys: list[str] | None = None) -> int:
    """Give back the units of the returns owed in partition ``p`` (those of ``order_keys``, or
    every one: the sweep after a crash between the two steps), once each; returns how many."""
    owed_key = returns_owed_key(p)
    if order_keys is None:
        owed = {k.decode(): v for k, v in (await r.client.hgetall(owed_key)).items()}
    else:
        values = await r.client.hmget(owed_key, order_keys)
        owed = {k: v for k, v in zip(order_keys, values, strict=True) if v is not None}
    for order_key, text in owed.items():
        ks, args = _returned_call(order_key, text.decode())
        (given,) = await r.run(functools.partial(r.script, name="returned", keys=ks, args=args))
        await r.client.hdel(owed_key, order_key)  # after the ledger's step: a crash in between redoes it, once
        log.info("lifecycle.returned", order_key=order_key, first=bool(given[0]), released=given[1], restocked=given[2])
    return len(owed)


def _returned_call(order_key: str, units: str) -> tuple[list[str], list[Value]]:
    """returned.lua's KEYS and ARGV for one return: every key it touches, built here."""
    ks = [returned_mark_key(order_key)]
    args: list[Value] = [RETURN_MARK_TTL_S, order_key]
    for line in units.splitlines():
        sku, qty, wh = line.split("\t")
        ks += [keys.stock_key(sku), keys.holders_key(sku), keys.wh_holders_key(sku, wh), keys.wh_skus_key(wh)]
        args += [sku, qty, wh]
    return ks, args


async def settle_all_returns(r: Redis) -> int:
    """The sweep: every partition's owed returns (a process cut short between the two steps)."""
    return sum([await settle_returns(r, p) for p in r.partitions])


# --- The ship_lag alert: executed orders with no shipment after ORDERQ_ALERT_SHIP_LAG_S --------
SHIP_LAG_SAMPLE = 100  # oldest entries read per partition per evaluation


def unshipped_key(p: keys.Partition) -> str:
    """Sorted set: order key by execution time (ms) of executed orders not shipped yet, the
    ship_lag alert's view. The execute stage adds each order it executes; event.lua removes it as
    it ships (or ends otherwise); the alert drops what it finds moved on another way (an
    interception, an expired record)."""
    return f"{p.base}:shp"


async def unshipped_late(r: Redis, now: float, lag_s: float) -> tuple[int, float]:
    """(executed orders still unshipped ``lag_s`` after their execution, age in seconds of the
    oldest), from the oldest SHIP_LAG_SAMPLE of each partition: a count of at least that many."""
    cutoff_ms = int((now - lag_s) * 1000)
    parts = r.partitions
    pipe = r.client.pipeline(transaction=False)
    for p in parts:
        pipe.zrangebyscore(unshipped_key(p), "-inf", cutoff_ms, start=0, num=SHIP_LAG_SAMPLE, withscores=True)
    found = [(p, m.decode(), ms) for p, rows in zip(parts, await pipe.execute(), strict=True) for m, ms in rows]
    if not found:
        return 0, 0.0
    pipe = r.client.pipeline(transaction=False)
    for p, key, _ms in found:
        pipe.hget(p.status(key), Field.STATUS)
    late, oldest_ms = 0, None
    stale = r.client.pipeline(transaction=False)
    for (p, key, ms), st in zip(found, await pipe.execute(), strict=True):
        if st == b"executed":
            late += 1
            oldest_ms = ms if oldest_ms is None else min(oldest_ms, ms)
        else:
            stale.zrem(unshipped_key(p), key)
    if len(stale):
        await stale.execute()
    return late, (now - oldest_ms / 1000) if oldest_ms is not None else 0.0
