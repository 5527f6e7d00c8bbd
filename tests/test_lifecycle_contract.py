"""The life after execution through the contract only (§4, §5): real ingress, validate, execute
and dispatch processes, HTTP in and out, no look inside Redis. An order is executed, shipped by
the carrier's word (a later, less trusted word does not move it back, and both are listed),
its tracking number reaches the platform once however often the event comes, it is delivered,
too late to cancel, returned, and its stock is sellable again."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import httpx

from tests.conftest import ADMIN, auth, make_order, unique
from tests.test_dispatch import Sink, until

SOURCE_TOKENS = {s: f"tok-contract-{s}-{'q' * 12}" for s in ("carrier", "wms", "erp", "channel")}


def source(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SOURCE_TOKENS[name]}"}


async def status_of(c: httpx.AsyncClient, path: str, want: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        resp = await c.get(path, headers=auth())
        if resp.status_code == 200 and resp.json()["status"] == want:
            doc: dict[str, Any] = resp.json()
            return doc
        assert time.monotonic() < deadline, f"{path} never became {want}: {resp.text}"
        await asyncio.sleep(0.05)


async def test_shipment_trust_ship_sync_and_return_through_the_contract(ingress, stages):
    sink = await Sink().start()
    env = {
        "ORDERQ_SOURCE_TOKENS": ",".join(f"{s}={t}" for s, t in SOURCE_TOKENS.items()),
        "ORDERQ_WEBHOOK_CHANNEL_SHIP_SYNC": sink.url + "/ship-sync",
    }
    try:
        base = await ingress(**env)
        for stage in ("validate", "execute", "dispatch"):
            stages(stage, **env)
        sku = unique("CT-")
        async with httpx.AsyncClient(base_url=base, timeout=10) as c:
            put = await c.put("/v1/admin/stock", json={"items": [{"sku": sku, "physical": 20}]}, headers=ADMIN)
            assert put.status_code == 200
            before = (await c.get(f"/v1/admin/stock/{sku}", headers=ADMIN)).json()["sellable"]
            o = make_order(unique("K"), lines=[{"sku": sku, "qty": 3, "unit_price": "5.00"}], paid_amount="15.00")
            assert (await c.post("/v1/orders", json=o, headers=auth())).status_code == 202
            path = f"/v1/orders/tmall/{o['order_id']}"
            await status_of(c, path, "executed")
            events = path + "/events"

            # refusals first: nothing of them is applied
            ship = {"source": "carrier", "status": "shipped", "carrier": "SF", "tracking_no": "SF42", "warehouse": "SH"}
            assert (await c.post(events, json=ship)).status_code == 401
            assert (await c.post(events, json=ship, headers=source("wms"))).status_code == 403
            assert (await c.post(events, json=ship, headers=auth("jd"))).status_code == 403
            bad = await c.post(events, json={**ship, "status": "lost"}, headers=source("carrier"))
            assert bad.status_code == 422 and [d["path"] for d in bad.json()["error"]["details"]] == ["status"]
            unknown = await c.post(f"/v1/orders/tmall/{unique('NO')}/events", json=ship, headers=source("carrier"))
            assert unknown.status_code == 404
            assert (await c.get(path, headers=auth())).json()["status"] == "executed"

            for _ in range(3):  # the carrier retries its webhook
                assert (await c.post(events, json=ship, headers=source("carrier"))).status_code == 202
            late = await c.post(events, json={"source": "wms", "status": "packed"}, headers=source("wms"))
            assert late.status_code == 202
            rec = await status_of(c, path, "shipped")
            assert rec["shipments"][0]["tracking_no"] == "SF42" and rec["shipments"][0]["carrier"] == "SF"
            assert set(rec["sources"]) == {"carrier", "wms"}
            assert {(x["kept"]["source"], x["other"]["source"]) for x in rec["conflicts"]} == {("carrier", "wms")}

            await until(lambda: sink.delivered(), "the tracking number reached the platform")
            await asyncio.sleep(0.5)  # a duplicate would arrive now
            assert sink.delivered() == Counter({f"tmall:{o['order_id']}:channel.ship_sync": 1})
            assert sink.requests[0]["body"]["shipment"]["tracking_no"] == "SF42"

            delivered = {"source": "carrier", "status": "delivered", "tracking_no": "SF42"}
            assert (await c.post(events, json=delivered, headers=source("carrier"))).status_code == 202
            back = await c.post(events, json={"source": "channel", "status": "shipped"}, headers=source("channel"))
            assert back.json()["status"] == "delivered"  # the channel's word never moves it back
            cancel = await c.post(path + "/cancel", json={"reason": "buyer_cancelled"}, headers=auth())
            assert cancel.status_code == 409 and cancel.json()["error"]["code"] == "too_late"

            asked = {"source": "channel", "status": "return_requested"}
            assert (await c.post(events, json=asked, headers=source("channel"))).status_code == 202
            for _ in range(2):
                returned = await c.post(events, json={"source": "wms", "status": "returned"}, headers=source("wms"))
                assert returned.status_code == 202
            rec = await status_of(c, path, "returned")
            assert [e["status"] for e in rec["timeline"]] == [
                "shipped",
                "packed",
                "delivered",
                "shipped",
                "return_requested",
                "returned",
            ]
            after = (await c.get(f"/v1/admin/stock/{sku}", headers=ADMIN)).json()["sellable"]
            assert after == before
    finally:
        await sink.stop()
