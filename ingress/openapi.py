"""``GET /openapi.json``: the HTTP API (contract §4) as OpenAPI 3.1, generated.

Schemas come from msgspec types (``msgspec.json.schema_components``): the ``Order``
the ingress decodes with, and the small Structs below that describe the response
bodies. The handlers do not use these Structs; the tests decode live answers with
them, so the document cannot drift from what the service says. Paths are the routes
the app really has: a route added later appears here, described generically until
it gets an entry in ``OPERATIONS``.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from orderq.schema import ErrorDetail, Money, Order, Sku, Text
from orderq.settings import Settings
from orderq.warehouses import WarehousesBody

Stage = Literal["normal", "degraded", "shedding"]
Priority = Literal["vip", "new", "regular"]
Status = Literal["accepted", "validated", "review", "held", "executed", "rejected"]


# --- bodies -----------------------------------------------------------------------------
class ErrorInfo(Struct):
    code: str
    message: str
    details: list[ErrorDetail]


class ErrorBody(Struct):
    """Every error the API answers (contract §4)."""

    error: ErrorInfo


class Accepted(Struct):
    """``POST /v1/orders``: 202 queued, or 200 ``duplicate: true`` for a known key."""

    order_key: str
    status: Literal["accepted"]
    duplicate: bool
    stage: Stage


class BatchRequest(Struct):
    """``POST /v1/orders/batch``. Each order is checked on its own: one bad order sinks only itself."""

    orders: Annotated[list[Order], Meta(min_length=1, max_length=1000)]


class BatchResult(Struct):
    order_key: str | None
    status: Literal["accepted", "duplicate", "invalid", "shed"]
    error: ErrorInfo | None


class BatchResponse(Struct):
    """Results in request order, and the count of each outcome."""

    results: list[BatchResult]
    accepted: int
    duplicates: int
    invalid: int
    shed: int


class Times(Struct, omit_defaults=True):
    """UTC, microseconds: ``2026-11-10T16:00:01.000000Z``."""

    accepted: str | UnsetType = UNSET
    validated: str | UnsetType = UNSET
    review: str | UnsetType = UNSET
    held: str | UnsetType = UNSET
    executed: str | UnsetType = UNSET
    rejected: str | UnsetType = UNSET


class ActionState(Struct, omit_defaults=True):
    name: Literal["wms.pick", "notify.sms", "invoice.request", "crm.remark_sync", "crm.gift_sync"]
    state: Literal["done", "deferred", "dropped", "failed"]
    warehouse: str | UnsetType = UNSET  # a routed order's pick: one per warehouse


class SkuQty(Struct):
    sku: str
    qty: int


class Parcel(Struct, omit_defaults=True):
    """What one warehouse ships of a routed order (issue 9), and which rules decided it."""

    warehouse: str
    carrier: str | None
    rule: str  # the rule that chose the warehouse (split: the order needed several)
    lines: list[SkuQty]
    carrier_rule: str | UnsetType = UNSET  # the rule that chose the carrier
    distance_km: float | UnsetType | None = UNSET  # null: the address could not be located
    freight: Money | UnsetType = UNSET  # the estimate
    gifts: list[SkuQty] | UnsetType = UNSET


class StatusRecord(Struct, omit_defaults=True):
    """An order's status record (contract §5)."""

    order_key: str
    status: Status
    priority: Priority | None
    reasons: list[str]
    risk_score: int
    times: Times
    actions: list[ActionState]
    fulfilment_id: str | UnsetType = UNSET
    route: Parcel | list[Parcel] | UnsetType = UNSET  # a list when the order was split
    error: str | UnsetType = UNSET  # rejected as `unprocessable`: what broke on it


class ReadyDepth(Struct):
    vip: int
    new: int
    regular: int


class Depth(Struct):
    intake: int
    ready: ReadyDepth
    review: int
    deferred: int


class Rates(Struct):
    accepted_per_s: float
    validated_per_s: float
    executed_per_s: float


class Totals(Struct):
    accepted: int
    duplicates: int
    invalid: int
    shed: int
    validated: int
    rejected: int
    review: int
    held: int
    executed: int
    dead_letters: int


class SyncCounts(Struct):
    deferred: int
    dropped: int
    replayed: int


class Worker(Struct):
    stage: str
    pid: int
    host: str


class Stats(Struct):
    """``GET /v1/stats`` and ``orderq status --json``."""

    stage: Stage
    backlog: int
    depth: Depth
    rates: Rates
    totals: Totals
    executed_by_priority: ReadyDepth
    syncs: SyncCounts
    held: int
    holds: list[str]
    workers: list[Worker]
    paused: list[Literal["validate", "execute"]]


class PauseRequest(Struct):
    stage: Literal["validate", "execute"]


class PauseResponse(Struct):
    stage: Literal["validate", "execute"]
    paused: bool


class Health(Struct):
    status: Literal["ok"]


class Ready(Struct):
    status: Literal["ready"]
    stage: Stage


class StockItem(Struct, omit_defaults=True):
    sku: Sku
    physical: Annotated[int, Meta(ge=0)]
    warehouse: str | None = None  # one warehouse's count; none: the SKU's total


class WarehouseStock(Struct):
    physical: int
    allocated: int  # shipped from it since its last count


class StockRequest(Struct):
    items: Annotated[list[StockItem], Meta(min_length=1)]


class StockView(Struct):
    """sellable = floor(physical x ORDERQ_STOCK_BUFFER) - reserved."""

    sku: str
    physical: int
    reserved: int
    sellable: int
    warehouses: dict[str, WarehouseStock] | UnsetType = UNSET  # counted per warehouse: physical is the sum


class StockViews(Struct):
    items: list[StockView]


class CouponRecord(Struct):
    code: Text
    platform: str
    amount: Money
    expires_at: Annotated[dt.datetime, Meta(tz=True)] | None = None
    single_use: bool = False


class CouponsRequest(Struct):
    coupons: Annotated[list[CouponRecord], Meta(min_length=1)]


class CouponsResponse(Struct):
    coupons: int


class HoldRequest(Struct):
    province: Text
    reason: str = ""


class Hold(Struct):
    province: str
    reason: str
    since: str


class Holds(Struct):
    holds: list[Hold]


class HoldLifted(Struct):
    province: str
    released: int


class ReviewItem(Struct):
    order_key: str
    reasons: list[str]
    risk_score: int
    since: str


class ReviewList(Struct):
    """Orders waiting for a reviewer, oldest first."""

    items: list[ReviewItem]


class DeadLetterItem(Struct):
    """An unresolved dead letter; ``id`` is opaque (it names where the entry is)."""

    id: str
    stage: Literal["validate", "execute", "dispatch"]
    order_key: str
    action: str | None  # dispatch: the action the downstream refused; else null
    error: str  # the last error
    deliveries: int
    since: str  # when it was dead-lettered (UTC)


class DeadLetterList(Struct):
    """Oldest first; ``next`` is the ``after`` of the next page (null: no more)."""

    items: list[DeadLetterItem]
    next: str | None


class DiscardRequest(Struct):
    reason: Annotated[str, Meta(min_length=1, max_length=500)]


class DeadLetterResolved(Struct):
    """The dead letter as it was, how it was resolved, and its order's status now."""

    id: str
    stage: Literal["validate", "execute", "dispatch"]
    order_key: str
    action: str | None
    error: str
    deliveries: int
    since: str
    resolution: Literal["replayed", "discarded"]
    status: str | None  # null: no status record


class DeadLetterSummary(Struct):
    unresolved: int
    oldest: list[DeadLetterItem]


class SampleDepth(Struct):
    intake: int
    vip: int
    new: int
    regular: int
    review: int
    deferred: int


class SampleTotals(Struct):
    accepted: int
    validated: int
    executed: int
    rejected: int
    review: int
    dead_letters: int


class SampleRates(Struct):
    accepted: float
    validated: float
    executed: float
    rejected: float


class Sample(Struct):
    """One second of history; ``rates`` are the totals' deltas since the sample before."""

    ts: float
    stage: Stage
    backlog: int
    depth: SampleDepth
    totals: SampleTotals
    rates: SampleRates


class ActiveAlert(Struct):
    """An alert that holds now; its details (e.g. ``sku``, ``lag_s``) follow as extra fields."""

    alert: str
    kind: Literal["order_surge", "execution_lag", "dead_letters", "sku_out_of_stock"]
    since: str
    text: str


class Thresholds(Struct):
    open_depth: int
    close_depth: int
    shed_depth: int
    shed_vip_depth: int


class DashboardData(Struct):
    """``GET /dashboard/data``: the cached stats and the samples newer than ``since``."""

    stats: Stats
    reasons: dict[str, int]
    alerts: list[ActiveAlert]
    holds: list[Hold]
    dead_letters: DeadLetterSummary
    thresholds: Thresholds
    computed_at: float
    history: list[Sample]
    history_newest: float | None


# --- operations -------------------------------------------------------------------------
JSON = "application/json"


@dataclass(frozen=True)
class Op:
    summary: str
    auth: str | None  # key of SECURITY, None: open
    ok: tuple[tuple[int, str, Any], ...]  # (status, description, Struct type or a media type string)
    errors: tuple[int, ...] = ()
    body: Any = None
    query: tuple[tuple[str, str, dict[str, Any]], ...] = ()  # (name, description, schema)


ORDER_ERRORS = (400, 401, 403, 413, 415, 422, 429, 503)
ADMIN_ERRORS = (401, 403, 503)

OPERATIONS: dict[tuple[str, str], Op] = {
    ("POST", "/v1/orders"): Op(
        "Submit one order",
        "channel",
        ((202, "durably queued", Accepted), (200, "a replay of a known order key: nothing queued", Accepted)),
        ORDER_ERRORS,
        Order,
    ),
    ("POST", "/v1/orders/batch"): Op(
        "Submit up to ORDERQ_BATCH_MAX orders",
        "channel",
        ((202, "each order's outcome, in request order", BatchResponse),),
        ORDER_ERRORS,
        BatchRequest,
    ),
    ("GET", "/v1/orders/{channel}/{order_id}"): Op(
        "An order's status record",
        "channel_or_admin",
        ((200, "the status record", StatusRecord),),
        (401, 403, 404, 503),
    ),
    ("GET", "/v1/stats"): Op("Backlog, depth, rates, totals, workers", "admin", ((200, "stats", Stats),), ADMIN_ERRORS),
    ("POST", "/v1/admin/pause"): Op(
        "Stop a stage taking new work",
        "admin",
        ((200, "paused", PauseResponse),),
        (*ADMIN_ERRORS, 415, 422),
        PauseRequest,
    ),
    ("POST", "/v1/admin/resume"): Op(
        "Let a stage take work again",
        "admin",
        ((200, "resumed", PauseResponse),),
        (*ADMIN_ERRORS, 415, 422),
        PauseRequest,
    ),
    ("PUT", "/v1/admin/stock"): Op(
        "Set physical stock", "admin", ((200, "stock now", StockViews),), (*ADMIN_ERRORS, 400, 415, 422), StockRequest
    ),
    ("GET", "/v1/admin/stock/{sku}"): Op(
        "A SKU's stock", "admin", ((200, "stock now", StockView),), (*ADMIN_ERRORS, 404)
    ),
    ("PUT", "/v1/admin/warehouses"): Op(
        "Set the warehouses (the whole set)",
        "admin",
        ((200, "warehouses now", WarehousesBody),),
        (*ADMIN_ERRORS, 400, 409, 415, 422),
        WarehousesBody,
    ),
    ("GET", "/v1/admin/warehouses"): Op(
        "The warehouses", "admin", ((200, "warehouses", WarehousesBody),), ADMIN_ERRORS
    ),
    ("PUT", "/v1/admin/coupons"): Op(
        "Create or update coupons",
        "admin",
        ((200, "coupons written", CouponsResponse),),
        (*ADMIN_ERRORS, 400, 415, 422),
        CouponsRequest,
    ),
    ("POST", "/v1/admin/holds"): Op(
        "Hold shipping to a province", "admin", ((201, "the hold", Hold),), (*ADMIN_ERRORS, 400, 415, 422), HoldRequest
    ),
    ("GET", "/v1/admin/holds"): Op("Region holds in force", "admin", ((200, "holds", Holds),), ADMIN_ERRORS),
    ("DELETE", "/v1/admin/holds/{province}"): Op(
        "Lift a region hold", "admin", ((200, "lifted; held orders sent on", HoldLifted),), (*ADMIN_ERRORS, 404)
    ),
    ("GET", "/v1/review"): Op(
        "Orders waiting for manual review",
        "admin",
        ((200, "oldest first", ReviewList),),
        (*ADMIN_ERRORS, 422),
        query=(("limit", "how many, oldest first", {"type": "integer", "minimum": 1, "default": 100}),),
    ),
    ("POST", "/v1/review/{channel}/{order_id}/approve"): Op(
        "Approve: send the order on to execution",
        "admin",
        ((200, "the status record", StatusRecord),),
        (*ADMIN_ERRORS, 404, 409),
    ),
    ("POST", "/v1/review/{channel}/{order_id}/reject"): Op(
        "Reject: release the order's stock",
        "admin",
        ((200, "the status record", StatusRecord),),
        (*ADMIN_ERRORS, 404, 409),
    ),
    ("GET", "/v1/admin/dead-letters"): Op(
        "Unresolved dead letters, oldest first",
        "admin",
        ((200, "a page of dead letters", DeadLetterList),),
        (*ADMIN_ERRORS, 422),
        query=(
            ("stage", "only this stage's", {"enum": ["validate", "execute", "dispatch"]}),
            ("limit", "how many", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
            ("after", "the next of the page before", {"type": "string"}),
        ),
    ),
    ("POST", "/v1/admin/dead-letters/{id}/replay"): Op(
        "Put a dead letter back where it failed (once in effect)",
        "admin",
        ((200, "replayed", DeadLetterResolved),),
        (*ADMIN_ERRORS, 404, 409),
    ),
    ("POST", "/v1/admin/dead-letters/{id}/discard"): Op(
        "Resolve a dead letter for good: the order rejected (discarded, its holds released) or the action failed",
        "admin",
        ((200, "discarded", DeadLetterResolved),),
        (*ADMIN_ERRORS, 400, 404, 415, 422),
        DiscardRequest,
    ),
    ("GET", "/metrics"): Op("Prometheus metrics", None, ((200, "text exposition format", "text/plain"),), (503,)),
    ("GET", "/healthz"): Op("Liveness", None, ((200, "alive", Health),)),
    ("GET", "/readyz"): Op(
        "Readiness: Redis reachable, and not refusing every order (VIP included)",
        None,
        ((200, "ready", Ready),),
        (503,),
    ),
    ("GET", "/dashboard"): Op(
        "The operators' live page",
        "dashboard",
        ((200, "the page", "text/html"), (303, "token accepted: cookie set, redirect to /dashboard", None)),
        (401, 403),
        query=(("token", "the admin token, once; kept as an HttpOnly cookie", {"type": "string"}),),
    ),
    ("GET", "/dashboard/data"): Op(
        "The dashboard's data",
        "dashboard",
        ((200, "cached stats and history", DashboardData),),
        (401, 403, 422, 503),
        query=(("since", "only samples newer than this time (s since the epoch)", {"type": "number"}),),
    ),
    ("GET", "/openapi.json"): Op("This document", None, ((200, "OpenAPI 3.1", JSON),)),
}

ERRORS = {
    400: "not JSON",
    401: "no token, or a wrong one",
    403: "a token that may not do this (another channel's, or not the admin token)",
    404: "unknown",
    409: "not in a state that allows this",
    413: "body too large (ORDERQ_MAX_BODY_BYTES)",
    415: "Content-Type is not application/json",
    422: "fails the schema: every failing path in details",
    429: "over the channel's ORDERQ_CHANNEL_RATE; see Retry-After",
    503: "shedding load or Redis unavailable; see Retry-After",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}

SECURITY_SCHEMES = {
    "channelToken": {"type": "http", "scheme": "bearer", "description": "the order's channel token"},
    "adminToken": {"type": "http", "scheme": "bearer", "description": "ORDERQ_ADMIN_TOKEN"},
    "dashboardCookie": {
        "type": "apiKey",
        "in": "cookie",
        "name": "orderq_dashboard",
        "description": "set by /dashboard?token=<ORDERQ_ADMIN_TOKEN>",
    },
}
SECURITY: dict[str | None, list[dict[str, list[str]]]] = {
    None: [],
    "channel": [{"channelToken": []}],
    "admin": [{"adminToken": []}],
    "channel_or_admin": [{"channelToken": []}, {"adminToken": []}],
    "dashboard": [{"adminToken": []}, {"dashboardCookie": []}],
}
_PARAM = re.compile(r"{(\w+)(?::\w+)?}")


def _ref(t: Any) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{t.__name__}"}


def _content(t: Any) -> dict[str, Any] | None:
    if t is None:
        return None
    if isinstance(t, str):
        return {t: {"schema": {"type": "string"}} if t != JSON else {}}
    return {JSON: {"schema": _ref(t)}}


def _operation(method: str, path: str, route: Route, op: Op | None) -> dict[str, Any]:
    if op is None:  # a route with no entry yet: still listed, honestly generic
        admin = path.startswith(("/v1/admin", "/v1/review"))
        doc = (getattr(route.endpoint, "__doc__", None) or "").strip().split("\n")[0]
        op = Op(
            doc or f"{method} {path}", "admin" if admin else None, ((200, "OK", JSON),), ADMIN_ERRORS if admin else ()
        )
    out: dict[str, Any] = {
        "summary": op.summary,
        "operationId": f"{method.lower()}_{re.sub(r'[^a-z0-9]+', '_', path.lower()).strip('_')}",
        "security": SECURITY[op.auth],
    }
    params = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PARAM.findall(route.path)
    ]
    params += [{"name": n, "in": "query", "required": False, "description": d, "schema": s} for n, d, s in op.query]
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {"required": True, "content": _content(op.body)}
    responses: dict[str, Any] = {}
    for status, description, t in op.ok:
        resp: dict[str, Any] = {"description": description}
        content = _content(t)
        if content:
            resp["content"] = content
        responses[str(status)] = resp
    for status in op.errors:
        resp = {"description": ERRORS[status], "content": {JSON: {"schema": _ref(ErrorBody)}}}
        if status in (429, 503):
            resp["headers"] = RETRY_AFTER
        responses[str(status)] = resp
    out["responses"] = responses
    return out


def build(routes: list[BaseRoute], settings: Settings) -> dict[str, Any]:
    """The OpenAPI document for ``routes`` (the app's own route list)."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route) or not route.methods:
            continue
        path = _PARAM.sub(r"{\1}", route.path)
        for method in sorted(route.methods - {"HEAD"}):
            paths.setdefault(path, {})[method.lower()] = _operation(method, path, route, OPERATIONS.get((method, path)))
    types = {ErrorBody}
    for op in OPERATIONS.values():
        for t in (op.body, *(t for _, _, t in op.ok)):
            if t is not None and not isinstance(t, str):
                types.add(t)
    _, schemas = msgspec.json.schema_components(
        sorted(types, key=lambda t: t.__name__), ref_template="#/components/schemas/{name}"
    )
    schemas["BatchRequest"]["properties"]["orders"]["maxItems"] = settings.batch_max
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "orderq",
            "version": "1",
            "description": "Order-intake queue for peak sales. Every error is an ErrorBody; money is a "
            "decimal string; times are RFC 3339 (answers in UTC to the microsecond).",
        },
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": dict(sorted(schemas.items())), "securitySchemes": SECURITY_SCHEMES},
    }


def route(routes: list[BaseRoute], settings: Settings) -> Route:
    """``GET /openapi.json`` over ``routes`` (this route included), built on first use."""
    cached: list[bytes] = []

    async def openapi(request: Request) -> Response:
        if not cached:
            listed = routes if this in routes else [*routes, this]
            cached.append(msgspec.json.encode(build(listed, settings)))
        return Response(cached[0], 200, media_type="application/json")

    this = Route("/openapi.json", openapi, methods=["GET"])
    return this
