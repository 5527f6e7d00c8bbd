"""``POST /v1/webhooks/shopify`` (contract §7): Shopify's ``orders/create`` webhook.

The signature is the webhook's authentication: ``X-Shopify-Hmac-Sha256`` must be the
base64 HMAC-SHA256 of the raw body under ``ORDERQ_SHOPIFY_SECRET`` (401 otherwise, and
always while the secret is unset). The body maps through ``mappings/shopify.toml`` to the
order key ``shopify:<order id>`` and then takes the path of ``POST /v1/orders``.

Shopify delivers at least once and retries for up to 48 hours, so a delivery is a
duplicate when its order key is known (the intake script's dedup) **or** its
``X-Shopify-Webhook-Id`` was seen: ``SET NX GET`` of a key under the webhook id's own
partition remembers which order a webhook became (a redelivery whose body changed, even
its order id, is still the same webhook). The remembered order only counts once its
status record exists, so a delivery that failed before its order was queued is not
mistaken for a duplicate on the retry: nothing accepted is lost, nothing is queued twice.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ingress import responses
from ingress.channels import map_order
from ingress.http import needs_redis, read_json
from ingress.lifecycle import CANCELLED_TOPIC, shopify_cancelled
from ingress.orders import Orders
from ingress.state import IngressState
from orderq import keys
from orderq.client import UNAVAILABLE

log = structlog.get_logger("orderq.ingress")

TOPIC = "orders/create"
MAX_WEBHOOK_ID = 128  # Shopify's ids are UUIDs; anything far longer is not a webhook id


def signature_ok(secret: str | None, body: bytes, header: str | None) -> bool:
    """Constant-time check of ``X-Shopify-Hmac-Sha256`` against the raw body."""
    if not secret or not header:
        return False
    digest = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest())
    return hmac.compare_digest(digest, header.strip().encode("utf-8", "replace"))


class ShopifyHandler:
    def __init__(self, state: IngressState, orders: Orders) -> None:
        self.s = state
        self.orders = orders
        self.mapping = state.mappings.get("shopify")

    def routes(self) -> list[Route]:
        return [Route("/v1/webhooks/shopify", needs_redis(self.post), methods=["POST"])]

    async def post(self, request: Request) -> Response:
        """Shopify orders/create webhook, signed (X-Shopify-Hmac-Sha256); answers like POST /v1/orders."""
        t0 = time.perf_counter()
        body = await request.body()
        if not signature_ok(self.s.settings.shopify_secret, body, request.headers.get("x-shopify-hmac-sha256")):
            raise responses.unauthorized("X-Shopify-Hmac-Sha256 does not match the body", challenge=False)
        topic = request.headers.get("x-shopify-topic")
        if topic == CANCELLED_TOPIC:  # cancels like POST /v1/orders/shopify/<id>/cancel (contract §5)
            return await shopify_cancelled(self.s, await read_json(request))
        if topic is not None and topic != TOPIC:
            raise responses.Refusal(422, "unsupported_topic", f"this endpoint takes {TOPIC} webhooks, not {topic!r}")
        webhook_id = (request.headers.get("x-shopify-webhook-id") or "").strip()
        if len(webhook_id) > MAX_WEBHOOK_ID:
            raise responses.Refusal(422, "invalid_webhook_id", "X-Shopify-Webhook-Id is too long")
        if self.mapping is None:
            raise responses.not_found("no mapping for channel 'shopify'")
        order = map_order(self.orders, self.mapping, await read_json(request))
        # Overload (contract §6): refused before the webhook id is claimed (a Redis call).
        adm = self.s.admission
        ticket = adm.admit_tier(order.customer.tier == "vip")
        if ticket is None:
            return adm.refusal(order.customer.tier == "vip")
        key = order.key
        try:
            known, repoint = await self._claim(webhook_id, key) if webhook_id else (None, False)
            if known is not None:
                await self.s.intake.count("duplicates")
                log.info("shopify.webhook_replayed", webhook_id=webhook_id, order_key=known)
                return self.orders.answer(known, False, t0)
            queued = await self.orders.accept(order)
            if repoint:
                await self._remember(webhook_id, key)
        finally:
            adm.leave(ticket)
        return self.orders.answer(key, queued, t0)

    def _webhook_key(self, webhook_id: str) -> str:
        r = self.s.redis
        return keys.webhook_key(r.partition_of(f"shopify-webhook:{webhook_id}"), "shopify", webhook_id)

    async def _claim(self, webhook_id: str, order_key: str) -> tuple[str | None, bool]:
        """(the order key an earlier delivery of this webhook queued, or None; whether the id must
        be pointed at ``order_key`` once it is queued). A first delivery claims the id for
        ``order_key`` in one atomic SET NX GET; a replay costs one more read."""
        r = self.s.redis
        prev = await r.client.set(
            self._webhook_key(webhook_id), order_key, nx=True, get=True, ex=keys.WEBHOOK_DEDUP_TTL_S
        )
        if prev is None:
            return None, False
        prev_key = prev.decode() if isinstance(prev, bytes) else str(prev)
        if await r.client.exists(r.partition_of(prev_key).status(prev_key)):
            return prev_key, False
        return None, prev_key != order_key  # that delivery never got its order queued: this one goes on

    async def _remember(self, webhook_id: str, order_key: str) -> None:
        """After the order is queued: the webhook id names it (an earlier delivery that failed
        before queuing had claimed the id for another order key)."""
        r = self.s.redis
        try:
            await r.client.set(self._webhook_key(webhook_id), order_key, ex=keys.WEBHOOK_DEDUP_TTL_S)
        except UNAVAILABLE as exc:  # the order is queued; its key still dedups a redelivery
            log.warning("shopify.webhook_not_remembered", webhook_id=webhook_id, order_key=order_key, error=str(exc))
