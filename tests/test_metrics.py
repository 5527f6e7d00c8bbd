"""/metrics: the contract's families, with counts equal to what was sent."""

from __future__ import annotations

import asyncio
import re

import httpx

from orderq import metrics
from tests.conftest import auth, drain, make_order, unique


def value(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


async def test_metrics_count_what_was_sent(ingress, r):
    metrics.E2E_LATENCY.reset()  # observations of earlier tests in this process
    base = await ingress()
    async with httpx.AsyncClient(base_url=base, headers=auth()) as c:
        orders = [make_order(unique()) for _ in range(8)]
        orders += [make_order(unique(), customer={"id": unique("v"), "tier": "vip"}) for _ in range(2)]
        for o in orders:
            assert (await c.post("/v1/orders", json=o)).status_code == 202
        assert (await c.post("/v1/orders", json=orders[0])).status_code == 200
        bad = make_order(unique(), paid_amount=12.5)
        assert (await c.post("/v1/orders", json=bad)).status_code == 422
        await drain(r)
        await metrics.flush(r)  # the in-process executor's end-to-end latencies
        text = ""
        for _ in range(50):  # the ingress adds its ack latencies to Redis once a second
            text = (await c.get("/metrics")).text
            if "orderq_ack_latency_seconds_count 11" in text:
                break
            await asyncio.sleep(0.1)
    assert value(text, "orderq_accepted_total") == 10
    assert value(text, "orderq_duplicates_total") == 1
    assert value(text, "orderq_invalid_total") == 1
    assert value(text, "orderq_shed_total") == 0
    assert value(text, "orderq_validated_total") == 10
    assert value(text, 'orderq_executed_total{priority="vip"}') == 2
    assert value(text, 'orderq_executed_total{priority="new"}') == 8
    assert value(text, "orderq_ack_latency_seconds_count") == 11  # 202s and the 200 replay
    e2e = sum(value(text, f'orderq_e2e_latency_seconds_count{{priority="{p}"}}') for p in ("vip", "new"))
    assert e2e == 10
    assert value(text, "orderq_backlog") == 0
    assert value(text, 'orderq_depth{stage="intake"}') == 0
    assert value(text, 'orderq_breaker_stage{stage="normal"}') == 1
    assert 'orderq_syncs_total{state="deferred"}' in text
