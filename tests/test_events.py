"""Order events from the systems downstream (contract §5) on a real ingress and Valkey: the
public status follows the most trusted source that has spoken and a less trusted one never moves
it back, disagreements are kept, a shipment fires channel.ship_sync and the shipped SMS once each
in effect (delivered once to a local HTTP downstream however often the event is replayed), a
return gives its units back to stock once (also after a crash between its two steps), and the
endpoint's refusals."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import pytest

from dispatch.worker import Dispatcher
from orderq import client as oq_client
from orderq import lifecycle
from orderq.lifecycle import OrderEvent
from tests.conftest import ADMIN, auth, drain, make_order, unique
from tests.test_dispatch import Sink, running, until

SOURCE_TOKENS = {s: f"tok-src-{s}-{'z' * 16}" for s in ("carrier", "wms", "erp", "channel")}
SOURCES_ENV = ",".join(f"{s}={t}" for s, t in SOURCE_TOKENS.items())


def source(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SOURCE_TOKENS[name]}"}


async def executed(c: httpx.AsyncClient, r: oq_client.Redis, **over: Any) -> str:
    """A new order through the ingress, validated and executed; its key."""
    o = make_order(unique("E"), **over)
    assert (await c.post("/v1/orders", json=o, headers=auth())).status_code == 202
    await drain(r)
    key = f"tmall:{o['order_id']}"
    assert (await record(c, key))["status"] == "executed"
    return key


async def record(c: httpx.AsyncClient, key: str) -> dict[str, Any]:
    resp = await c.get("/v1/orders/" + key.replace(":", "/", 1), headers=ADMIN)
    assert resp.status_code == 200, resp.text
    doc: dict[str, Any] = resp.json()
    return doc


async def event(c: httpx.AsyncClient, key: str, src: str, status: str, **body: Any) -> dict[str, Any]:
    resp = await c.post(
        "/v1/orders/" + key.replace(":", "/", 1) + "/events",
        json={"source": src, "status": status, **body},
        headers=source(src),
    )
    assert resp.status_code == 202, resp.text
    doc: dict[str, Any] = resp.json()
    return doc


async def sellable(c: httpx.AsyncClient, sku: str) -> int:
    return int((await c.get(f"/v1/admin/stock/{sku}", headers=ADMIN)).json()["sellable"])


async def test_the_public_status_follows_the_most_trusted_source(ingress, r):
    base = await ingress(ORDERQ_SOURCE_TOKENS=SOURCES_ENV)
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        key = await executed(c, r)
        ship = {"carrier": "SF", "tracking_no": "SF100", "warehouse": "SH", "at": "2026-11-12T10:00:00+08:00"}
        assert (await event(c, key, "carrier", "shipped", **ship))["status"] == "shipped"
        # the warehouse's later "packed" does not move the carrier's word back: a conflict
        late = await event(c, key, "wms", "packed", at="2026-11-12T11:00:00+08:00")
        assert late == {"order_key": key, "status": "shipped", "duplicate": False}
        rec = await record(c, key)
        assert rec["status"] == "shipped"
        assert rec["shipments"] == [
            {"warehouse": "SH", "carrier": "SF", "tracking_no": "SF100", "at": "2026-11-12T02:00:00.000000Z"}
        ]
        assert rec["sources"] == {
            "carrier": {"status": "shipped", "at": "2026-11-12T02:00:00.000000Z"},
            "wms": {"status": "packed", "at": "2026-11-12T03:00:00.000000Z"},
        }
        assert [(x["kept"], x["other"]) for x in rec["conflicts"]] == [
            ({"source": "carrier", "status": "shipped"}, {"source": "wms", "status": "packed"})
        ]
        assert "shipped" in rec["times"]
        assert [e["status"] for e in rec["timeline"]] == ["shipped", "packed"]

        assert (await event(c, key, "carrier", "delivered", tracking_no="SF100"))["status"] == "delivered"
        # a channel's word never moves it back
        assert (await event(c, key, "channel", "shipped"))["status"] == "delivered"
        rec = await record(c, key)
        assert rec["status"] == "delivered"
        assert rec["conflicts"][-1]["kept"] == {"source": "carrier", "status": "delivered"}
        assert rec["conflicts"][-1]["other"] == {"source": "channel", "status": "shipped"}
        assert rec["sources"]["channel"]["status"] == "shipped"
        assert len(rec["shipments"]) == 1  # the same parcel

        # a more trusted source corrects a less trusted one; the overridden word is kept
        key2 = await executed(c, r)
        assert (await event(c, key2, "erp", "delivered"))["status"] == "delivered"
        assert (await event(c, key2, "carrier", "shipped", tracking_no="YT9"))["status"] == "shipped"
        rec = await record(c, key2)
        assert rec["conflicts"][-1]["kept"] == {"source": "carrier", "status": "shipped"}
        assert rec["conflicts"][-1]["other"] == {"source": "erp", "status": "delivered"}


async def test_an_event_replayed_changes_nothing(ingress, r):
    base = await ingress(ORDERQ_SOURCE_TOKENS=SOURCES_ENV)
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        key = await executed(c, r)
        first = await event(c, key, "wms", "shipped", tracking_no="JD1", carrier="JD")
        before = await record(c, key)
        for _ in range(3):
            again = await event(c, key, "wms", "shipped", tracking_no="JD1", carrier="JD")
            assert again == {**first, "duplicate": True}
        assert await record(c, key) == before
        # the admin token may report for any source
        resp = await c.post(
            "/v1/orders/" + key.replace(":", "/", 1) + "/events",
            json={"source": "carrier", "status": "delivered", "tracking_no": "JD1"},
            headers=ADMIN,
        )
        assert resp.status_code == 202 and resp.json()["status"] == "delivered"
        ttl = await r.client.ttl(r.partition_of(key).status(key))
        assert 0 < ttl <= r.settings.status_ttl_s  # delivered is final: its TTL runs


async def test_a_shipment_reaches_the_platform_and_the_buyer_once(ingress, r, settings_for):
    sink = await Sink().start()
    hooks = {
        "ORDERQ_WEBHOOK_CHANNEL_SHIP_SYNC": sink.url + "/ship-sync",
        "ORDERQ_WEBHOOK_NOTIFY_SMS": sink.url + "/sms",
    }
    try:
        base = await ingress(ORDERQ_SOURCE_TOKENS=SOURCES_ENV, **hooks)
        async with httpx.AsyncClient(base_url=base, timeout=10) as c:
            key = await executed(c, r)
            for src in ("wms", "wms", "carrier", "carrier"):  # replays, and a second source's word
                await event(c, key, src, "shipped", carrier="SF", tracking_no="SF777", warehouse="SH")
            await event(c, key, "carrier", "delivered", tracking_no="SF777")
            conn = await oq_client.connect(settings_for(**hooks))
            d = Dispatcher(conn, consumer="test-events")
            async with running(d):
                want = {f"{key}:channel.ship_sync", f"{key}:notify.sms", f"{key}:notify.sms:shipped"}
                await until(lambda: set(sink.delivered()) >= want, "ship sync and both SMS delivered")
                await until(lambda: d.delivered >= 3, "settled")
            await conn.close()
            assert sink.delivered() == Counter(dict.fromkeys(want, 1))
            sync = next(q for q in sink.requests if q["path"] == "/ship-sync")["body"]
            assert sync["action"] == "channel.ship_sync" and sync["order_key"] == key
            assert sync["shipment"] == {
                "warehouse": "SH",
                "carrier": "SF",
                "tracking_no": "SF777",
                "at": sync["shipment"]["at"],
            }
            assert sync["order"]["order_id"] == key.split(":", 1)[1]
            sms = [q["body"] for q in sink.requests if q["key"] == f"{key}:notify.sms:shipped"]
            assert sms[0]["kind"] == "shipped" and sms[0]["shipment"]["tracking_no"] == "SF777"
            rec = await record(c, key)
            names = {(a["name"], a.get("kind")): a["state"] for a in rec["actions"]}
            assert names[("channel.ship_sync", None)] == "done"
            assert names[("notify.sms", "shipped")] == "done"
            applied = await r.client.hgetall(r.partition_of(key).status(key))
            assert applied[b"xn:channel.ship_sync"] == b"1" and applied[b"xn:notify.sms:shipped"] == b"1"
    finally:
        await sink.stop()


async def test_a_return_puts_the_units_back_once(ingress, r):
    base = await ingress(ORDERQ_SOURCE_TOKENS=SOURCES_ENV)
    sku = unique("RET-")
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        assert (
            await c.put("/v1/admin/stock", json={"items": [{"sku": sku, "physical": 10}]}, headers=ADMIN)
        ).is_success
        start = await sellable(c, sku)
        lines = [{"sku": sku, "qty": 2, "unit_price": "10.00"}]
        key = await executed(c, r, lines=lines, paid_amount="20.00")
        assert await sellable(c, sku) == start - 2
        await event(c, key, "carrier", "shipped", tracking_no="R1")
        await event(c, key, "carrier", "delivered", tracking_no="R1")
        assert (await event(c, key, "channel", "return_requested"))["status"] == "return_requested"
        assert (await event(c, key, "wms", "returned"))["status"] == "returned"
        assert await sellable(c, sku) == start
        await event(c, key, "wms", "returned")  # a replay
        await event(c, key, "carrier", "returned", tracking_no="R1")  # the same return, another word
        assert await sellable(c, sku) == start
        rec = await record(c, key)
        assert [e["status"] for e in rec["timeline"]] == [
            "shipped",
            "delivered",
            "return_requested",
            "returned",
            "returned",
        ]
        assert {"shipped", "delivered", "return_requested", "returned"} <= set(rec["times"])

        # a count after the shipment settled the reservation: the units go back into the count
        key2 = await executed(c, r, lines=lines, paid_amount="20.00")
        assert (await c.put("/v1/admin/stock", json={"items": [{"sku": sku, "physical": 8}]}, headers=ADMIN)).is_success
        after_count = await sellable(c, sku)
        await event(c, key2, "wms", "returned")
        doc = (await c.get(f"/v1/admin/stock/{sku}", headers=ADMIN)).json()
        assert doc["physical"] == 10 and doc["sellable"] > after_count


async def test_a_return_cut_short_between_its_two_steps_is_completed_once(r, monkeypatch):
    from tests.test_validate_rules import accept

    sku = unique("RC-")
    await r.client.hset(f"oq:{{ledger}}:sku:{sku}", mapping={"p": 10, "r": 0})
    o = make_order(unique("C"), lines=[{"sku": sku, "qty": 3, "unit_price": "1.00"}], paid_amount="3.00")
    (key,) = await accept(r, o)
    await drain(r)
    stock_key = f"oq:{{ledger}}:sku:{sku}"
    assert int(await r.client.hget(stock_key, "r")) == 3

    async def crash(*args: Any, **kw: Any) -> int:
        raise ConnectionError("process died here")

    monkeypatch.setattr(lifecycle, "settle_returns", crash)
    with pytest.raises(ConnectionError):
        await lifecycle.apply_event(r, key, OrderEvent(source="wms", status="returned"))
    monkeypatch.undo()
    assert int(await r.client.hget(stock_key, "r")) == 3  # owed, not given back yet
    await lifecycle.OwedSweep().maybe(r)  # a worker's periodic sweep completes it
    assert int(await r.client.hget(stock_key, "r")) == 0
    assert await lifecycle.settle_all_returns(r) == 0
    # the marker makes a second settle of the same return give nothing back
    p = r.partition_of(key)
    await r.client.hset(lifecycle.returns_owed_key(p), key, f"{sku}\t3\tdefault")
    assert await lifecycle.settle_all_returns(r) == 1
    assert await r.client.hmget(stock_key, ["p", "r"]) == [b"10", b"0"]


@pytest.mark.parametrize(
    ("body", "paths"),
    [
        ({"source": "pigeon", "status": "shipped"}, ["source"]),
        ({"source": "wms", "status": "teleported", "at": "yesterday"}, ["status", "at"]),
        ({"status": "shipped"}, ["source"]),
        ({"source": "wms", "status": "shipped", "at": "2026-11-12T10:00:00"}, ["at"]),
        ({"source": "wms", "status": "shipped", "tracking_no": 7}, ["tracking_no"]),
        ([1, 2], ["$"]),
    ],
)
async def test_a_bad_event_is_422_with_every_path(ingress, r, body, paths):
    base = await ingress(ORDERQ_SOURCE_TOKENS=SOURCES_ENV)
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        resp = await c.post("/v1/orders/tmall/X1/events", json=body, headers=ADMIN)
        assert resp.status_code == 422, resp.text
        err = resp.json()["error"]
        assert sorted(d["path"] for d in err["details"]) == sorted(paths)


async def test_who_may_report_and_unknown_orders(ingress, r):
    base = await ingress(ORDERQ_SOURCE_TOKENS=SOURCES_ENV)
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        key = await executed(c, r)
        path = "/v1/orders/" + key.replace(":", "/", 1) + "/events"
        body = {"source": "carrier", "status": "shipped", "tracking_no": "A1"}
        assert (await c.post(path, json=body)).status_code == 401
        assert (await c.post(path, json=body, headers={"Authorization": "Bearer nope"})).status_code == 401
        assert (await c.post(path, json=body, headers=source("wms"))).status_code == 403  # another source's word
        assert (await c.post(path, json=body, headers=auth())).status_code == 403  # a channel token
        assert (await c.post(path, json=body, headers=source("carrier"))).status_code == 202
        assert (await c.post("/v1/orders/tmall/NOPE/events", json=body, headers=ADMIN)).status_code == 404
        assert (await c.post("/v1/orders/nochannel/X/events", json=body, headers=ADMIN)).status_code == 404
        bad = await c.post(path, content=b"{", headers={**ADMIN, "Content-Type": "application/json"})
        assert bad.status_code == 400
        assert (await c.post(path, content=b"{}", headers={**ADMIN, "Content-Type": "text/plain"})).status_code == 415
        assert (await record(c, key))["status"] == "shipped"


async def test_events_before_execution_are_kept_and_move_nothing(ingress, r):
    from tests.test_validate_rules import accept

    base = await ingress(ORDERQ_SOURCE_TOKENS=SOURCES_ENV)
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        (key,) = await accept(r, make_order(unique("B")))
        assert (await event(c, key, "wms", "packed"))["status"] == "accepted"
        await drain(r)
        rec = await record(c, key)
        assert rec["status"] == "executed"
        assert rec["sources"] == {"wms": {"status": "packed", "at": rec["sources"]["wms"]["at"]}}


async def test_ship_lag_fires_for_an_executed_order_without_shipment_and_clears(ingress, r, settings_for):
    from breaker.alerts import Alerts

    base = await ingress(ORDERQ_SOURCE_TOKENS=SOURCES_ENV)
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        key = await executed(c, r)
        key2 = await executed(c, r)
        conn = await oq_client.connect(settings_for(ORDERQ_ALERT_SHIP_LAG_S=60))
        alerts = Alerts(conn)
        try:
            import time

            assert [e["kind"] for e in await alerts.tick(time.time())] == []  # not late yet
            fired = await alerts.tick(time.time() + 120)
            assert [(e["event"], e["kind"], e["orders"]) for e in fired] == [("alert.fired", "ship_lag", 2)]
            await event(c, key, "carrier", "shipped", tracking_no="L1")
            assert await alerts.tick(time.time() + 120) == []  # still one late: still active
            cancel = await c.post(
                "/v1/orders/" + key2.replace(":", "/", 1) + "/cancel", json={"reason": "refund"}, headers=auth()
            )
            assert cancel.status_code == 202  # intercepting: no longer waits for a shipment
            cleared = await alerts.tick(time.time() + 120)
            assert [(e["event"], e["kind"]) for e in cleared] == [("alert.cleared", "ship_lag")]
        finally:
            await alerts.close()
            await conn.close()


async def test_a_routed_return_goes_back_to_the_warehouses_that_shipped_it(flushed, settings_for):
    from orderq import warehouses
    from orderq.ledger import stock
    from tests.test_routing import GUANGZHOU, SHANGHAI, SUZHOU, order
    from tests.test_validate_rules import RULES_ON, line, run

    rr = await oq_client.connect(settings_for(**RULES_ON))
    try:
        await warehouses.put(rr, [SHANGHAI, GUANGZHOU])
        await stock.set_stock(rr, [("LAMP", 5, "SH"), ("DESK", 5, "GZ")])
        o = order(ship_to=SUZHOU, lines=[line("LAMP", 1, "900.00", "900.00"), line("DESK", 2, "950.00", "950.00")])
        (st,) = await run(rr, o)
        assert st["status"] == "executed" and len(st["route"]) == 2, st
        # Shanghai counts again after its parcel left (its allocation settled); Guangzhou not yet
        await stock.set_stock(rr, [("LAMP", 4, "SH")])
        key = st["order_key"]
        for _ in range(2):  # the second is a replay: nothing more comes back
            await lifecycle.apply_event(rr, key, OrderEvent(source="wms", status="returned"))
            lamp, desk = await stock.get_stock(rr, "LAMP"), await stock.get_stock(rr, "DESK")
            assert lamp is not None and desk is not None
            assert lamp["warehouses"]["SH"] == {"physical": 5, "allocated": 0} and lamp["reserved"] == 0
            assert desk["warehouses"]["GZ"] == {"physical": 5, "allocated": 0} and desk["reserved"] == 0
    finally:
        await rr.close()


async def test_operators_see_shipments_returns_and_conflicts_in_metrics(r):
    from orderq import metrics
    from tests.test_validate_rules import accept

    (key,) = await accept(r, make_order(unique("M")))
    await drain(r)
    for src, status in (("carrier", "shipped"), ("wms", "packed"), ("carrier", "delivered"), ("wms", "returned")):
        await lifecycle.apply_event(r, key, OrderEvent(source=src, status=status, tracking_no="M1"))  # type: ignore[arg-type]
    text = (await metrics.render(r)).decode()
    for line in (
        'orderq_lifecycle_total{state="shipped"} 1.0',
        'orderq_lifecycle_total{state="delivered"} 1.0',
        'orderq_lifecycle_total{state="returned"} 1.0',
        "orderq_order_events_total 4.0",
        "orderq_source_conflicts_total 1.0",
        "orderq_intercepts_in_flight 0.0",
        'orderq_alerts_total{kind="ship_lag"} 0.0',
    ):
        assert line in text, line


async def test_the_warehouse_answer_ends_an_interception(ingress, r):
    base = await ingress(ORDERQ_SOURCE_TOKENS=SOURCES_ENV)
    sku = unique("INT-")
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        assert (
            await c.put("/v1/admin/stock", json={"items": [{"sku": sku, "physical": 10}]}, headers=ADMIN)
        ).is_success
        start = await sellable(c, sku)
        lines = [{"sku": sku, "qty": 2, "unit_price": "10.00"}]
        stopped = await executed(c, r, lines=lines, paid_amount="20.00")
        missed = await executed(c, r, lines=lines, paid_amount="20.00")
        for key in (stopped, missed):
            cancel = await c.post(
                "/v1/orders/" + key.replace(":", "/", 1) + "/cancel", json={"reason": "refund"}, headers=auth()
            )
            assert cancel.status_code == 202 and cancel.json()["status"] == "intercepting"
        assert await sellable(c, sku) == start - 4

        # the parcel was stopped: cancelled, its stock released once (a replay changes nothing)
        for _ in range(2):
            assert (await event(c, stopped, "wms", "intercepted"))["status"] == "cancelled"
        rec = await record(c, stopped)
        assert rec["cancel"]["outcome"] == "cancelled" and rec["cancel"]["reason"] == "refund"
        assert await sellable(c, sku) == start - 2
        assert await r.client.ttl(r.partition_of(stopped).status(stopped)) > 0  # final: its TTL runs
        assert not any(a["name"] == "channel.ship_sync" for a in rec["actions"])

        # too late: the parcel had left; shipped, and the platform hears of it
        shipped = await event(c, missed, "wms", "intercept_failed", carrier="SF", tracking_no="SF9")
        assert shipped["status"] == "shipped"
        rec = await record(c, missed)
        assert rec["cancel"]["outcome"] == "intercept_failed"
        assert {(a["name"], a.get("kind")) for a in rec["actions"]} >= {
            ("channel.ship_sync", None),
            ("notify.sms", "shipped"),
        }
        assert rec["shipments"][0]["tracking_no"] == "SF9"
        assert await sellable(c, sku) == start - 2  # its goods are with the buyer
        assert await r.client.ttl(r.partition_of(missed).status(missed)) > 0
