"""/metrics for operators beyond the contract's families, on a real ingress and a real Valkey:
orders per channel summed over every process that takes them, the dispatch targets' circuits,
the pull connectors, and orderq's own connector-lag alert."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import msgspec

from breaker.alerts import Alerts
from connect.state import ConnectorState, Lease
from dispatch.circuit import OPEN
from dispatch.worker import Dispatcher
from ingress import bodies
from orderq import client as oq_client
from orderq import keys, metrics
from orderq.client import Redis
from orderq.intake import Intake, Outcome
from orderq.schema import order_decoder
from orderq.server import free_port
from tests.conftest import ADMIN, ADMIN_TOKEN, ROOT, auth, drain, make_order, unique


def value(text: str, series: str) -> float | None:
    m = re.search(rf"^{re.escape(series)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


async def scrape_until(base: str, cond: Callable[[str], bool], what: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        while True:
            text = (await c.get("/metrics")).text
            if cond(text):
                return text
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{text}"
            await asyncio.sleep(0.1)


def channel(name: str, outcome: str) -> str:
    return f'orderq_channel_orders_total{{channel="{name}",outcome="{outcome}"}}'


async def test_orders_per_channel_are_summed_over_every_process(ingress, settings_for) -> None:
    metrics.CHANNEL_ORDERS.counts = {}  # counted in this test process by earlier tests: not for this one
    base = await ingress()
    jd = [make_order(unique(), channel="jd") for _ in range(3)]
    tmall = [make_order(unique()) for _ in range(3)]
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        for o in jd:
            assert (await c.post("/v1/orders", json=o, headers=auth("jd"))).status_code == 202
        assert (await c.post("/v1/orders", json=jd[0], headers=auth("jd"))).status_code == 200
        assert (await c.post("/v1/orders", json=tmall[2], headers=auth())).status_code == 202
        # a batch: two new, one already known, one repeated within the batch
        batch = [*tmall, tmall[0]]
        doc = (await c.post("/v1/orders/batch", json={"orders": batch}, headers=auth())).json()
        assert (doc["accepted"], doc["duplicates"]) == (2, 2), doc
    # another process taking orders (a connector, `orderq import`): its own counts, flushed on close
    intake = await Intake.open(settings_for())
    try:
        pdd = [order_decoder.decode(json.dumps(make_order(unique(), channel="pdd")).encode())]
        assert await intake.submit(pdd * 2) == [Outcome.ACCEPTED, Outcome.DUPLICATE]
    finally:
        await intake.close()
    want = {
        channel("jd", "accepted"): 3,
        channel("jd", "duplicate"): 1,
        channel("tmall", "accepted"): 3,
        channel("tmall", "duplicate"): 2,
        channel("pdd", "accepted"): 1,
        channel("pdd", "duplicate"): 1,
        channel("jd", "shed"): 0,
        channel("kuaishou", "accepted"): 0,  # every configured channel is listed, counted or not
    }
    text = await scrape_until(
        base, lambda t: all(value(t, s) == n for s, n in want.items()), "the ingress's counts flushed (1 s)"
    )
    assert value(text, "orderq_accepted_total") == 7  # the global counters agree
    assert value(text, "orderq_duplicates_total") == 4


async def test_dispatch_circuits_are_published(ingress, r: Redis, settings_for) -> None:
    base = await ingress()
    async with httpx.AsyncClient(base_url=base, headers=auth(), timeout=10) as c:
        orders = [make_order(unique()) for _ in range(4)]
        assert (await c.post("/v1/orders/batch", json={"orders": orders})).json()["accepted"] == 4
    await drain(r)
    down = f"http://127.0.0.1:{free_port()}/wms"  # nothing listens: connections are refused
    settings = settings_for(
        ORDERQ_WEBHOOK_WMS_PICK=down,
        ORDERQ_DISPATCH_FAILURES=2,
        ORDERQ_DISPATCH_OPEN_S=30,  # stays open for the whole test
        ORDERQ_DISPATCH_BACKOFF_S=0.01,
        ORDERQ_MAX_DELIVERIES=100,
    )
    conn = await oq_client.connect(settings)
    d = Dispatcher(conn, consumer="test-circuits")
    task = asyncio.create_task(d.run())
    try:
        text = await scrape_until(
            base,
            lambda t: value(t, 'orderq_dispatch_circuit_state{action="wms.pick"}') == 2,
            "the open WMS circuit in /metrics",
        )
        assert d.targets["wms.pick"].circuit.state == OPEN
        assert value(text, 'orderq_dispatch_circuit_opens_total{action="wms.pick"}') == 1
        fields = await r.client.hkeys(keys.CIRCUITS_KEY)
        assert fields == [b"wms.pick|test-circuits"]
    finally:
        d.stop()
        await task
        await d.close()
        await conn.close()
    # a dispatcher that stopped takes its circuits with it; the opens stay counted
    text = await scrape_until(
        base, lambda t: "orderq_dispatch_circuit_state{" not in t, "the stopped dispatcher's circuit gone"
    )
    assert value(text, 'orderq_dispatch_circuit_opens_total{action="wms.pick"}') == 1
    assert await r.client.hkeys(keys.CIRCUITS_KEY) == []


async def write_connector(client: Any, name: str, cursor_ms: int | None, error: str | None = None) -> None:
    """A connector's state as the connect process writes it (connect/state.py)."""
    state = ConnectorState(client, name)
    await state.register("jd", "flagship", "jd")
    if cursor_ms is not None:
        lease = Lease(client, state.lease_key, 10)
        assert await lease.take()
        assert await state.advance(lease, cursor_ms)
        await lease.release()
    await state.count(windows=3, accepted=40, duplicate=2, invalid=1)
    if error is not None:
        await state.error(error)


async def test_connectors_in_metrics_and_the_connector_lag_alert(ingress, r: Redis, settings_for) -> None:
    base = await ingress()
    now_ms = int(time.time() * 1000)
    await write_connector(r.client, "jd-main", now_ms - 30_000)
    await write_connector(r.client, "jd-late", now_ms - 7_200_000, error="HTTP 503 from the platform")
    await write_connector(r.client, "jd-new", None, error="签名错误")  # never read a window: no lag yet
    text = await scrape_until(
        base, lambda t: 'orderq_connector_failing{connector="jd-new"}' in t, "the connectors in /metrics"
    )
    lag = value(text, 'orderq_connector_lag_seconds{connector="jd-main"}')
    assert lag is not None and 30 <= lag < 60
    late = value(text, 'orderq_connector_lag_seconds{connector="jd-late"}')
    assert late is not None and late >= 7200
    assert 'orderq_connector_lag_seconds{connector="jd-new"}' not in text
    assert value(text, 'orderq_connector_orders_total{connector="jd-main",outcome="accepted"}') == 40
    assert value(text, 'orderq_connector_orders_total{connector="jd-main",outcome="duplicate"}') == 2
    assert value(text, 'orderq_connector_orders_total{connector="jd-main",outcome="invalid"}') == 1
    assert value(text, 'orderq_connector_errors_total{connector="jd-late"}') == 1
    assert value(text, 'orderq_connector_errors_total{connector="jd-main"}') == 0
    success = value(text, 'orderq_connector_last_success_timestamp_seconds{connector="jd-main"}')
    assert success is not None and abs(success - time.time()) < 30
    assert 'orderq_connector_last_success_timestamp_seconds{connector="jd-new"}' not in text
    assert value(text, 'orderq_connector_failing{connector="jd-late"}') == 1
    assert value(text, 'orderq_connector_failing{connector="jd-main"}') == 0

    # the dashboard's data carries them too (its connectors card), in the documented shape
    async with httpx.AsyncClient(base_url=base, headers=ADMIN, timeout=10) as c:
        doc = (await c.get("/dashboard/data")).json()
    msgspec.convert(doc, bodies.DashboardData)
    cards = {v["name"]: v for v in doc["connectors"]}
    assert sorted(cards) == ["jd-late", "jd-main", "jd-new"]
    assert cards["jd-late"]["failing"] and cards["jd-main"]["counts"]["accepted"] == 40

    # orderq's own alert: the connector an hour behind, only it, once; cleared once it catches up
    conn = await oq_client.connect(settings_for(ORDERQ_ALERT_CONNECTOR_LAG_S=3600))
    try:
        alerts = Alerts(conn)
        events = [e for e in await alerts.tick() if e["kind"] == "connector_lag"]
        assert [(e["event"], e["alert"], e["connector"]) for e in events] == [
            ("alert.fired", "connector_lag:jd-late", "jd-late")
        ]
        assert "HTTP 503" in events[0]["text"] and events[0]["threshold_s"] == 3600
        assert [e for e in await alerts.tick() if e["kind"] == "connector_lag"] == []  # fired once
        await write_connector(r.client, "jd-late", int(time.time() * 1000))
        events = [e for e in await alerts.tick() if e["kind"] == "connector_lag"]
        assert [(e["event"], e["alert"]) for e in events] == [("alert.cleared", "connector_lag:jd-late")]
        await alerts.close()
    finally:
        await conn.close()
    assert settings_for().alert_connector_lag_s == 1800


async def test_the_dashboard_shows_the_connectors(ingress, r: Redis, browser) -> None:
    base = await ingress()
    now_ms = int(time.time() * 1000)
    await write_connector(r.client, "jd-main", now_ms - 300_000)
    await write_connector(r.client, "jd-late", now_ms - 7_200_000, error="HTTP 503 from the platform")
    page = await browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    await page.goto(f"{base}/dashboard?token={ADMIN_TOKEN}")
    rows = page.locator("#connectors tr")
    deadline = time.monotonic() + 20
    while await rows.count() != 2:
        assert time.monotonic() < deadline, await page.locator("#connectors").inner_text()
        await asyncio.sleep(0.1)
    late, main = [await rows.nth(i).inner_text() for i in range(2)]
    assert "jd-late" in late and "2.0 h" in late and "HTTP 503 from the platform" in late
    assert "jd-main" in main and "5 min" in main and "40" in main and "ok" in main
    assert problems == []


def test_the_prometheus_connector_lag_bound_is_orderqs_default(settings_for) -> None:
    rules = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text(encoding="utf-8")
    m = re.search(r"- alert: OrderqConnectorLag\n\s+expr: .*orderq_connector_lag_seconds\) > (\d+)\n", rules)
    assert m, "OrderqConnectorLag's expression changed shape"
    assert float(m.group(1)) == settings_for().alert_connector_lag_s
