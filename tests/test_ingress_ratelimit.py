"""Per-channel fairness: a channel over ORDERQ_CHANNEL_RATE gets 429 + Retry-After; others pass."""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import auth, make_order, unique


async def test_channel_over_rate_gets_429_and_other_channel_is_unaffected(ingress, r):
    base = await ingress(ORDERQ_CHANNEL_RATE="tmall=5")
    async with httpx.AsyncClient(base_url=base) as c:
        tmall = [make_order(unique()) for _ in range(30)]
        jd = [make_order(unique(), channel="jd") for _ in range(30)]
        res_t, res_j = await asyncio.gather(
            asyncio.gather(*(c.post("/v1/orders", json=o, headers=auth("tmall")) for o in tmall)),
            asyncio.gather(*(c.post("/v1/orders", json=o, headers=auth("jd")) for o in jd)),
        )
        codes_t = [x.status_code for x in res_t]
        assert codes_t.count(202) <= 6  # the bucket holds one second of the rate (5), plus a refill tick
        assert codes_t.count(202) >= 1
        limited = [x for x in res_t if x.status_code == 429]
        assert limited, codes_t
        assert all(int(x.headers["retry-after"]) >= 1 for x in limited)
        assert limited[0].json()["error"]["code"] == "rate_limited"
        assert [x.status_code for x in res_j] == [202] * 30
        # a limited order was not queued
        key = f"tmall:{tmall[codes_t.index(429)]['order_id']}"
        assert (await c.get(f"/v1/orders/tmall/{key.split(':')[1]}", headers=auth())).status_code == 404
        # a batch counts every order against the rate
        big = await c.post(
            "/v1/orders/batch", json={"orders": [make_order(unique()) for _ in range(20)]}, headers=auth("tmall")
        )
        assert big.status_code == 429
