"""Cancellation (contract §5) on a real server: a real ingress process, the stages run by their
real workers (drained) or as real processes, a local HTTP server as the warehouse.

Whatever the moment of the cancel: cancelled with nothing picked and everything it held
released once, or intercepting with one wms.intercept — never picked without one."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from dispatch.worker import Dispatcher
from execute.worker import ExecuteWorker
from orderq import audit, keys
from orderq import client as oq_client
from orderq.client import Redis
from orderq.control import Control
from orderq.wire import Field
from tests.conftest import ADMIN, auth, drain, make_order, unique
from tests.test_dead_letters import fail_until_dead
from tests.test_dispatch import Sink, running, until
from validate.worker import ValidateWorker

SKU = "CX-SOFA"
COUPON = "CX-ONCE"
JSON = {"Content-Type": "application/json"}


def order(n: str, qty: int = 2, coupon: bool = False, **over: Any) -> dict[str, Any]:
    lines = [{"sku": SKU, "qty": qty, "unit_price": "100.00"}]
    o = make_order(n, order_id=n, lines=lines, paid_amount=f"{qty * 100}.00", **over)
    if coupon:
        o["coupons"] = [{"code": COUPON, "platform": "tmall", "amount": "10.00"}]
        o["paid_amount"] = f"{qty * 100 - 10}.00"
    return o


async def post(c: httpx.AsyncClient, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return await c.post(path, json=body, headers={**JSON, **(auth() if headers is None else headers)})


async def setup_stock(c: httpx.AsyncClient, physical: int = 100) -> None:
    res = await c.put("/v1/admin/stock", json={"items": [{"sku": SKU, "physical": physical}]}, headers=ADMIN)
    assert res.status_code == 200, res.text
    coupon = {"code": COUPON, "platform": "tmall", "amount": "10.00", "expires_at": None, "single_use": True}
    res = await c.put("/v1/admin/coupons", json={"coupons": [coupon]}, headers=ADMIN)
    assert res.status_code == 200, res.text


async def stock(c: httpx.AsyncClient) -> dict[str, Any]:
    res = await c.get(f"/v1/admin/stock/{SKU}", headers=ADMIN)
    assert res.status_code == 200, res.text
    return dict(res.json())


async def record(r: Redis, key: str) -> dict[bytes, bytes]:
    return dict(await r.client.hgetall(r.partition_of(key).status(key)))


async def cancel(c: httpx.AsyncClient, key: str, reason: str = "buyer_cancelled", **kw: Any) -> httpx.Response:
    channel, order_id = key.split(":", 1)
    return await post(c, f"/v1/orders/{channel}/{order_id}/cancel", {"reason": reason, "note": "test"}, **kw)


def picked(h: dict[bytes, bytes]) -> bool:
    return any(f.startswith(b"x:wms.pick") for f in h)


async def validate_only(r: Redis) -> None:
    control = await Control(r).start()
    try:
        await ValidateWorker(r, control, consumer="t-v").run(drain=True)
    finally:
        await control.stop()


async def execute_only(r: Redis) -> None:
    control = await Control(r).start()
    try:
        await ExecuteWorker(r, control, consumer="t-e").run(drain=True)
    finally:
        await control.stop()


async def coupon_user(r: Redis) -> bytes | None:
    return await r.client.hget(keys.coupon_key(COUPON), "u")


async def subsidy_goods(r: Redis) -> int:
    total = 0
    async for k in r.client.scan_iter(match=keys.LEDGER_PREFIX + "sub:*"):
        for f, v in (await r.client.hgetall(k)).items():
            if f.endswith(b"|g"):
                total += int(v)
    return total


@pytest.fixture
async def api(ingress: Callable[..., Any]) -> Any:
    base = await ingress()
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        await setup_stock(c)
        yield c


async def test_cancel_before_validation_never_executes_and_stock_stays_sellable(api, r):
    key = f"tmall:{unique()}"
    assert (await post(api, "/v1/orders", order(key.split(":")[1], coupon=True))).status_code == 202
    res = await cancel(api, key)
    assert res.status_code == 200 and res.json() == {"order_key": key, "status": "cancelled"}, res.text
    assert (await cancel(api, key)).json() == {"order_key": key, "status": "cancelled"}  # a repeat: the same
    await drain(r)
    h = await record(r, key)
    assert h[b"s"] == b"cancelled" and not picked(h)
    assert (await stock(api))["sellable"] == 95 and (await stock(api))["reserved"] == 0
    assert await coupon_user(r) is None and await subsidy_goods(r) == 0
    doc = (await api.get(f"/v1/orders/tmall/{key.split(':')[1]}", headers=ADMIN)).json()
    assert doc["status"] == "cancelled"
    assert doc["cancel"]["reason"] == "buyer_cancelled" and doc["cancel"]["outcome"] == "cancelled"
    assert await r.client.ttl(r.partition_of(key).status(key)) > 0  # final: its TTL runs


async def test_cancel_after_validation_releases_once_and_never_executes(api, r):
    key = f"tmall:{unique()}"
    await post(api, "/v1/orders", order(key.split(":")[1], coupon=True))
    await validate_only(r)
    assert (await stock(api))["reserved"] == 2 and await coupon_user(r) == key.encode()
    assert (await cancel(api, key)).status_code == 200
    # released at once (from its ready-lane entry), before the execute stage ever sees it
    assert (await stock(api))["reserved"] == 0 and await coupon_user(r) is None and await subsidy_goods(r) == 0
    await execute_only(r)  # the stage skips (and acknowledges) its entry; nothing is released twice
    h = await record(r, key)
    assert h[b"s"] == b"cancelled" and not picked(h)
    s = await stock(api)
    assert (s["reserved"], s["sellable"]) == (0, 95)
    assert await coupon_user(r) is None and await subsidy_goods(r) == 0
    assert not await r.client.hlen(r.partition_of(key).cancel_owed)
    await drain(r)  # nothing left to do, nothing released twice
    assert (await stock(api))["reserved"] == 0


async def test_cancel_of_an_order_in_review_and_of_a_held_order(ingress, r, settings_for):
    base = await ingress(ORDERQ_RISK_REVIEW_SCORE=0)  # every order goes to review
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        await setup_stock(c)
        key = f"tmall:{unique()}"
        await post(c, "/v1/orders", order(key.split(":")[1], coupon=True))
        conn = await oq_client.connect(settings_for(ORDERQ_RISK_REVIEW_SCORE=0))
        try:
            await validate_only(conn)
        finally:
            await conn.close()
        assert (await record(r, key))[b"s"] == b"review" and (await stock(c))["reserved"] == 2
        res = await cancel(c, key)
        assert res.status_code == 200, res.text
        assert (await stock(c))["reserved"] == 0 and await coupon_user(r) is None and await subsidy_goods(r) == 0
        assert (await c.get("/v1/review", headers=ADMIN)).json()["items"] == []
        # a reviewer's late decision changes nothing
        res = await c.post(f"/v1/review/tmall/{key.split(':')[1]}/approve", headers=ADMIN)
        assert (await record(r, key))[b"s"] == b"cancelled"

    base = await ingress()
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        held = f"tmall:{unique()}"
        res = await c.post("/v1/admin/holds", json={"province": "江苏省", "reason": "typhoon"}, headers=ADMIN)
        assert res.status_code in (200, 201), res.text
        await post(c, "/v1/orders", order(held.split(":")[1]))
        await drain(r)
        assert (await record(r, held))[b"s"] == b"held"
        before = (await stock(c))["reserved"]
        assert (await cancel(c, held)).status_code == 200
        assert (await stock(c))["reserved"] == before - 2
        await c.delete("/v1/admin/holds/江苏省", headers=ADMIN)
        await drain(r)
        h = await record(r, held)
        assert h[b"s"] == b"cancelled" and not picked(h)


async def test_cancel_after_pick_intercepts_once_and_the_dispatcher_delivers_it(api, r, settings_for):
    key = f"tmall:{unique()}"
    await post(api, "/v1/orders", order(key.split(":")[1]))
    await drain(r)
    assert (await record(r, key))[b"s"] == b"executed"
    for _ in range(3):
        res = await cancel(api, key)
        assert res.status_code == 202 and res.json() == {"order_key": key, "status": "intercepting"}
    p = r.partition_of(key)
    assert await r.client.xlen(p.outbox("wms.intercept")) == 1
    h = await record(r, key)
    assert h[b"s"] == b"intercepting" and h[b"xn:wms.intercept"] == b"1"
    assert await r.client.ttl(p.status(key)) == -1  # owed work: no TTL
    wms = await Sink().start()
    conn = await oq_client.connect(settings_for(ORDERQ_WEBHOOK_WMS_INTERCEPT=wms.url + "/intercept"))
    try:
        async with running(Dispatcher(conn, consumer="t-d")):
            await until(lambda: wms.delivered() == {f"{key}:wms.intercept": 1}, "the intercept delivered")
    finally:
        await conn.close()
        await wms.stop()
    body = wms.requests[0]["body"]
    assert body["action"] == "wms.intercept" and body["order_key"] == key


async def test_409_after_shipment(api, r):
    key = f"tmall:{unique()}"
    await post(api, "/v1/orders", order(key.split(":")[1]))
    await drain(r)
    # shipped as the events endpoint would record it (written here directly: this test is
    # about the cancel's answer, not the events)
    await r.client.hset(r.partition_of(key).status(key), Field.STATUS, "shipped")
    res = await cancel(api, key)
    assert res.status_code == 409 and res.json()["error"]["code"] == "too_late"
    assert (await record(r, key))[b"s"] == b"shipped"


async def test_cancel_pending_then_the_order_arrives_cancelled(api, r):
    key = f"tmall:{unique()}"
    for _ in range(2):
        res = await cancel(api, key, reason="refund")
        assert res.status_code == 202 and res.json() == {"order_key": key, "status": "cancel_pending"}
    res = await post(api, "/v1/orders", order(key.split(":")[1], coupon=True))
    assert res.status_code == 202 and res.json()["status"] == "accepted"
    h = await record(r, key)
    assert h[b"s"] == b"cancelled" and h[Field.CANCEL_REASON.encode()] == b"refund"
    await drain(r)
    h = await record(r, key)
    assert h[b"s"] == b"cancelled" and not picked(h)
    assert (await stock(api))["reserved"] == 0 and await coupon_user(r) is None
    assert (await cancel(api, key)).status_code == 200
    assert (await post(api, "/v1/orders", order(key.split(":")[1]))).status_code == 200  # a replay


async def test_tokens(api, r):
    key = f"tmall:{unique()}"
    assert (await cancel(api, key, headers=auth("jd"))).status_code == 403
    assert (await cancel(api, key, headers={})).status_code == 401
    assert (await cancel(api, key, headers=ADMIN)).status_code == 202
    bad = await post(api, f"/v1/orders/tmall/{key.split(':')[1]}/cancel", {"reason": "bored"})
    assert bad.status_code == 422


async def test_concurrent_cancels_take_effect_once(api, r):
    keys_ = [f"tmall:{unique()}" for _ in range(3)]
    for k in keys_:
        await post(api, "/v1/orders", order(k.split(":")[1]))
    await validate_only(r)
    answers = await asyncio.gather(*(cancel(api, k) for k in keys_ for _ in range(10)))
    assert {a.status_code for a in answers} == {200}
    await drain(r)
    assert (await stock(api))["reserved"] == 0
    counted = 0
    for p in r.partitions:
        counted += int(await r.client.hget(p.counters, "cancelled") or 0)
    assert counted == 3  # each order cancelled once, whatever the repeats


async def test_shopify_orders_cancelled_webhook(ingress, r):
    import base64
    import hashlib
    import hmac
    import json

    secret = "shh"
    base = await ingress(ORDERQ_SHOPIFY_SECRET=secret)
    body = json.dumps({"id": 4242, "cancel_reason": "customer"}).encode()
    sig = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()
    headers = {**JSON, "X-Shopify-Topic": "orders/cancelled", "X-Shopify-Hmac-Sha256": sig}
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        res = await c.post("/v1/webhooks/shopify", content=body, headers=headers)
    assert res.status_code == 202 and res.json()["status"] == "cancel_pending"


async def test_cancels_racing_the_stages_never_pick_without_an_intercept(ingress, stages, r):
    """Real validate and execute processes; cancels land at random moments of their batches."""
    base = await ingress()
    stages("validate")
    stages("execute")
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        await setup_stock(c, physical=1000)
        ks = [f"tmall:{unique()}" for _ in range(40)]

        async def one(k: str) -> int:
            await post(c, "/v1/orders", order(k.split(":")[1]))
            await asyncio.sleep(random.uniform(0, 0.05))
            return (await cancel(c, k)).status_code

        codes = await asyncio.gather(*(one(k) for k in ks))
        assert set(codes) <= {200, 202}

        async def settled() -> bool:
            for k in ks:
                if (await record(r, k)).get(b"s") not in (b"cancelled", b"intercepting"):
                    return False
            p_owed = [await r.client.hlen(p.cancel_owed) for p in r.partitions]
            return not any(p_owed)

        await until(settled, "every order cancelled or intercepting", timeout=60)
        intercepting = 0
        for k in ks:
            h = await record(r, k)
            if h[b"s"] == b"cancelled":
                assert not picked(h), k
            else:
                assert picked(h) and h[b"xn:wms.intercept"] == b"1", k
                intercepting += 2
        assert (await stock(c))["reserved"] == intercepting  # a recount settles the executed ones
    rep = await audit.run(r)
    assert rep["lost"] == 0 and rep["duplicate_effects"] == 0 and rep["counter_mismatch"] == 0, rep
    assert rep["cancelled"] + rep["intercepting"] == len(ks)


@pytest.mark.parametrize("resolution", ["discard", "replay"])
async def test_a_cancelled_orders_dead_letter_ends_released(api, r, resolution):
    """Decided (stock and coupon held), its hand-off failed for good, then cancelled: whether the
    operator discards or replays the dead letter, the order stays cancelled and holds nothing."""
    key = f"tmall:{unique()}"
    await post(api, "/v1/orders", order(key.split(":")[1], coupon=True))
    await fail_until_dead(r, ValidateWorker, "ResponseError: handoff", decide=True)
    assert (await stock(api))["reserved"] == 2 and await coupon_user(r) == key.encode()
    assert (await cancel(api, key)).status_code == 200
    (item,) = (await api.get("/v1/admin/dead-letters", headers=ADMIN)).json()["items"]
    path = f"/v1/admin/dead-letters/{item['id']}/{resolution}"
    res = await api.post(path, json={"reason": "customer called"}, headers=ADMIN)
    assert res.status_code == 200, res.text
    await drain(r)
    h = await record(r, key)
    assert h[b"s"] == b"cancelled" and not picked(h)
    assert (await stock(api))["reserved"] == 0 and await coupon_user(r) is None and await subsidy_goods(r) == 0
    assert await r.client.ttl(r.partition_of(key).status(key)) > 0
