"""Sales-channel formats (contract §7): ``POST /v1/channels/{channel}/orders`` and
``…/orders/batch`` take a channel's own payload, map it with the channel's compiled
mapping (:mod:`orderq.mapping`, files under ``ORDERQ_MAPPINGS_DIR``), then take the path of
``POST /v1/orders`` (:mod:`ingress.orders`): the same schema decoding and rules, channel
token, shedding, rate limit, intake, and the same answers.

A payload the mapping's ``[[cancel]]`` entries recognise is the channel's own cancel or refund
message (contract §5): it takes the cancel endpoint's path (:func:`orderq.lifecycle.cancel`) and
answers like it. In a batch it is refused: a batch answers for orders only.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ingress import responses
from ingress.admission import ANYONE, NOBODY, VIP_ONLY
from ingress.http import read_json
from ingress.lifecycle import answer as cancel_answer
from ingress.orders import OVERLOADED, Item, Orders, Refused
from ingress.responses import Refusal
from ingress.state import IngressState
from orderq import lifecycle
from orderq.client import UNAVAILABLE
from orderq.errors import ConfigError, ServerUnavailable
from orderq.mapping import CancelMessage, Mapping, MappingError, load_dir
from orderq.schema import ErrorDetail, Order, json_encoder
from orderq.settings import Settings


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


def map_order(orders: Orders, m: Mapping, payload: Any) -> Order:
    """A channel payload -> a decoded, normalised :class:`Order`, through the same decoder and
    checks as ``POST /v1/orders``. Every 422 names the channel's own field."""
    try:
        doc, ctx = m.apply(payload)
    except MappingError as exc:
        raise responses.invalid_order(
            [ErrorDetail(path=exc.field, message=exc.message)], f"the {m.channel} payload does not map to an order"
        ) from None
    try:
        return orders.decode(json_encoder.encode(doc))
    except Refusal as r:
        if r.status == 422 and r.details:
            r.message = f"the {m.channel} payload maps to an order that fails the schema"
            r.details = [
                ErrorDetail(path=m.channel_field(d.path, ctx), message=f"{d.message} (order field `{d.path}`)")
                for d in r.details
            ]
        raise


def cancel_of(m: Mapping, payload: Any) -> CancelMessage | None:
    """The cancel message ``payload`` is (its mapping's ``[[cancel]]``), or None: an order.
    A recognised message the mapping cannot read is a 422 naming the channel's field."""
    try:
        return m.cancel_of(payload)
    except MappingError as exc:
        raise responses.invalid_order(
            [ErrorDetail(path=exc.field, message=exc.message)], f"the {m.channel} cancel message cannot be read"
        ) from None


def map_item(orders: Orders, m: Mapping, payload: Any) -> Item:
    """One order of a channel batch: mapped and decoded, or refused (a cancel message too)."""
    try:
        if m.cancels and (msg := cancel_of(m, payload)) is not None:
            return Refused(f"{m.channel}:{msg.order_id}", _cancel_in_batch(m))
        return map_order(orders, m, payload)
    except Refusal as r:
        return Refused(m.key_hint(payload), r)


def _cancel_in_batch(m: Mapping) -> Refusal:
    """A batch answers for orders only: its cancel message is refused, pointing to the way."""
    detail = ErrorDetail(path="$", message="a cancel or refund message, not an order")
    where = f"POST /v1/channels/{m.channel}/orders"
    return responses.invalid_order([detail], f"a cancel message is not an order: send it alone to {where}")


class ChannelHandlers:
    """The two channel routes over the compiled mappings."""

    def __init__(self, state: IngressState, orders: Orders) -> None:
        self.s = state
        self.orders = orders

    def routes(self) -> list[Route]:
        return [
            Route("/v1/channels/{channel}/orders", self.post_order, methods=["POST"]),
            Route("/v1/channels/{channel}/orders/batch", self.post_batch, methods=["POST"]),
        ]

    def _mapping_for(self, request: Request) -> Mapping:
        """Auth first (401 / 403 like order writes), then the channel's mapping (404 if none)."""
        channel = request.path_params["channel"]
        token_channel = self.s.auth.channel_of(request)
        m = self.s.mappings.get(channel)
        if m is None:
            raise responses.not_found(f"no mapping for channel {channel!r}")
        if token_channel is not None and token_channel != channel:
            raise responses.wrong_channel(token_channel, channel)
        return m

    async def post_order(self, request: Request) -> Response:
        """One order in the channel's own format (contract §7); answers like POST /v1/orders."""
        t0 = time.perf_counter()
        m = self._mapping_for(request)
        payload = await read_json(request)
        if m.cancels and (msg := cancel_of(m, payload)) is not None:
            return await self._cancel(m, msg)
        order = map_order(self.orders, m, payload)
        # Overload (contract §6): the channel's tier is known once mapped; no Redis call yet.
        adm = self.s.admission
        ticket = adm.admit_tier(order.customer.tier == "vip")
        if ticket is None:
            return adm.refusal(order.customer.tier == "vip")
        try:
            queued = await self.orders.accept(order)
        finally:
            adm.leave(ticket)
        return self.orders.answer(order.key, queued, t0)

    async def _cancel(self, m: Mapping, msg: CancelMessage) -> Response:
        """The channel's cancel message: the cancel endpoint's path and answer (contract §5)."""
        key = f"{m.channel}:{msg.order_id}"
        try:
            outcome = await lifecycle.cancel(self.s.redis, key, msg.reason, msg.note)
        except UNAVAILABLE as exc:
            raise ServerUnavailable(f"Redis: {exc}") from None
        return cancel_answer(key, outcome)

    async def post_batch(self, request: Request) -> Response:
        """``{"orders": [...]}`` in the channel's own format; answers like POST /v1/orders/batch."""
        t0 = time.perf_counter()
        m = self._mapping_for(request)
        doc = await read_json(request)
        payloads = doc.get("orders") if isinstance(doc, dict) else None
        if not isinstance(payloads, list):
            raise responses.invalid_batch(
                'body must be {"orders": [...]}', [ErrorDetail(path="orders", message="a list")]
            )
        self.orders.check_batch_size(len(payloads))
        await self.orders.rate(m.channel, len(payloads))
        items = [map_item(self.orders, m, payload) for payload in payloads]
        # Overload (contract §6), as POST /v1/orders/batch: the request is one unit in flight.
        adm = self.s.admission
        room = adm.room()
        if room != ANYONE:
            for i, item in enumerate(items):
                if isinstance(item, Refused):
                    continue
                vip = item.customer.tier == "vip"
                if room == NOBODY or not vip:
                    adm.count(vip)
                    items[i] = Refused(item.key, OVERLOADED)
            if room == NOBODY:
                return adm.refusal(n=len(items))
        ticket = adm.enter(vip=room == VIP_ONLY)
        try:
            return await self.orders.accept_batch(items, t0)
        finally:
            adm.leave(ticket)
