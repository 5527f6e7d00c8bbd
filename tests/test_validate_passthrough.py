"""ORDERQ_RULES=off: the pass-through validator (priority only), as benchmarks compare against."""

from __future__ import annotations

import httpx

from orderq import client as oq_client
from tests.conftest import auth, drain, make_order, unique


async def test_rules_off_validates_everything_and_still_classifies_priority(ingress, flushed, settings_for):
    base = await ingress()
    r = await oq_client.connect(settings_for(ORDERQ_RULES="off", ORDERQ_UNKNOWN_SKU="reject", ORDERQ_DUP_WINDOW_S=180))
    cust = {"id": unique("c"), "tier": "regular", "phone": "17012345678"}
    first = make_order(unique(), customer=cust, lines=[{"sku": "NO-STOCK-RECORD", "qty": 3}])
    second = make_order(unique(), customer=cust)
    vip = make_order(unique(), customer={"id": unique("v"), "tier": "vip"})
    async with httpx.AsyncClient(base_url=base, headers=auth()) as c:
        for o in (first, second, vip):
            assert (await c.post("/v1/orders", json=o)).status_code == 202
        await drain(r)
        recs = [(await c.get(f"/v1/orders/tmall/{o['order_id']}")).json() for o in (first, second, vip)]
    await r.close()
    # with rules on, the unknown SKU would be rejected and the same-recipient twin sent to review
    assert [x["status"] for x in recs] == ["executed"] * 3
    assert [x["priority"] for x in recs] == ["new", "regular", "vip"]
    assert all(x["reasons"] == [] for x in recs)
