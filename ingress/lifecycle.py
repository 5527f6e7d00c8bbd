"""The order life-cycle routes after acceptance (contract §5): cancel, and the order events.

``POST /v1/orders/{channel}/{order_id}/cancel`` takes the channel's token or the admin token;
the decision is orderq/lifecycle.py's (one partition script). Shopify's ``orders/cancelled``
webhook (ingress/shopify.py checks its signature) takes the same path.
``POST /v1/orders/{channel}/{order_id}/events`` takes the admin token or a source token
(``ORDERQ_SOURCE_TOKENS``) of the body's source; orderq/lifecycle.py applies it.
"""

from __future__ import annotations

from typing import Any

import msgspec
import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ingress import responses
from ingress.auth import same
from ingress.http import DECODE_ERRORS, bearer, needs_redis, reason, require_json, require_json_syntax
from ingress.state import IngressState
from orderq import lifecycle
from orderq.lifecycle import Answer, CancelBody
from orderq.schema import ErrorDetail, any_json_decoder

log = structlog.get_logger("orderq.ingress")

CANCELLED_TOPIC = "orders/cancelled"  # Shopify's webhook topic of a cancelled order
# Shopify's cancel_reason -> ours
SHOPIFY_REASONS = {"customer": "buyer_cancelled", "fraud": "fraud", "inventory": "out_of_stock"}
ORDER_ID_MAX = 128  # an order id longer than any platform's is not one


def answer(order_key: str, outcome: Answer) -> Response:
    """The contract's answer to a cancel (a repeat answers the same)."""
    if outcome == Answer.TOO_LATE:
        raise responses.Refusal(409, "too_late", f"{order_key} has shipped: a return is the way")
    if outcome == Answer.NOT_CANCELLABLE:
        raise responses.Refusal(409, "not_cancellable", f"{order_key} was rejected: nothing to cancel")
    status = 200 if outcome == Answer.CANCELLED else 202
    return responses.json({"order_key": order_key, "status": outcome.value}, status)


class LifecycleHandlers:
    def __init__(self, state: IngressState) -> None:
        self.s = state

    def routes(self) -> list[Route]:
        return [
            Route("/v1/orders/{channel}/{order_id}/cancel", needs_redis(self.post_cancel), methods=["POST"]),
            Route("/v1/orders/{channel}/{order_id}/events", needs_redis(self.post_event), methods=["POST"]),
        ]

    async def post_cancel(self, request: Request) -> Response:
        channel, order_id = request.path_params["channel"], request.path_params["order_id"]
        self.s.auth.channel_or_admin(request, channel)
        if len(order_id) > ORDER_ID_MAX:
            raise responses.not_found("no such order id")
        require_json(request)
        raw = await request.body()
        if not raw:
            raise responses.empty_body()
        try:
            body = msgspec.json.decode(raw, type=CancelBody)
        except msgspec.ValidationError as exc:
            require_json_syntax(raw)
            raise responses.Refusal(422, "invalid_request", "the cancel fails the schema", [_detail(exc)]) from None
        except DECODE_ERRORS as exc:
            raise responses.invalid_json(reason(exc)) from None
        key = f"{channel}:{order_id}"
        return answer(key, await lifecycle.cancel(self.s.redis, key, body.reason, body.note))

    async def post_event(self, request: Request) -> Response:
        """An order event from a system downstream: 202 with the public status after it."""
        channel, order_id = request.path_params["channel"], request.path_params["order_id"]
        caller = event_caller(self.s, request)
        require_json(request)
        raw = await request.body()
        if not raw:
            raise responses.empty_body()
        try:
            ev = lifecycle.decode_event(raw)
        except msgspec.ValidationError as exc:
            require_json_syntax(raw)
            problems = lifecycle.event_problems(any_json_decoder.decode(raw))
            details = [ErrorDetail(path, message) for path, message in problems] or [_detail(exc)]
            raise responses.Refusal(422, "invalid_request", "the event fails the schema", details) from None
        except DECODE_ERRORS as exc:
            raise responses.invalid_json(reason(exc)) from None
        if caller is not None and caller != ev.source:
            raise responses.forbidden(f"the token of source {caller!r} cannot report {ev.source!r} events")
        key = f"{channel}:{order_id}"
        if channel not in self.s.settings.channels or len(order_id) > ORDER_ID_MAX:
            raise responses.not_found(f"no order {key!r}")
        res = await lifecycle.apply_event(self.s.redis, key, ev)
        if res.outcome == "missing":
            raise responses.not_found(f"no order {key!r}")
        doc = {"order_key": key, "status": res.status, "duplicate": res.outcome == "duplicate"}
        return responses.json(doc, 202)


def event_caller(state: IngressState, request: Request) -> str | None:
    """Who reports an order event: the source whose ORDERQ_SOURCE_TOKENS token the request
    carries, or None for the admin token (any source) or while auth is off; 401 / 403 else."""
    auth = state.auth
    if not auth.enabled:
        return None
    token = bearer(request)
    if token is None:
        raise responses.unauthorized("missing bearer token")
    if auth.admin and same(token, auth.admin):
        return None
    found = None
    for source, t in state.settings.source_tokens.items():
        if same(token, t):  # no early exit: time does not tell which source matched
            found = source
    if found is not None:
        return found
    if any(same(token, t) for t in auth.channel_tokens.values()):
        raise responses.forbidden("order events take a source token (ORDERQ_SOURCE_TOKENS) or the admin token")
    raise responses.unauthorized("invalid bearer token")


async def shopify_cancelled(state: IngressState, doc: Any) -> Response:
    """Shopify's ``orders/cancelled`` webhook (signature already checked): cancels
    ``shopify:<id>`` like the cancel endpoint, reason from its ``cancel_reason``."""
    order_id = doc.get("id") if isinstance(doc, dict) else None
    if isinstance(order_id, bool) or not isinstance(order_id, int | str) or not str(order_id).strip():
        raise responses.Refusal(422, "invalid_request", "the webhook has no order id", [ErrorDetail("id", "required")])
    why = SHOPIFY_REASONS.get(str(doc.get("cancel_reason") or ""), "other")
    note = f"shopify cancel_reason={doc.get('cancel_reason')}"
    key = f"shopify:{str(order_id).strip()}"
    return answer(key, await lifecycle.cancel(state.redis, key, why, note))


def _detail(exc: msgspec.ValidationError) -> ErrorDetail:
    msg = str(exc)
    message, sep, path = msg.rpartition(" - at `")
    return ErrorDetail(path=path.rstrip("`").removeprefix("$.") if sep else "$", message=message if sep else msg)
