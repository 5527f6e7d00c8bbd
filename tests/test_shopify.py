"""``POST /v1/webhooks/shopify`` (contract §7) against a real ingress: Shopify's signed
orders/create webhook is accepted and answered like ``POST /v1/orders``; a tampered or
unsigned one gets 401; a redelivered webhook id is a duplicate even with a changed body."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import uuid
from typing import Any

import httpx
import pytest

from orderq import keys, stats
from orderq.client import Redis
from orderq.schema import unpack_order
from orderq.settings import SHIPPED_MAPPINGS
from tests.conftest import auth

HOOK = "/v1/webhooks/shopify"
SECRET = "shpss_" + "s" * 32
SAMPLE = json.loads((SHIPPED_MAPPINGS / "samples" / "shopify.json").read_text(encoding="utf-8"))


def signed(body: bytes, secret: str = SECRET, webhook_id: str | None = None, **extra: str) -> dict[str, str]:
    """The headers Shopify sends with a webhook delivery."""
    digest = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()
    return {
        "Content-Type": "application/json",
        "X-Shopify-Topic": "orders/create",
        "X-Shopify-Hmac-Sha256": digest,
        "X-Shopify-Shop-Domain": "woodwork.myshopify.com",
        "X-Shopify-API-Version": "2025-10",
        "X-Shopify-Webhook-Id": webhook_id or str(uuid.uuid4()),
        "X-Shopify-Triggered-At": "2026-11-27T14:00:02.123456Z",
        **extra,
    }


def body_of(**over: Any) -> bytes:
    return json.dumps({**SAMPLE, **over}, ensure_ascii=False).encode()


async def queued(r: Redis) -> dict[str, Any]:
    out = {}
    for p in r.partitions:
        for _id, fields in await r.client.xrange(p.intake):
            o = unpack_order(fields[b"d"])
            out[o.key] = o
    return out


@pytest.fixture
async def shop(ingress: Any, r: Redis) -> Any:
    base = await ingress(ORDERQ_SHOPIFY_SECRET=SECRET)
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        yield c


async def test_a_signed_orders_create_webhook_is_accepted_like_an_order(shop, r):
    body = body_of()
    resp = await shop.post(HOOK, content=body, headers=signed(body))
    assert resp.status_code == 202, resp.text
    assert resp.json() == {
        "order_key": "shopify:5938475618394",
        "status": "accepted",
        "duplicate": False,
        "stage": "normal",
    }
    [o] = (await queued(r)).values()
    assert o.created_at == dt.datetime(2026, 11, 27, 14, 0, 1, tzinfo=dt.UTC)  # -05:00 -> UTC
    assert o.customer.tier == "vip"  # customer tags "newsletter, VIP"
    assert o.remark == "Leave at the back door, please"
    assert (o.paid_amount, o.currency) == ("405.00", "USD")
    assert [(x.sku, x.qty, x.unit_price) for x in o.lines] == [
        ("LAMP-WAL", 2, "150.00"),
        ("44012345678999", 1, "150.00"),
    ]
    assert [(c.code, c.platform, c.amount) for c in o.coupons] == [("BFCM10", "shopify", "45.00")]
    assert (o.ship_to.name, o.ship_to.province, o.ship_to.address) == (
        "Olivia Martin",
        "Ontario",
        "160 Elgin Street Suite 400",
    )
    assert o.extra == {"shopify_name": "#1042"}
    rec = (await shop.get("/v1/orders/shopify/5938475618394", headers=auth("shopify"))).json()
    assert rec["status"] == "accepted"


async def test_a_tampered_or_unsigned_webhook_gets_401_and_queues_nothing(shop, r):
    body = body_of()
    headers = signed(body)
    tampered = body.replace(b'"405.00"', b'"4.05"', 1)
    assert tampered != body
    for content, h in [
        (tampered, headers),  # body changed after signing
        (body, {**headers, "X-Shopify-Hmac-Sha256": ""}),
        (body, {k: v for k, v in headers.items() if k != "X-Shopify-Hmac-Sha256"}),
        (body, signed(body, secret="another-shops-secret")),
        (body, {**headers, "X-Shopify-Hmac-Sha256": headers["X-Shopify-Hmac-Sha256"][:-4] + "AAA="}),
    ]:
        resp = await shop.post(HOOK, content=content, headers=h)
        assert resp.status_code == 401, resp.text
        assert resp.json()["error"]["code"] == "unauthorized"
    assert await queued(r) == {}
    # a bearer token is no substitute for the signature
    resp = await shop.post(HOOK, content=body, headers={"Content-Type": "application/json", **auth("shopify")})
    assert resp.status_code == 401


async def test_a_replayed_webhook_id_is_a_duplicate_even_with_a_changed_body(shop, r):
    webhook_id = str(uuid.uuid4())
    first = body_of()
    resp = await shop.post(HOOK, content=first, headers=signed(first, webhook_id=webhook_id))
    assert resp.status_code == 202
    # Shopify redelivers with the same webhook id; the body may differ (here even the order id)
    for changed in (body_of(note="changed"), body_of(id=5938475618395, name="#1043")):
        resp = await shop.post(HOOK, content=changed, headers=signed(changed, webhook_id=webhook_id))
        assert resp.status_code == 200, resp.text
        assert resp.json() == {
            "order_key": "shopify:5938475618394",
            "status": "accepted",
            "duplicate": True,
            "stage": "normal",
        }
    # the same order through another webhook id: a duplicate by its order key
    resp = await shop.post(HOOK, content=first, headers=signed(first))
    assert resp.status_code == 200 and resp.json()["duplicate"] is True
    assert list(await queued(r)) == ["shopify:5938475618394"]
    t = await stats.totals(r)
    assert (t["accepted"], t["duplicates"]) == (1, 3)


async def test_a_webhook_id_whose_order_never_landed_does_not_swallow_the_retry(shop, r):
    """A delivery that failed after claiming its webhook id but before its order was queued
    (Redis went away): the retry is not taken for a duplicate."""
    webhook_id = str(uuid.uuid4())
    p = r.partition_of(f"shopify-webhook:{webhook_id}")
    await r.client.set(keys.webhook_key(p, "shopify", webhook_id), "shopify:1", ex=60)
    body = body_of()
    resp = await shop.post(HOOK, content=body, headers=signed(body, webhook_id=webhook_id))
    assert resp.status_code == 202, resp.text
    assert await r.client.get(keys.webhook_key(p, "shopify", webhook_id)) == b"shopify:5938475618394"
    assert 0 < await r.client.ttl(keys.webhook_key(p, "shopify", webhook_id)) <= keys.WEBHOOK_DEDUP_TTL_S
    changed = body_of(note="again")
    resp = await shop.post(HOOK, content=changed, headers=signed(changed, webhook_id=webhook_id))
    assert resp.status_code == 200 and resp.json()["order_key"] == "shopify:5938475618394"


async def test_other_topics_and_bad_payloads_are_refused_after_the_signature(shop, r):
    body = body_of()
    resp = await shop.post(HOOK, content=body, headers=signed(body, **{"X-Shopify-Topic": "orders/updated"}))
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "unsupported_topic"
    broken = body_of(line_items=[{"sku": "LAMP-WAL", "quantity": 0, "price": "150.00"}])
    resp = await shop.post(HOOK, content=broken, headers=signed(broken))
    assert resp.status_code == 422
    [detail] = resp.json()["error"]["details"]
    assert detail["path"] == "line_items[0].quantity"  # Shopify's field, not lines[0].qty
    assert await queued(r) == {}


async def test_without_a_secret_every_webhook_is_refused(ingress, r):
    base = await ingress()  # ORDERQ_SHOPIFY_SECRET unset
    body = body_of()
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        for secret in (SECRET, ""):
            resp = await c.post("/v1/webhooks/shopify", content=body, headers=signed(body, secret=secret))
            assert resp.status_code == 401
    assert await queued(r) == {}


async def test_a_large_shopify_order_is_not_refused_for_its_size(shop, r):
    """Shopify's order payloads carry much per line (taxes, properties, allocations): one with
    150 lines passes the single-order body limit (64 KB) and must still be taken."""
    item = SAMPLE["line_items"][0]
    lines = [
        {**item, "id": i, "sku": f"LAMP-{i}", "properties": [{"name": "engraving", "value": "x" * 300}]}
        for i in range(150)
    ]
    body = body_of(line_items=lines)
    assert len(body) > 65536
    resp = await shop.post(HOOK, content=body, headers=signed(body))
    assert resp.status_code == 202, resp.text
    [o] = (await queued(r)).values()
    assert len(o.lines) == 150
