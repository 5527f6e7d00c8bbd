"""Sales-channel formats (contract §7): ``POST /v1/channels/{channel}/orders`` and
``…/orders/batch`` take a channel's own payload, map it with the channel's compiled
mapping (:mod:`ingress.mapping`, files under ``ORDERQ_MAPPINGS_DIR``), then follow exactly
the path of ``POST /v1/orders``: the same schema decoding and rules, channel token,
shedding, rate limit, committer, and the same answers.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ingress import responses
from ingress.admission import ANYONE, NOBODY, VIP_ONLY
from ingress.mapping import Mapping, MappingError, load_dir
from ingress.routes import DECODE_ERRORS, OVERLOADED, Handlers, Refusal, _reason, _require_json, _retry_after
from orderq import metrics
from orderq.errors import ConfigError, ServerUnavailable
from orderq.schema import ErrorDetail, Order, any_json_decoder, json_encoder, pack
from orderq.settings import Settings

log = structlog.get_logger("orderq.ingress")


def load_mappings(settings: Settings) -> dict[str, Mapping]:
    """Compile every mapping once, at start; a broken file raises :class:`ConfigError`
    naming the file and line (the CLI exits 2)."""
    mappings = load_dir(settings.mappings_dir, settings.channels)
    if settings.shopify_secret and "shopify" not in mappings:
        raise ConfigError(
            "ORDERQ_MAPPINGS_DIR",
            f"no shopify.toml in {settings.mappings_dir}, needed by the Shopify webhook (ORDERQ_SHOPIFY_SECRET)",
        )
    return mappings


def map_order(h: Handlers, m: Mapping, payload: Any) -> Order:
    """A channel payload -> a decoded, normalised :class:`Order`, through the same decoder and
    checks as ``POST /v1/orders``. Every 422 names the channel's own field."""
    try:
        doc, ctx = m.apply(payload)
    except MappingError as exc:
        raise Refusal(
            422,
            "invalid_order",
            f"the {m.channel} payload does not map to an order",
            [ErrorDetail(path=exc.field, message=exc.message)],
        ) from None
    try:
        return h._decode_order(json_encoder.encode(doc))
    except Refusal as r:
        if r.status == 422 and r.details:
            r.message = f"the {m.channel} payload maps to an order that fails the schema"
            r.details = [
                ErrorDetail(path=m.channel_field(d.path, ctx), message=f"{d.message} (order field `{d.path}`)")
                for d in r.details
            ]
        raise


async def accept(h: Handlers, order: Order) -> int:
    """Shed, rate-limit and queue one order exactly as ``POST /v1/orders`` does;
    1 queued, 0 a known key (duplicate). Raises :class:`Refusal` / :class:`ServerUnavailable`."""
    if h._shed(order):
        await h._count("shed")
        raise Refusal(503, "shedding", "backlog too high; retry later", headers=_retry_after(2))
    await h._rate(order.channel, 1)
    committer = h.s.committer
    (flag,) = await committer.wait([committer.submit(order.key, pack(order), order.customer.tier)])
    return int(flag)


def answer(h: Handlers, key: str, queued: bool, t0: float) -> Response:
    """The answer of ``POST /v1/orders``: 202 queued, 200 duplicate, same body."""
    metrics.ACK_LATENCY.observe(time.perf_counter() - t0)
    body = {"order_key": key, "status": "accepted", "duplicate": not queued, "stage": h.s.control.stage}
    return responses.json(body, 202 if queued else 200)


async def read_json(request: Request) -> Any:
    """The body as generic JSON (400 / 415 like ``POST /v1/orders``)."""
    _require_json(request)
    body = await request.body()
    if not body:
        raise Refusal(400, "invalid_json", "empty body")
    try:
        return any_json_decoder.decode(body)
    except DECODE_ERRORS as exc:
        raise Refusal(400, "invalid_json", f"body is not valid JSON: {_reason(exc)}") from None


class ChannelHandlers:
    """The two channel routes over the compiled mappings."""

    def __init__(self, h: Handlers, mappings: dict[str, Mapping]) -> None:
        self.h = h
        self.mappings = mappings

    def routes(self) -> list[Route]:
        return [
            Route("/v1/channels/{channel}/orders", self.post_order, methods=["POST"]),
            Route("/v1/channels/{channel}/orders/batch", self.post_batch, methods=["POST"]),
        ]

    def _mapping_for(self, request: Request) -> Mapping:
        """Auth first (401 / 403 like order writes), then the channel's mapping (404 if none)."""
        channel = request.path_params["channel"]
        token_channel = self.h.s.auth.channel_of(request)
        m = self.mappings.get(channel)
        if m is None:
            raise Refusal(404, "not_found", f"no mapping for channel {channel!r}")
        if token_channel is not None and token_channel != channel:
            raise Refusal(403, "forbidden", f"token of channel {token_channel!r} cannot write {channel!r} orders")
        return m

    async def post_order(self, request: Request) -> Response:
        """One order in the channel's own format (contract §7); answers like POST /v1/orders."""
        t0 = time.perf_counter()
        adm = self.h.s.admission
        ticket = None
        try:
            m = self._mapping_for(request)
            payload = await read_json(request)
            try:
                order = map_order(self.h, m, payload)
            except Refusal as r:
                if r.status == 422:
                    await self.h._count("invalid")
                raise
            # Overload (contract §6): the channel's tier is known once mapped; no Redis call yet.
            ticket = adm.admit_tier(order.customer.tier == "vip")
            if ticket is None:
                return adm.refusal()
            queued = await accept(self.h, order)
        except Refusal as r:
            return r.response()
        except ServerUnavailable as exc:
            return responses.error(503, "unavailable", str(exc), headers=_retry_after(exc.retry_after))
        finally:
            if ticket is not None:
                adm.leave(ticket)
        return answer(self.h, order.key, bool(queued), t0)

    async def post_batch(self, request: Request) -> Response:
        """``{"orders": [...]}`` in the channel's own format; answers like POST /v1/orders/batch."""
        t0 = time.perf_counter()
        h = self.h
        adm = h.s.admission
        ticket = None
        try:
            m = self._mapping_for(request)
            doc = await read_json(request)
            payloads = doc.get("orders") if isinstance(doc, dict) else None
            limit = h.s.settings.batch_max
            if not isinstance(payloads, list):
                raise Refusal(
                    422,
                    "invalid_batch",
                    'body must be {"orders": [...]}',
                    [ErrorDetail(path="orders", message="a list")],
                )
            if not payloads or len(payloads) > limit:
                raise Refusal(
                    422,
                    "invalid_batch",
                    f"a batch holds 1 to {limit} orders",
                    [ErrorDetail(path="orders", message=f"expected 1 to {limit} orders, got {len(payloads)}")],
                )
            await h._rate(m.channel, len(payloads))
            items: list[Order | tuple[str | None, Refusal]] = []
            for payload in payloads:
                try:
                    items.append(map_order(h, m, payload))
                except Refusal as r:
                    items.append((m.key_hint(payload), r))
            # Overload (contract §6), as POST /v1/orders/batch: the request is one unit in flight.
            room = adm.room()
            if room != ANYONE:
                for i, item in enumerate(items):
                    if isinstance(item, tuple):
                        continue
                    vip = item.customer.tier == "vip"
                    if room == NOBODY or not vip:
                        adm.count(vip)
                        items[i] = (item.key, OVERLOADED)
                if room == NOBODY:
                    return adm.refusal()
            ticket = adm.enter(vip=room == VIP_ONLY)
            return await h.queue_batch(items, t0)
        except Refusal as r:
            return r.response()
        except ServerUnavailable as exc:
            return responses.error(503, "unavailable", str(exc), headers=_retry_after(exc.retry_after))
        finally:
            if ticket is not None:
                adm.leave(ticket)
