"""The one path an order takes through the ingress, whichever route it came by (``POST
/v1/orders`` and ``/batch``, the channel formats, the Shopify webhook): decoded by the
schema, shed or rate-limited, queued by :class:`orderq.intake.Intake`, answered alike.

A route decides only what is its own: how the body becomes orders (JSON, a channel's
mapping), whose token may send them, and where admission control looks at them.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import msgspec
from starlette.responses import Response

from ingress import responses
from ingress.admission import ERROR as OVERLOAD_ERROR
from ingress.admission import MESSAGE as OVERLOAD_MESSAGE
from ingress.http import DECODE_ERRORS, reason, require_json_syntax
from ingress.responses import Refusal
from ingress.state import IngressState
from orderq import metrics
from orderq.client import UNAVAILABLE
from orderq.errors import ServerUnavailable
from orderq.intake import Outcome
from orderq.schema import ErrorDetail, Order, normalise, order_decoder, validation_details

# A batch item refused by admission control (a marker, never raised): answered "shed", code overloaded.
OVERLOADED = Refusal(503, "overloaded", OVERLOAD_MESSAGE)


class Refused(NamedTuple):
    """A batch item that is not queued: its order key if one can be read, and why."""

    hint: str | None
    refusal: Refusal


Item = Order | Refused  # one order of a batch, decoded or refused


class Orders:
    def __init__(self, state: IngressState) -> None:
        self.s = state

    # --- decoding ---------------------------------------------------------------------------
    def decode(self, body: bytes | msgspec.Raw) -> Order:
        """One order's JSON -> a normalised :class:`Order` on a known channel; 400 / 422."""
        try:
            try:
                order = order_decoder.decode(body)
            except msgspec.ValidationError as exc:
                require_json_syntax(body)
                raise responses.invalid_order(validation_details(body, exc)) from None  # re-reads the body
        except DECODE_ERRORS as exc:
            raise responses.invalid_json(reason(exc)) from None
        if order.channel not in self.s.settings.channels:
            raise responses.invalid_order([ErrorDetail(path="channel", message=f"unknown channel {order.channel!r}")])
        return normalise(order, body)

    def decode_item(self, raw: msgspec.Raw, token_channel: str | None) -> Item:
        """One order of a batch: decoded, or refused (invalid, or another channel than the token's)."""
        try:
            order = self.decode(raw)
        except Refusal as r:
            return Refused(key_hint(raw), r)
        if token_channel is not None and order.channel != token_channel:
            detail = ErrorDetail(path="channel", message="not this token's channel")
            return Refused(order.key, responses.wrong_channel(token_channel, order.channel, [detail]))
        return order

    def check_batch_size(self, n: int) -> None:
        """422 unless a batch of ``n`` orders is within ``ORDERQ_BATCH_MAX``."""
        limit = self.s.settings.batch_max
        if not n or n > limit:
            raise responses.batch_size(n, limit)

    # --- one order --------------------------------------------------------------------------
    async def rate(self, channel: str, n: int) -> None:
        """429 + Retry-After when ``channel`` is over its ``ORDERQ_CHANNEL_RATE``."""
        limiter = self.s.limiter
        if not limiter.limited(channel):
            return
        try:
            wait = await limiter.take(channel, n)
        except UNAVAILABLE as exc:
            raise ServerUnavailable(f"Redis: {exc}") from None
        if wait:
            raise responses.rate_limited(channel, wait)

    async def accept(self, order: Order) -> bool:
        """Shed, rate-limit and queue one admitted order: True queued, False a known key
        (duplicate). Raises :class:`Refusal` (503 shedding, 429) or :class:`ServerUnavailable`."""
        intake = self.s.intake
        if intake.sheds(order):
            metrics.CHANNEL_ORDERS.inc(order.channel, "shed")
            raise responses.shedding()
        if self.s.limiter.limited(order.channel):
            await self.rate(order.channel, 1)
        return bool(await intake.queue(order))

    def answer(self, key: str, queued: bool, t0: float) -> Response:
        """The answer to one order: 202 queued, 200 duplicate, same body; counted for its channel."""
        body = {"order_key": key, "status": "accepted", "duplicate": not queued, "stage": self.s.control.stage}
        metrics.ACK_LATENCY.observe(time.perf_counter() - t0)
        metrics.CHANNEL_ORDERS.inc(key.partition(":")[0], "accepted" if queued else "duplicate")
        return responses.json(body, 202 if queued else 200)

    # --- a batch ----------------------------------------------------------------------------
    async def accept_batch(self, items: list[Item], t0: float) -> Response:
        """Queue a batch's orders in one group commit; the contract's batch body in request
        order. An item refused with :data:`OVERLOADED` is ``shed`` and the answer carries
        ``Retry-After``. Raises :class:`ServerUnavailable` when Redis did not confirm."""
        orders = [item for item in items if not isinstance(item, Refused)]
        n_overload = sum(1 for item in items if isinstance(item, Refused) and item.refusal is OVERLOADED)
        n_invalid = len(items) - len(orders) - n_overload
        # Orders shed for overload are counted by admission control, not with the breaker's.
        done = await self.s.intake.commit(orders, refused={"invalid": n_invalid})
        if done.error is not None:
            raise done.error
        outcomes = iter(done.outcomes)
        results: list[dict[str, object]] = []
        n_acc = n_dup = n_shed = 0
        for item in items:
            if isinstance(item, Refused):
                if item.refusal is OVERLOADED:
                    results.append({"order_key": item.hint, "status": "shed", "error": OVERLOAD_ERROR})
                else:
                    results.append({"order_key": item.hint, "status": "invalid", "error": item.refusal.body()})
                continue
            outcome = next(outcomes)
            if outcome is Outcome.ACCEPTED:
                n_acc += 1
                results.append({"order_key": item.key, "status": "accepted", "error": None})
            elif outcome is Outcome.DUPLICATE:
                n_dup += 1
                results.append({"order_key": item.key, "status": "duplicate", "error": None})
            else:
                n_shed += 1
                results.append({"order_key": item.key, "status": "shed", "error": responses.SHEDDING_ERROR})
        metrics.ACK_LATENCY.observe(time.perf_counter() - t0)
        return responses.json(
            {
                "results": results,
                "accepted": n_acc,
                "duplicates": n_dup,
                "invalid": n_invalid,
                "shed": n_shed + n_overload,
            },
            202,
            self.s.admission.retry_after(n_overload) if n_overload else None,
        )


def key_hint(raw: msgspec.Raw) -> str | None:
    """Best-effort order key of an invalid order, so a client can match the result."""
    try:
        d = msgspec.json.decode(raw)
    except DECODE_ERRORS:
        return None
    if isinstance(d, dict) and isinstance(d.get("channel"), str) and isinstance(d.get("order_id"), str):
        return f"{d['channel']}:{d['order_id']}"
    return None
