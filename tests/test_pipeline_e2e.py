"""The whole pipeline against a real private Valkey: orders in -> executed once each."""

from __future__ import annotations

import httpx

from orderq import audit, keys
from tests.conftest import auth, drain, make_order


async def test_thousand_orders_all_executed_once(ingress, r):
    base = await ingress()
    orders = [
        make_order(
            i, remark="周末送货" if i % 3 == 0 else None, gifts=[{"sku": "GIFT-1", "qty": 1}] if i % 5 == 0 else []
        )
        for i in range(1000)
    ]
    for o in orders:
        if o["remark"] is None:
            del o["remark"]
    async with httpx.AsyncClient(base_url=base, headers=auth()) as c:
        for i in range(0, 1000, 250):
            resp = await c.post("/v1/orders/batch", json={"orders": orders[i : i + 250]})
            assert resp.status_code == 202, resp.text
            assert resp.json()["accepted"] == 250
        await drain(r)
        for i in (0, 3, 5, 999):
            rec = (await c.get(f"/v1/orders/tmall/T{i}")).json()
            assert rec["status"] == "executed"
            names = [a["name"] for a in rec["actions"]]
            assert names[:3] == ["wms.pick", "notify.sms", "invoice.request"]
            assert ("crm.remark_sync" in names) == (i % 3 == 0)
            assert ("crm.gift_sync" in names) == (i % 5 == 0)
            assert all(a["state"] == "done" for a in rec["actions"])
            assert rec["fulfilment_id"].startswith("F-")
    report = await audit.run(r)
    assert report["accepted"] == 1000
    assert report["executed"] == 1000
    assert report["lost"] == 0 and report["duplicate_effects"] == 0
    n_pick = sum([await r.client.xlen(p.outbox("wms.pick")) for p in r.partitions])
    assert n_pick == 1000
    n_remark = sum([await r.client.xlen(p.outbox("crm.remark_sync")) for p in r.partitions])
    assert n_remark == len([i for i in range(1000) if i % 3 == 0])
    # processed entries are gone: memory follows the backlog
    for p in r.partitions:
        assert await r.client.xlen(p.intake) == 0
        for lane in p.lanes:
            assert await r.client.xlen(lane) == 0
    assert keys.ACTIONS[0] == "wms.pick"
