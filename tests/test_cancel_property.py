"""Property test of cancellation on a real Valkey: random interleavings of cancels (some cut
short between the partition script and the ledger release), validation crashes after the
ledger script and before the hand-off, and the stages' batches. Afterwards every order is
cancelled with nothing picked, or executed / intercepting; stock, single-use coupons and the
subsidy day totals hold exactly what the orders that went on hold, nothing of the others."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orderq import client as oq_client
from orderq import keys, lifecycle
from orderq.client import Redis
from orderq.ledger import stock
from orderq.ledger.coupons import CouponRecord, put_coupons
from orderq.schema import normalise, order_decoder, pack, unpack_order
from orderq.server import EmbeddedServer
from orderq.settings import Settings
from tests.conftest import drain, make_order
from tests.test_cancel import execute_only, validate_only
from validate import checks

ORDERS = 4
SKU = "P-SKU"
QTY = 3

cancel = st.tuples(st.just("cancel"), st.integers(0, ORDERS - 1), st.booleans())  # (settled now?)
arrive = st.tuples(st.just("arrive"), st.integers(0, ORDERS - 1))
step = st.sampled_from([("validate",), ("execute",), ("ledger_crash",), ("settle",)])
ops = st.lists(st.one_of(cancel, arrive, step), min_size=1, max_size=14)


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


async def scenario(settings_: Settings, ops: list[Any]) -> None:
    r = await oq_client.connect(settings_)
    try:
        await r.client.flushall()
        await oq_client.ensure_groups(r)
        await stock.set_stock(r, [(SKU, 1000)])
        await put_coupons(r, [CouponRecord(f"C{i}", "tmall", "10.00", None, True) for i in range(ORDERS)])
        arrived: set[int] = set()
        for op in ops:
            if op[0] == "cancel":
                if op[2]:
                    await lifecycle.cancel(r, key_of(op[1]), "other")
                else:  # the ingress died before the ledger release
                    ks, args = lifecycle.cancel_call(r, key_of(op[1]), "other", "")
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
        await drain(r)
        await lifecycle.settle_owed(r, r.partitions)  # the sweep
        held_by: dict[str, int] = {}
        goods = 0
        for i in arrived:
            key = key_of(i)
            h = await r.client.hgetall(r.partition_of(key).status(key))
            st_ = h[b"s"].decode()
            picked = any(f.startswith(b"x:wms.pick") for f in h)
            user = await r.client.hget(keys.coupon_key(f"C{i}"), "u")
            holds = await r.client.hget(keys.holders_key(SKU), key)
            if st_ == "cancelled":
                assert not picked, key
                assert user is None and holds is None, (key, user, holds)
            else:
                assert st_ in ("executed", "intercepting"), (key, st_)
                assert picked and user == key.encode() and holds == str(QTY).encode(), key
                held_by[key] = QTY
                goods += QTY * 10000
        assert int(await r.client.hget(keys.stock_key(SKU), "r") or 0) == sum(held_by.values())
        sub = 0
        async for k in r.client.scan_iter(match=keys.LEDGER_PREFIX + "sub:*"):
            sub += sum(int(v) for f, v in (await r.client.hgetall(k)).items() if f.endswith(b"|g"))
        assert sub == goods
        assert not any([await r.client.hlen(p.cancel_owed) for p in r.partitions])
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
@given(ops=ops)
def test_cancels_and_crashes_leave_exact_totals(base_settings: Settings, ops: list[Any]) -> None:
    asyncio.run(scenario(base_settings, ops))
