"""What an executed order costs in memory, and that what it keeps lives exactly as long as its
status record: the status hash stays small (listpack-encoded: no value over 64 bytes), the
order's payload lives in its own key beside it, with the record's TTL at every turn (executed,
a deferred sync owed then replayed, a dispatch dead letter then resolved, an interception, an
event), what an intercept, a shipment and a return carry is still the order, and ``orderq
audit`` finds a payload key that would outlive its record or go before it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from breaker.controller import Breaker
from orderq import client as oq_client
from orderq import keys, lifecycle
from orderq.lifecycle import OrderEvent
from orderq.schema import unpack_order
from orderq.settings import Settings
from orderq.wire import Field
from tests.conftest import dispatch_all, drain, make_order, unique
from tests.test_validate_rules import accept

TTL = 2
TTL_ENV = {"ORDERQ_STATUS_TTL_S": str(TTL)}
# A payload key is the order as the intake packed it plus a key's bookkeeping; a status hash
# converted to a hashtable costs about a kilobyte more than its listpack.
PAYLOAD_OVERHEAD_MAX = 160


@pytest.fixture
async def rt(flushed: object, settings_for: Callable[..., Settings]) -> AsyncIterator[oq_client.Redis]:
    """A connection whose settings carry a two-second status TTL."""
    conn = await oq_client.connect(settings_for(**TTL_ENV))
    yield conn
    await conn.close()


def names(r: oq_client.Redis, key: str) -> tuple[str, str]:
    p = r.partition_of(key)
    return p.status(key), p.payload(key)


async def ttls(r: oq_client.Redis, key: str) -> tuple[int, int]:
    """PTTL of the status record and of the payload key (-1 none, -2 gone)."""
    status, payload = names(r, key)
    a, b = await r.client.pttl(status), await r.client.pttl(payload)
    return int(a), int(b)


async def assert_same_life(r: oq_client.Redis, key: str, running: bool) -> None:
    """Both keys exist; both without a TTL, or both with (nearly) the same one."""
    status, payload = await ttls(r, key)
    if running:
        assert 0 < status <= TTL * 1000 and 0 < payload <= TTL * 1000 and abs(status - payload) < 50, (status, payload)
    else:
        assert (status, payload) == (-1, -1)


async def executed(r: oq_client.Redis, **over: object) -> tuple[str, bytes]:
    """A new order accepted, validated and executed in process: its key and its packed payload."""
    (key,) = await accept(r, make_order(unique("M"), **over))
    p = r.partition_of(key)
    await drain(r)
    st = await r.client.hget(p.status(key), Field.STATUS)
    assert st == b"executed"
    payload = await r.client.hget(p.order_copies, key)  # the outbox's copy: no dispatcher ran
    assert payload
    return key, payload


async def test_an_executed_orders_status_stays_listpack_and_its_payload_key_is_small(r):
    key, payload = await executed(r)
    status, holder = names(r, key)
    assert await r.client.object("ENCODING", status) == b"listpack"
    assert not await r.client.hexists(status, Field.PAYLOAD)
    assert await r.client.get(holder) == payload
    used = int(await r.client.memory_usage(holder))
    assert used <= len(payload) + PAYLOAD_OVERHEAD_MAX, (used, len(payload))
    assert unpack_order(await r.client.get(holder)).key == key


async def test_the_payload_expires_with_the_status_record(rt):
    r = rt
    key, _ = await executed(r)
    await assert_same_life(r, key, running=True)
    await asyncio.sleep(TTL + 0.5)
    assert await ttls(r, key) == (-2, -2)


async def test_a_deferred_sync_keeps_both_until_it_is_replayed(rt):
    r = rt
    await r.client.hset(keys.BREAKER_KEY, "stage", "degraded")
    key, _ = await executed(r, remark="周末送货")
    await assert_same_life(r, key, running=False)
    await r.client.hset(keys.BREAKER_KEY, "stage", "normal")
    assert await Breaker(r).replay_deferred() == 1
    await assert_same_life(r, key, running=True)
    await asyncio.sleep(TTL + 0.5)
    assert await ttls(r, key) == (-2, -2)


async def test_an_interception_keeps_both_and_carries_the_order(rt):
    r = rt
    key, payload = await executed(r)
    assert await lifecycle.cancel(r, key, "buyer_cancelled") == lifecycle.Answer.INTERCEPTING
    await assert_same_life(r, key, running=False)
    p = r.partition_of(key)
    ((_id, f),) = await r.client.xrange(p.outbox("wms.intercept"))
    assert f[b"d"] == payload and f[b"k"] == key.encode()
    await lifecycle.apply_event(r, key, OrderEvent(source="wms", status="intercepted"))
    await assert_same_life(r, key, running=True)  # cancelled: final, the TTL runs for both


async def test_a_shipment_carries_the_order_and_events_move_both_ttls(rt):
    r = rt
    key, payload = await executed(r)
    await asyncio.sleep(1)
    ev = OrderEvent(source="wms", status="shipped", carrier="SF", tracking_no="SF1", warehouse="SH")
    assert (await lifecycle.apply_event(r, key, ev)).status == "shipped"
    await assert_same_life(r, key, running=True)
    status, holder = await ttls(r, key)
    assert status > (TTL - 0.5) * 1000 and holder > (TTL - 0.5) * 1000  # counted from the event
    p = r.partition_of(key)
    ((_id, sync),) = await r.client.xrange(p.outbox(lifecycle.SHIP_SYNC))
    assert sync[b"d"] == payload
    notices = [f for _id, f in await r.client.xrange(p.outbox(lifecycle.SHIPPED_SMS)) if f.get(b"n") == b"shipped"]
    assert [f[b"d"] for f in notices] == [payload]


async def test_a_return_of_an_order_not_routed_gives_its_lines_back(r):
    sku = unique("MR-")
    stock = keys.stock_key(sku)
    await r.client.hset(stock, mapping={"p": 10, "r": 0})
    key, _ = await executed(r, lines=[{"sku": sku, "qty": 2, "unit_price": "1.00"}], paid_amount="2.00")
    assert int(await r.client.hget(stock, "r")) == 2
    assert not await r.client.hexists(r.partition_of(key).status(key), Field.ROUTE)  # the payload says what
    await lifecycle.apply_event(r, key, OrderEvent(source="wms", status="returned"))
    assert await r.client.hmget(stock, ["p", "r"]) == [b"10", b"0"]


async def test_a_dispatch_dead_letter_keeps_both_until_resolved(rt, settings_for):
    from orderq import deadletters
    from tests.test_dispatch import Sink

    r = rt
    sink = await Sink().start()
    try:
        key, _ = await executed(r)
        sink.status_of[key] = 422  # refused for good: a dead letter at once
        await dispatch_all(
            settings_for(**TTL_ENV, ORDERQ_WEBHOOK_WMS_PICK=sink.url + "/pick", ORDERQ_DISPATCH_BACKOFF_S=0.02), "mem"
        )
        await assert_same_life(r, key, running=False)
        (letter,) = [x.id for x in (await deadletters.list_dead(r))[0] if x.order_key == key]
        await deadletters.discard(r, letter, "no warehouse")
        await assert_same_life(r, key, running=True)
    finally:
        await sink.stop()


async def test_the_audit_finds_a_payload_key_that_would_outlive_its_record(r):
    from orderq import audit

    kept, _ = await executed(r)
    early, _ = await executed(r)
    rep = await audit.run(r)
    assert rep["failed"] == [] and rep["copy_mismatch"] == 0, rep
    await r.client.persist(names(r, kept)[1])  # it would outlive its record
    await r.client.persist(names(r, early)[0])  # it would go before its record
    rep = await audit.run(r)
    assert rep["failed"] == ["copy_mismatch"] and rep["copy_mismatch_by"] == {"payload_ttl": 2}, rep
    await r.client.delete(names(r, kept)[0])  # its record gone: the payload key never goes
    await r.client.persist(names(r, early)[1])  # both kept: they agree again
    rep = await audit.run(r)
    assert rep["copy_mismatch_by"] == {"payload_orphan": 1}, rep
    assert rep["copy_mismatch_keys"] == [f"{kept} payload_orphan"]
