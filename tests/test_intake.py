"""``orderq.intake.Intake`` used directly, as callers outside the ingress (connectors, file
import) use it: the same records, dedup and counters as an order sent over HTTP."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import msgspec

from orderq import keys, stats
from orderq.client import Redis
from orderq.intake import Intake, Outcome
from orderq.schema import Order, order_decoder
from orderq.settings import Settings
from tests.conftest import ADMIN, auth, make_order


def decoded(n: int | str, **over: Any) -> Order:
    return order_decoder.decode(msgspec.json.encode(make_order(n, **over)))


async def test_submit_accepts_dedups_and_the_record_reads_over_http(
    ingress: Any, r: Redis, settings_for: Callable[..., Settings]
) -> None:
    base = await ingress()
    intake = await Intake.open(settings_for())
    try:
        first = await intake.submit([decoded("I1"), decoded("I2"), decoded("I1")])
        assert first == [Outcome.ACCEPTED, Outcome.ACCEPTED, Outcome.DUPLICATE]
        again = await intake.submit([decoded("I2"), decoded("I3")])
        assert again == [Outcome.DUPLICATE, Outcome.ACCEPTED]
    finally:
        await intake.close()

    assert sum([await r.client.xlen(p.intake) for p in r.partitions]) == 3
    totals = await stats.totals(r)
    assert totals["accepted"] == 3
    assert totals["duplicates"] == 2  # one within a call, one across calls

    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        resp = await c.get("/v1/orders/tmall/TI1", headers=auth("tmall"))
        assert resp.status_code == 200, resp.text
        doc = resp.json()
        assert doc["order_key"] == "tmall:TI1"
        assert doc["status"] == "accepted"
        # An order already submitted through the intake is a duplicate over HTTP too.
        resp = await c.post("/v1/orders", json=make_order("I3"), headers=auth("tmall"))
        assert resp.status_code == 200, resp.text
        assert resp.json()["duplicate"] is True
        assert (await c.get("/v1/orders/tmall/TI9", headers=ADMIN)).status_code == 404


async def test_submit_sheds_what_the_breaker_sheds(r: Redis, settings_for: Callable[..., Settings]) -> None:
    await r.client.hset(keys.BREAKER_KEY, mapping={"stage": "shedding", "backlog": 1})
    intake = await Intake.open(settings_for())
    try:
        vip = make_order("V1")
        vip["customer"] = {**vip["customer"], "tier": "vip"}
        outcomes = await intake.submit([decoded("S1"), order_decoder.decode(msgspec.json.encode(vip))])
        assert outcomes == [Outcome.SHED, Outcome.ACCEPTED]
    finally:
        await intake.close()
    totals = await stats.totals(r)
    assert totals["accepted"] == 1
    assert totals["shed"] == 1
    assert not await r.client.exists(r.partition_of("tmall:TS1").status("tmall:TS1"))


async def test_submit_answers_unavailable_when_redis_does_not_confirm(
    r: Redis, settings_for: Callable[..., Settings]
) -> None:
    # WAIT for a replica this server does not have: the write is never confirmed in time.
    intake = await Intake.open(settings_for(ORDERQ_WAIT_REPLICAS=1, ORDERQ_ACK_DEADLINE_MS=200))
    try:
        assert await intake.submit([decoded("U1"), decoded("U1")]) == [Outcome.UNAVAILABLE, Outcome.DUPLICATE]
    finally:
        await intake.close()
