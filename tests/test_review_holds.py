"""Operator endpoints over real HTTP: stock, coupons, the review queue (approve/reject)
and region holds (hold, lift, and the sweep that catches a stale executor)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from execute.worker import ExecuteWorker
from orderq import client as oq_client
from orderq.control import Control
from orderq.keys import HOLDS_KEY
from orderq.ledger import holds
from orderq.settings import Settings
from tests.conftest import ADMIN, auth, drain, make_order
from tests.test_validate_rules import RULES_ON, accept, line, order, status

JIANGSU, ZHEJIANG = "江苏省", "浙江省"


@pytest.fixture
async def api(ingress: Any, settings_for: Callable[..., Settings]) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """An ingress with every rule on, an admin client for it, and a Redis connection."""
    base = await ingress(**RULES_ON)
    r = await oq_client.connect(settings_for(**RULES_ON))
    async with httpx.AsyncClient(base_url=base, headers=ADMIN) as c:
        yield c, r
    await r.close()


async def post(c: httpx.AsyncClient, *orders: dict[str, Any]) -> list[str]:
    resp = await c.post("/v1/orders/batch", json={"orders": list(orders)}, headers=auth())
    assert resp.status_code == 202 and resp.json()["accepted"] == len(orders), resp.text
    return [o["order_id"] for o in orders]


async def get(c: httpx.AsyncClient, order_id: str, channel: str = "tmall") -> dict[str, Any]:
    resp = await c.get(f"/v1/orders/{channel}/{order_id}")
    assert resp.status_code == 200, resp.text
    return resp.json()


async def set_stock(c: httpx.AsyncClient, **skus: int) -> list[dict[str, Any]]:
    resp = await c.put("/v1/admin/stock", json={"items": [{"sku": k, "physical": v} for k, v in skus.items()]})
    assert resp.status_code == 200, resp.text
    return resp.json()["items"]


async def reserved(c: httpx.AsyncClient, sku: str) -> int:
    return (await c.get(f"/v1/admin/stock/{sku}")).json()["reserved"]


def half_price(**over: Any) -> dict[str, Any]:
    """An order the risk score sends to review (risk_price_anomaly, 80)."""
    return order(lines=[line("SOFA", 1, "2999.00", "1200.00")], paid_amount="1200.00", **over)


# --- review ------------------------------------------------------------------------------
async def test_review_queue_oldest_first_then_approve_and_reject(api):
    c, r = api
    await set_stock(c, SOFA=10)
    resp = await c.put(
        "/v1/admin/coupons",
        json={"coupons": [{"code": "ONCE", "platform": "tmall", "amount": "10.00", "single_use": True}]},
    )
    assert resp.status_code == 200 and resp.json() == {"coupons": 1}
    (first,) = await post(c, half_price())
    await drain(r)
    second_order = half_price(coupons=[{"code": "ONCE", "platform": "tmall", "amount": "10.00"}])
    second_order["lines"][0]["qty"] = 2
    (second,) = await post(c, second_order)
    await drain(r)
    items = (await c.get("/v1/review")).json()["items"]
    assert [i["order_key"] for i in items] == [f"tmall:{first}", f"tmall:{second}"]
    assert items[0]["reasons"] == ["risk_price_anomaly"] and items[0]["risk_score"] == 80
    assert items[0]["since"] <= items[1]["since"] and items[0]["since"].endswith("Z")
    assert await reserved(c, "SOFA") == 3  # orders in review keep their stock

    resp = await c.post(f"/v1/review/tmall/{first}/approve")
    assert resp.status_code == 200 and resp.json()["status"] == "validated"
    await drain(r)
    assert (await get(c, first))["status"] == "executed"
    assert await reserved(c, "SOFA") == 3

    resp = await c.post(f"/v1/review/tmall/{second}/reject")
    assert resp.status_code == 200 and resp.json()["status"] == "rejected"
    assert resp.json()["reasons"] == ["risk_price_anomaly"]
    assert await reserved(c, "SOFA") == 1  # its 2 units are back
    assert (await c.get("/v1/review")).json()["items"] == []
    # the same decision again answers the same; the opposite one is a conflict
    assert (await c.post(f"/v1/review/tmall/{second}/reject")).status_code == 200
    assert await reserved(c, "SOFA") == 1
    resp = await c.post(f"/v1/review/tmall/{second}/approve")
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "not_in_review"
    assert (await c.post(f"/v1/review/tmall/{first}/reject")).status_code == 409
    assert (await c.post("/v1/review/tmall/NOPE/approve")).status_code == 404
    # the rejected order's single-use coupon is free again
    (third,) = await post(
        c, order(lines=[line("SOFA")], coupons=[{"code": "ONCE", "platform": "tmall", "amount": "10.00"}])
    )
    await drain(r)
    assert (await get(c, third))["status"] == "executed"


async def test_admin_endpoints_take_the_admin_token(api):
    c, _r = api
    for method, path, body in [
        ("PUT", "/v1/admin/stock", {"items": [{"sku": "X", "physical": 1}]}),
        ("GET", "/v1/admin/stock/X", None),
        ("PUT", "/v1/admin/coupons", {"coupons": [{"code": "A", "platform": "tmall", "amount": "1.00"}]}),
        ("POST", "/v1/admin/holds", {"province": JIANGSU, "reason": "typhoon"}),
        ("GET", "/v1/admin/holds", None),
        ("DELETE", f"/v1/admin/holds/{quote(JIANGSU)}", None),
        ("GET", "/v1/review", None),
        ("POST", "/v1/review/tmall/T1/approve", None),
        ("POST", "/v1/review/tmall/T1/reject", None),
    ]:
        kw: dict[str, Any] = {"json": body} if body is not None else {}
        no_token = await c.request(method, path, headers={"Authorization": ""}, **kw)
        assert no_token.status_code == 401, (method, path)
        channel = await c.request(method, path, headers=auth(), **kw)
        assert channel.status_code == 403, (method, path)
    assert (await c.get("/v1/admin/holds")).json() == {"holds": []}  # nothing was done


async def test_admin_bodies_are_checked(api):
    c, _r = api
    resp = await c.put("/v1/admin/stock", json={"items": [{"sku": "X", "physical": -1}]})
    assert resp.status_code == 422
    assert resp.json()["error"]["details"][0]["path"] == "items[0].physical"
    resp = await c.put("/v1/admin/coupons", json={"coupons": [{"code": "A", "platform": "ebay", "amount": "1.00"}]})
    assert resp.status_code == 422 and resp.json()["error"]["details"][0]["path"] == "coupons[0].platform"
    resp = await c.put("/v1/admin/coupons", json={"coupons": [{"code": "A", "platform": "jd", "amount": 1.5}]})
    assert resp.status_code == 422 and resp.json()["error"]["details"][0]["path"] == "coupons[0].amount"
    assert (
        await c.put("/v1/admin/stock", content=b"{", headers={"Content-Type": "application/json"})
    ).status_code == 400
    assert (await c.get("/v1/admin/stock/NOPE")).status_code == 404
    assert (await c.get("/v1/review?limit=0")).status_code == 422


async def test_recount_settles_executed_orders(api):
    """Executed orders keep their units until the next warehouse count, which no
    longer contains their goods; orders not yet executed keep theirs through it."""
    c, r = api
    await set_stock(c, SOFA=20)
    await post(c, *(order(lines=[line("SOFA", 2)]) for _ in range(3)))
    await drain(r)
    (waiting,) = await post(c, half_price())  # in review: still owed its unit
    await drain(r)
    assert await reserved(c, "SOFA") == 7
    (view,) = await set_stock(c, SOFA=14)  # the warehouse counted after the 3 picks left
    assert view == {"sku": "SOFA", "physical": 14, "reserved": 1, "sellable": 12}
    (view,) = await set_stock(c, SOFA=14)  # a repeated count settles nothing twice
    assert view["reserved"] == 1
    await c.post(f"/v1/review/tmall/{waiting}/reject")
    assert await reserved(c, "SOFA") == 0


# --- region holds --------------------------------------------------------------------------
def to(province: str) -> dict[str, Any]:
    o = order()
    o["ship_to"]["province"] = province
    return o


async def test_hold_and_release(api):
    c, r = api
    await set_stock(c, **{"SOFA-OAK-3": 100})
    resp = await c.post("/v1/admin/holds", json={"province": JIANGSU, "reason": "typhoon"})
    assert resp.status_code == 201
    holds = (await c.get("/v1/admin/holds")).json()["holds"]
    assert [(h["province"], h["reason"]) for h in holds] == [(JIANGSU, "typhoon")]
    held = await post(c, to(JIANGSU), to(JIANGSU))
    (free,) = await post(c, to(ZHEJIANG))
    await drain(r)
    assert [(await get(c, k))["status"] for k in held] == ["held", "held"]
    assert (await get(c, free))["status"] == "executed"
    assert "held" in (await get(c, held[0]))["times"]

    resp = await c.delete(f"/v1/admin/holds/{quote(JIANGSU)}")
    assert resp.status_code == 200 and resp.json() == {"province": JIANGSU, "released": 2}
    assert [(await get(c, k))["status"] for k in held] == ["validated", "validated"]
    assert (await c.get("/v1/admin/holds")).json() == {"holds": []}
    await drain(r)
    assert [(await get(c, k))["status"] for k in held] == ["executed", "executed"]
    assert (await c.delete(f"/v1/admin/holds/{quote(JIANGSU)}")).status_code == 404


async def test_order_held_on_a_stale_view_is_sent_on_by_the_sweep(flushed, settings_for):
    """An executor that has not yet heard of a lifted hold parks an order after the
    DELETE's own sweep ran: a validate process's background sweep sends it on."""
    r = await oq_client.connect(settings_for())
    try:
        await r.client.hset(HOLDS_KEY, JIANGSU, '{"reason": "typhoon", "since": "2026-11-11T00:00:00.000000Z"}')
        o = make_order("STALE")
        (key,) = await accept(r, o)
        await drain(r)
        assert (await status(r, key))["status"] == "held"
        await r.client.hdel(HOLDS_KEY, JIANGSU)  # lifted, and nobody swept
        control = await Control(r).start()
        try:
            # an executor alone does not send it on: a held order is not in any lane
            assert await ExecuteWorker(r, control, consumer="e").run(drain=True) == 0
            assert (await status(r, key))["status"] == "held"
        finally:
            await control.stop()
        await drain(r)  # the validate worker sweeps, the executor executes
        assert (await status(r, key))["status"] == "executed"
    finally:
        await r.close()


async def test_lifting_a_hold_releases_every_order_held_for_it_behind_other_provinces(
    flushed, settings_for, monkeypatch
):
    """The sweep pages through every held order (a page per partition per call): orders held
    for a lifted province are sent on however many orders held for another province are in
    front of them. One partition, and more held orders than a (lowered) page; more than 128
    too, so that the held set is a real hash table and ZSCAN pages it."""
    monkeypatch.setattr(holds, "SWEEP_PAGE", 20)
    pages: list[int] = []
    real_pages = holds._pages

    def counted(targets: Any, replies: Any) -> Any:
        out = real_pages(targets, replies)
        pages.extend(len(ks) for _p, _c, ks in out)
        return out

    monkeypatch.setattr(holds, "_pages", counted)
    r = await oq_client.connect(settings_for(ORDERQ_PARTITIONS=1))
    try:
        for province in (JIANGSU, ZHEJIANG):
            await holds.set_hold(r, province, "typhoon")
        first = await accept(r, *(to(JIANGSU) for _ in range(150)))
        await drain(r)
        later = await accept(r, *(to(ZHEJIANG) for _ in range(5)))
        await drain(r)
        assert {(await status(r, k))["status"] for k in first + later} == {"held"}

        existed, released = await holds.delete_hold(r, ZHEJIANG)
        assert (existed, released) == (True, 5)
        assert len(pages) > 2 and max(pages) < 155  # it paged, and no call read them all
        await drain(r)
        assert [(await status(r, k))["status"] for k in later] == ["executed"] * 5
        assert {(await status(r, k))["status"] for k in first} == {"held"}

        # A validate process's background sweep finds a lift it did not make (no DELETE
        # sweep ran): the holds changed, so it makes a whole pass.
        sweeper = holds.Sweeper()
        assert await sweeper.sweep(r) == 0  # its first pass: nothing to send on
        await r.client.hdel(HOLDS_KEY, JIANGSU)
        assert await sweeper.sweep(r) == 150
        await drain(r)
        assert {(await status(r, k))["status"] for k in first} == {"executed"}

        # A hold set and lifted later, between whole passes, is seen too.
        monkeypatch.setattr(holds, "STALE_S", 0.0)
        monkeypatch.setattr(holds, "FULL_PASS_S", 3600.0)
        await holds.set_hold(r, "安徽省", "flood")
        (anhui,) = await accept(r, to("安徽省"))
        await drain(r)
        assert await sweeper.sweep(r) == 0 and (await status(r, anhui))["status"] == "held"
        await r.client.hdel(HOLDS_KEY, "安徽省")
        assert await sweeper.sweep(r) == 1
    finally:
        await r.close()
