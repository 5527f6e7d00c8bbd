"""Operator endpoints (contract §4, §5): stock, warehouses, coupons, region holds, review,
dead letters.

Every route takes the admin token. Bodies are decoded straight into the Structs of
:mod:`ingress.bodies` and answers are encoded from them; a body that fails gets the
contract's error with msgspec's path in ``details``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ingress import bodies, responses
from ingress.http import DECODE_ERRORS
from ingress.http import reason as _reason
from ingress.http import require_json as _require_json
from ingress.http import require_json_syntax as _require_json_syntax
from ingress.responses import Refusal
from ingress.responses import retry_after as _retry_after
from orderq import deadletters, warehouses
from orderq.client import UNAVAILABLE
from orderq.ledger import coupons, holds, review, stock
from orderq.schema import ErrorDetail
from orderq.status import render

log = structlog.get_logger("orderq.admin")

T = TypeVar("T")
Endpoint = Callable[[Request], Awaitable[Response]]


def _detail(exc: msgspec.ValidationError) -> ErrorDetail:
    message, sep, path = str(exc).rpartition(" - at `")
    if not sep:
        return ErrorDetail(path="$", message=str(exc))
    return ErrorDetail(path=path.rstrip("`").removeprefix("$").removeprefix(".") or "$", message=message)


async def _body(request: Request, kind: type[T]) -> T:
    _require_json(request)
    raw = await request.body()
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        _require_json_syntax(raw)  # a body that is not JSON at all is a 400, whatever its first value
        raise Refusal(422, "invalid_request", "the body fails the schema", [_detail(exc)]) from None
    except DECODE_ERRORS as exc:
        raise Refusal(400, "invalid_json", f"body is not valid JSON: {_reason(exc)}") from None


class Admin:
    def __init__(self, state: Any) -> None:
        self.s = state  # app.state: settings, redis, auth, control

    async def _guard(self, request: Request, work: Callable[[], Awaitable[Response]]) -> Response:
        """Admin token, then ``work()``; refusals and Redis errors become the contract's errors."""
        try:
            self.s.auth.admin_only(request)
            return await work()
        except Refusal as r:
            return r.response()
        except UNAVAILABLE as exc:
            return responses.error(503, "unavailable", f"Redis: {exc}", headers=_retry_after())

    # --- stock --------------------------------------------------------------------
    async def put_stock(self, request: Request) -> Response:
        async def work() -> Response:
            body = await _body(request, bodies.StockRequest)
            known = await warehouses.get_all(self.s.redis) if any(i.warehouse for i in body.items) else {}
            bad = [
                ErrorDetail(path=f"items[{i}].warehouse", message=f"unknown warehouse {it.warehouse!r}")
                for i, it in enumerate(body.items)
                if it.warehouse is not None and it.warehouse not in known
            ]
            if bad:
                raise Refusal(422, "invalid_request", "the body fails the schema", bad)
            try:
                items = await stock.set_stock(self.s.redis, [(i.sku, i.physical, i.warehouse) for i in body.items])
            except stock.PerWarehouse as exc:
                raise Refusal(422, "invalid_request", str(exc)) from None
            log.info("admin.stock_set", skus=len(items))
            return responses.json(bodies.StockViews(items=bodies.convert(items, list[bodies.StockView])))

        return await self._guard(request, work)

    async def get_stock(self, request: Request) -> Response:
        async def work() -> Response:
            sku = request.path_params["sku"]
            doc = await stock.get_stock(self.s.redis, sku)
            if doc is None:
                return responses.error(404, "not_found", f"no stock record for SKU {sku!r}")
            return responses.json(bodies.convert(doc, bodies.StockView))

        return await self._guard(request, work)

    # --- warehouses ---------------------------------------------------------------------------
    async def put_warehouses(self, request: Request) -> Response:
        async def work() -> Response:
            body = await _body(request, bodies.Warehouses)
            bad = [ErrorDetail(path=path, message=msg) for path, msg in warehouses.problems(body.warehouses)]
            if bad:
                raise Refusal(422, "invalid_request", "the body fails the schema", bad)
            try:
                await warehouses.put(self.s.redis, body.warehouses)
            except warehouses.InUse as exc:  # removing it would strand its stock records
                left = [
                    ErrorDetail(
                        path=f"stock.{s.sku}.warehouses.{s.warehouse}",
                        message=f"physical {s.physical}, allocated {s.allocated} to {s.orders} order(s)",
                    )
                    for s in exc.left
                ]
                raise Refusal(409, "warehouse_in_use", str(exc), left) from None
            log.info("admin.warehouses_set", warehouses=[w.id for w in body.warehouses])
            return responses.json(body)

        return await self._guard(request, work)

    async def get_warehouses(self, request: Request) -> Response:
        async def work() -> Response:
            whs = await warehouses.get_all(self.s.redis)
            return responses.json(bodies.Warehouses(warehouses=list(whs.values())))

        return await self._guard(request, work)

    # --- coupons ------------------------------------------------------------------
    async def put_coupons(self, request: Request) -> Response:
        async def work() -> Response:
            body = await _body(request, bodies.CouponsRequest)
            known = self.s.settings.channels
            bad = [
                ErrorDetail(path=f"coupons[{i}].platform", message=f"unknown channel {c.platform!r}")
                for i, c in enumerate(body.coupons)
                if c.platform not in known
            ]
            if bad:
                raise Refusal(422, "invalid_request", "the body fails the schema", bad)
            n = await coupons.put_coupons(self.s.redis, body.coupons)
            log.info("admin.coupons_set", coupons=n)
            return responses.json(bodies.CouponsWritten(coupons=n))

        return await self._guard(request, work)

    # --- region holds -------------------------------------------------------------
    async def post_hold(self, request: Request) -> Response:
        async def work() -> Response:
            body = await _body(request, bodies.HoldRequest)
            doc = await holds.set_hold(self.s.redis, body.province, body.reason)
            log.info("admin.hold_set", province=body.province, reason=body.reason)
            return responses.json(bodies.convert(doc, bodies.Hold), 201)

        return await self._guard(request, work)

    async def delete_hold(self, request: Request) -> Response:
        async def work() -> Response:
            province = request.path_params["province"]
            existed, moved = await holds.delete_hold(self.s.redis, province)
            log.info("admin.hold_lifted", province=province, existed=existed, released=moved)
            if not existed:
                return responses.error(404, "not_found", f"no hold on {province!r}")
            return responses.json(bodies.HoldLifted(province=province, released=moved))

        return await self._guard(request, work)

    async def get_holds(self, request: Request) -> Response:
        async def work() -> Response:
            return responses.json(
                bodies.Holds(holds=bodies.convert(await holds.list_holds(self.s.redis), list[bodies.Hold]))
            )

        return await self._guard(request, work)

    # --- review -------------------------------------------------------------------
    async def get_review(self, request: Request) -> Response:
        async def work() -> Response:
            raw = request.query_params.get("limit", "100")
            if not raw.isdigit() or not 1 <= int(raw) <= review.MAX_LIST:
                raise Refusal(
                    422,
                    "invalid_request",
                    "bad limit",
                    [ErrorDetail(path="limit", message=f"an integer from 1 to {review.MAX_LIST}")],
                )
            items = await review.list_review(self.s.redis, int(raw))
            return responses.json(bodies.ReviewList(items=bodies.convert(items, list[bodies.ReviewItem])))

        return await self._guard(request, work)

    async def approve(self, request: Request) -> Response:
        return await self._decide(request, "approve")

    async def reject(self, request: Request) -> Response:
        return await self._decide(request, "reject")

    async def _decide(self, request: Request, decision: str) -> Response:
        async def work() -> Response:
            key = f"{request.path_params['channel']}:{request.path_params['order_id']}"
            done, status = await review.decide(self.s.redis, key, decision)
            if not status:
                return responses.error(404, "not_found", f"no order {key!r}")
            wanted = "validated" if decision == "approve" else "rejected"
            # a repeated decision answers like the first; another one is a conflict
            if not done and not (status == wanted or (decision == "approve" and status in ("held", "executed"))):
                return responses.error(409, "not_in_review", f"order {key!r} is {status}, not in review")
            log.info("review.decided", order_key=key, decision=decision, now=done)
            r = self.s.redis
            h = await r.client.hgetall(r.partition_of(key).status(key))
            return responses.json(bodies.convert(render(key, h), bodies.StatusRecord))

        return await self._guard(request, work)

    # --- dead letters (contract §5; the logic is orderq/deadletters.py) ----------------
    async def get_dead_letters(self, request: Request) -> Response:
        async def work() -> Response:
            q = request.query_params
            stage, limit, after = q.get("stage") or None, q.get("limit", "100"), q.get("after") or None
            bad = []
            if stage is not None and stage not in deadletters.STAGES:
                bad.append(ErrorDetail(path="stage", message="one of validate, execute, dispatch"))
            if not limit.isdigit() or not 1 <= int(limit) <= deadletters.MAX_LIST:
                bad.append(ErrorDetail(path="limit", message=f"an integer from 1 to {deadletters.MAX_LIST}"))
            if after is not None and deadletters.parse_id(self.s.redis, after) is None:
                bad.append(ErrorDetail(path="after", message="the next of a previous page"))
            if bad:
                raise Refusal(422, "invalid_request", "bad query parameters", bad)
            items, nxt = await deadletters.list_dead(self.s.redis, stage, int(limit), after)
            page = bodies.convert([d.doc() for d in items], list[bodies.DeadLetterItem])
            return responses.json(bodies.DeadLetterList(items=page, next=nxt))

        return await self._guard(request, work)

    async def replay_dead_letter(self, request: Request) -> Response:
        return await self._resolve_dead_letter(request, None)

    async def discard_dead_letter(self, request: Request) -> Response:
        return await self._resolve_dead_letter(request, bodies.DiscardRequest)

    async def _resolve_dead_letter(self, request: Request, body_type: type[bodies.DiscardRequest] | None) -> Response:
        async def work() -> Response:
            dl_id = request.path_params["id"]
            reason = (await _body(request, body_type)).reason if body_type is not None else None
            try:
                if reason is None:
                    doc = await deadletters.replay(self.s.redis, dl_id)
                else:
                    doc = await deadletters.discard(self.s.redis, dl_id, reason)
            except deadletters.NotFound:
                return responses.error(404, "not_found", f"no unresolved dead letter {dl_id!r}")
            except deadletters.NotReplayable as exc:
                return responses.error(409, "not_replayable", str(exc))
            log.info(f"admin.dead_letter_{doc['resolution']}", **doc, reason=reason)
            return responses.json(bodies.convert(doc, bodies.DeadLetterResolved))

        return await self._guard(request, work)


def by_method(path: str, endpoints: dict[str, Endpoint]) -> Route:
    """One route for several methods of ``path``: a 405 then lists all of them in ``Allow``
    (two routes of one path would each list only their own)."""

    async def endpoint(request: Request) -> Response:
        return await endpoints["GET" if request.method == "HEAD" else request.method](request)

    return Route(path, endpoint, methods=list(endpoints))


def routes(state: Any) -> list[Route]:
    a = Admin(state)
    return [
        Route("/v1/admin/stock", a.put_stock, methods=["PUT"]),
        Route("/v1/admin/stock/{sku:path}", a.get_stock, methods=["GET"]),
        by_method("/v1/admin/warehouses", {"GET": a.get_warehouses, "PUT": a.put_warehouses}),
        Route("/v1/admin/coupons", a.put_coupons, methods=["PUT"]),
        by_method("/v1/admin/holds", {"GET": a.get_holds, "POST": a.post_hold}),
        Route("/v1/admin/holds/{province}", a.delete_hold, methods=["DELETE"]),
        Route("/v1/admin/dead-letters", a.get_dead_letters, methods=["GET"]),
        Route("/v1/admin/dead-letters/{id}/replay", a.replay_dead_letter, methods=["POST"]),
        Route("/v1/admin/dead-letters/{id}/discard", a.discard_dead_letter, methods=["POST"]),
        Route("/v1/review", a.get_review, methods=["GET"]),
        Route("/v1/review/{channel}/{order_id}/approve", a.approve, methods=["POST"]),
        Route("/v1/review/{channel}/{order_id}/reject", a.reject, methods=["POST"]),
    ]
