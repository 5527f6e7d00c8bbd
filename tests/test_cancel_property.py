"""Property test of cancellation on a real Valkey: random interleavings of cancels (some cut
short between the partition script and the ledger release), validation crashes after the
ledger script and before the hand-off, the stages' batches, and the shipment events of the
systems downstream (packed, shipped, delivered, return_requested, returned, intercepted,
intercept_failed, from sources of every trust, some cut short before their ledger step).
Afterwards every order is cancelled with nothing picked (or its parcel stopped), or went on;
stock, single-use coupons and the subsidy day totals hold exactly what the orders that went on
hold (a returned order's units back once, nothing of the others); an order is never both
cancelled and shipped in effect; each shipment effect is in its outbox once, and only for an
order that was live when its parcel left."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from orderq import client as oq_client
from orderq import keys, lifecycle
from orderq.client import Redis
from orderq.ledger import stock
from orderq.ledger.coupons import CouponRecord, put_coupons
from orderq.lifecycle import OrderEvent
from orderq.schema import normalise, order_decoder, pack, unpack_order
from orderq.server import EmbeddedServer
from orderq.settings import Settings
from orderq.wire import Field
from tests.conftest import drain, make_order
from tests.test_cancel import execute_only, validate_only
from validate import checks

ORDERS = 4
SKU = "P-SKU"
QTY = 3

EVENT_STATUSES = ["packed", "shipped", "delivered", "return_requested", "returned", "intercepted", "intercept_failed"]
PARCEL_LEFT = {"shipped", "intercept_failed", "delivered"}  # a word that the parcel left the warehouse
LIVE = {"executed", "shipped", "delivered", "return_requested", "returned", "intercepting"}  # executed, not cancelled
HOLDING = {"executed", "intercepting", "shipped", "delivered", "return_requested"}  # their units still held

cancel = st.tuples(st.just("cancel"), st.integers(0, ORDERS - 1), st.booleans())  # (settled now?)
arrive = st.tuples(st.just("arrive"), st.integers(0, ORDERS - 1))
step = st.sampled_from([("validate",), ("execute",), ("ledger_crash",), ("settle",)])
event = st.tuples(
    st.just("event"),
    st.integers(0, ORDERS - 1),
    st.sampled_from(["carrier", "wms", "erp", "channel"]),
    st.sampled_from(EVENT_STATUSES),
    st.sampled_from(["", "SF1", "SF2"]),  # tracking number
    st.booleans(),  # settled now? (else cut short before the ledger step: the sweep completes it)
)
ops = st.lists(st.one_of(cancel, arrive, step, event), min_size=1, max_size=14)
# after the stages ran what had come: cancels of executed orders ("recall": of an order that
# came) and the warehouse's and carriers' words about their parcels, interleaved
recall = st.tuples(st.just("recall"), st.integers(0, ORDERS - 1), st.booleans())
later = st.lists(st.one_of(recall, event, event, cancel, arrive, step), max_size=10)


def key_of(i: int) -> str:
    return f"tmall:P{i}"


def order_of(i: int) -> dict[str, Any]:
    return make_order(
        f"P{i}",
        order_id=f"P{i}",
        lines=[{"sku": SKU, "qty": QTY, "unit_price": "100.00"}],
        coupons=[{"code": f"C{i}", "platform": "tmall", "amount": "10.00"}],
        paid_amount=f"{QTY * 100 - 10}.00",
    )


async def arrive_order(r: Redis, i: int) -> None:
    """Queued as the ingress does (the intake script, with the partition's pending cancels)."""
    raw = msgspec.json.encode(order_of(i))
    o = normalise(order_decoder.decode(raw), raw)
    p = r.partition_of(o.key)
    ks = [p.intake, p.counters, p.status(o.key), p.cancel_pending]
    await r.run(lambda pipe: r.script(pipe, "intake", ks, [r.settings.status_ttl_s, o.key, pack(o), ""]))


async def ledger_crash(r: Redis) -> None:
    """The validate stage decided (the ledger script held) and died before its hand-off."""
    for p in r.partitions:
        entries = await r.client.xrange(p.intake)
        orders = [unpack_order(f[b"d"]) for _, f in entries]
        if orders:
            await checks.decide(r, orders, [int(f[b"ta"]) for _, f in entries])


async def _cut_short(*args: Any, **kw: Any) -> int:
    return 0


async def apply_event(r: Redis, key: str, ev: OrderEvent, settled: bool) -> lifecycle.EventResult:
    """An event through the endpoint's function; unsettled, the process died after the partition
    script (event.lua) and before the return's or the interception's ledger step."""
    if settled:
        return await lifecycle.apply_event(r, key, ev)
    saved = lifecycle.settle_returns, lifecycle.finish_cancel
    lifecycle.settle_returns, lifecycle.finish_cancel = _cut_short, _cut_short  # type: ignore[assignment]
    try:
        return await lifecycle.apply_event(r, key, ev)
    finally:
        lifecycle.settle_returns, lifecycle.finish_cancel = saved


async def outbox_count(r: Redis, key: str, action: str, kind: str | None = None) -> int:
    """Entries of ``key`` in the action's outbox (of ``kind`` if given)."""
    entries = await r.client.xrange(r.partition_of(key).outbox(action))
    return sum(1 for _, f in entries if f[b"k"] == key.encode() and (kind is None or f.get(b"n") == kind.encode()))


async def scenario(settings_: Settings, ops: list[Any], later: list[Any]) -> None:
    r = await oq_client.connect(settings_)
    try:
        await r.client.flushall()
        await oq_client.ensure_groups(r)
        await stock.set_stock(r, [(SKU, 1000)])
        await put_coupons(r, [CouponRecord(f"C{i}", "tmall", "10.00", None, True) for i in range(ORDERS)])
        arrived: set[int] = set()
        synced: set[str] = set()  # orders live when a parcel-left word with a tracking number came
        notified: set[str] = set()  # ... and when a shipped / intercept_failed word came

        def came(n: int) -> str:
            """The key of the n-th order that came (modulo how many did)."""
            return key_of(sorted(arrived)[n % len(arrived)])

        async def play(op: Any) -> None:
            if op[0] == "cancel" or (op[0] == "recall" and arrived):
                key = key_of(op[1]) if op[0] == "cancel" else came(op[1])
                if op[2]:
                    await lifecycle.cancel(r, key, "other")
                else:  # the ingress died before the ledger release
                    ks, args = lifecycle.cancel_call(r, key, "other", "")
                    await r.run(lambda pipe, ks=ks, args=args: r.script(pipe, "cancel", ks, args))
            elif op[0] == "arrive" and op[1] not in arrived:
                arrived.add(op[1])
                await arrive_order(r, op[1])
            elif op[0] == "validate":
                await validate_only(r)
            elif op[0] == "execute":
                await execute_only(r)
            elif op[0] == "ledger_crash":
                await ledger_crash(r)
            elif op[0] == "settle":
                await lifecycle.settle_owed(r, r.partitions)
            elif op[0] == "event" and arrived:
                _, n, src, status, tracking, settled = op
                key = came(n)
                ev = OrderEvent(source=src, status=status, tracking_no=tracking or None, carrier="SF")
                res = await apply_event(r, key, ev, settled)
                live = res.outcome == "applied" and res.before in LIVE and res.status != "cancelled"
                if live and status in PARCEL_LEFT and tracking:
                    synced.add(key)
                if live and status in PARCEL_LEFT - {"delivered"}:
                    notified.add(key)

        for op in ops:
            await play(op)
        if later:
            await drain(r)
            for op in later:
                await play(op)
        await drain(r)
        await lifecycle.settle_owed(r, r.partitions)  # the sweep
        await lifecycle.settle_all_returns(r)
        held_by: dict[str, int] = {}
        goods = 0
        for i in arrived:
            key = key_of(i)
            h = await r.client.hgetall(r.partition_of(key).status(key))
            st_ = h[Field.STATUS.encode()].decode()
            picked = any(f.startswith(b"x:wms.pick") for f in h)
            stopped = b"x:wms.intercept" in h  # picked, then its parcel was stopped
            user = await r.client.hget(keys.coupon_key(f"C{i}"), "u")
            holds = await r.client.hget(keys.holders_key(SKU), key)
            sync = await outbox_count(r, key, lifecycle.SHIP_SYNC)
            sms = await outbox_count(r, key, lifecycle.SHIPPED_SMS, "shipped")
            assert (sync, sms) == (int(key in synced), int(key in notified)), (key, st_, sync, sms)
            if st_ == "cancelled":
                assert not picked or stopped, key
                assert sync == 0 and sms == 0, key  # never cancelled and shipped in effect
                assert user is None and holds is None, (key, user, holds)
            else:
                assert st_ in LIVE, (key, st_)
                assert picked and user == key.encode(), key
                assert holds == (str(QTY).encode() if st_ in HOLDING else None), (key, st_, holds)
                held_by[key] = QTY if st_ in HOLDING else 0
                goods += QTY * 10000  # a return gives back units, not the subsidy day's goods
        stock_doc = await r.client.hgetall(keys.stock_key(SKU))
        assert int(stock_doc.get(b"r", 0)) == sum(held_by.values())
        assert int(stock_doc[b"p"]) == 1000  # nothing counted twice back into the physical stock
        sub = 0
        async for k in r.client.scan_iter(match=keys.LEDGER_PREFIX + "sub:*"):
            sub += sum(int(v) for f, v in (await r.client.hgetall(k)).items() if f.endswith(b"|g"))
        assert sub == goods
        assert not any([await r.client.hlen(p.cancel_owed) for p in r.partitions])
        assert not any([await r.client.hlen(lifecycle.returns_owed_key(p)) for p in r.partitions])
    finally:
        await r.close()


@pytest.fixture(scope="module")
def base_settings(valkey: EmbeddedServer) -> Settings:
    with redis.Redis.from_url(valkey.url) as c:
        c.flushall()
    return Settings.from_mapping(
        {"ORDERQ_REDIS_URL": valkey.url, "ORDERQ_UNKNOWN_SKU": "reject", "ORDERQ_DUP_WINDOW_S": "0"}
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops, later=later)
# the interleavings a random walk seldom reaches, always run: a parcel stopped after its cancel
# (a ship word after it moves nothing), two sources' shipped words, delivery, a return cut short
# and repeated; an interception that failed (the late 'intercepted' and a second cancel change
# nothing); words before execution, about an order cancelled before validation
@example(
    ops=[("arrive", 0), ("arrive", 1)],
    later=[
        ("recall", 0, False),
        ("event", 0, "wms", "intercepted", "", False),
        ("event", 0, "carrier", "shipped", "SF1", True),
        ("event", 1, "wms", "shipped", "SF2", True),
        ("event", 1, "carrier", "shipped", "SF2", True),
        ("event", 1, "carrier", "delivered", "SF2", True),
        ("event", 1, "channel", "return_requested", "", True),
        ("event", 1, "wms", "returned", "", False),
        ("event", 1, "carrier", "returned", "SF2", True),
        ("recall", 1, True),
    ],
)
@example(
    ops=[("arrive", 2)],
    later=[
        ("recall", 0, True),
        ("event", 0, "wms", "intercept_failed", "SF3", True),
        ("event", 0, "wms", "intercepted", "", True),
        ("recall", 0, True),
        ("event", 0, "erp", "delivered", "", True),
    ],
)
@example(
    ops=[
        ("arrive", 3),
        ("event", 0, "wms", "packed", "", True),
        ("event", 0, "carrier", "shipped", "SF4", True),
        ("cancel", 3, True),
        ("arrive", 1),
        ("validate",),
        ("event", 0, "carrier", "shipped", "SF5", True),
    ],
    later=[("event", 1, "erp", "shipped", "", True), ("event", 0, "wms", "shipped", "SF4", True)],
)
def test_cancels_crashes_and_events_leave_exact_totals(
    base_settings: Settings, ops: list[Any], later: list[Any]
) -> None:
    asyncio.run(scenario(base_settings, ops, later))
