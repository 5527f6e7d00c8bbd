"""``GET /openapi.json``: the HTTP API (contract §4, §5, §7) as OpenAPI 3.1, generated.

Schemas are the Structs the handlers decode and answer with (:mod:`ingress.bodies`,
``Order`` from :mod:`orderq.schema`), through ``msgspec.json.schema_components``. Paths
are the routes the app really has; ``OPERATIONS`` says, per route, who may call it and
every status it can answer, and ``_constrain`` adds what depends on the settings (the
channel set, ``ORDERQ_BATCH_MAX``, the partitions) or what a Struct cannot say (``lat``
and ``lng`` together). ``tests/test_openapi_fuzz.py`` holds the service to this document
with a schema-driven fuzzer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ingress import bodies as b
from orderq import deadletters, geo, keys, schema
from orderq.ledger import review
from orderq.schema import Order
from orderq.settings import Settings

JSON = "application/json"
HTML = "text/html"
AnyJson: dict[str, Any] = {}  # any JSON value: a channel's own payload, checked by its mapping file


@dataclass(frozen=True)
class Op:
    summary: str
    auth: str | None  # key of SECURITY; None: open
    ok: tuple[tuple[int, str, Any], ...]  # (status, description, Struct type, media type or a schema)
    errors: tuple[int, ...] = ()
    body: Any = None  # a Struct type, or a schema (dict)
    query: tuple[tuple[str, str, dict[str, Any]], ...] = ()  # (name, description, schema)
    headers: tuple[tuple[str, str, dict[str, Any]], ...] = ()  # request headers, optional
    path: dict[str, dict[str, Any]] = field(default_factory=dict)  # path parameter schemas


# What any route that reads a body may answer besides its own errors: 400 not JSON, 408 body
# not arrived within ORDERQ_READ_DEADLINE_S, 413 over the cap, 415 not a JSON content type.
BODY = (400, 408, 413, 415)
ORDER = (*BODY, 401, 403, 422, 429, 503)
ADMIN = (401, 403, 503)
LIMIT = {"type": "integer", "minimum": 1, "default": 100}
QUEUED = ((202, "durably queued", b.Accepted), (200, "a replay of a known order key: nothing queued", b.Accepted))
CHANNEL_PATH = "one of the configured channels (ORDERQ_CHANNELS); 404 when it has no mapping file"

OPERATIONS: dict[tuple[str, str], Op] = {
    ("POST", "/v1/orders"): Op("Submit one order", "channel", QUEUED, ORDER, Order),
    ("POST", "/v1/orders/batch"): Op(
        "Submit up to ORDERQ_BATCH_MAX orders",
        "channel",
        ((202, "each order's outcome, in request order", b.BatchResponse),),
        ORDER,
        b.BatchRequest,
    ),
    ("GET", "/v1/orders/{channel}/{order_id}"): Op(
        "An order's status record", "channel_or_admin", ((200, "the status record", b.StatusRecord),), (*ADMIN, 404)
    ),
    ("POST", "/v1/channels/{channel}/orders"): Op(
        "Submit one order in the channel's own format (its mapping file says how it reads), or the "
        "channel's own cancel or refund message (its [[cancel]] entries), which cancels like the cancel endpoint",
        "channel",
        (
            (202, "durably queued, or a cancel under way", (b.Accepted, b.Cancelled)),
            (200, "a replay of a known order key (nothing queued), or cancelled", (b.Accepted, b.Cancelled)),
        ),
        (*ORDER, 404, 409),
        AnyJson,
        path={"channel": {"description": CHANNEL_PATH}},
    ),
    ("POST", "/v1/channels/{channel}/orders/batch"): Op(
        "Submit orders in the channel's own format; each is checked on its own",
        "channel",
        ((202, "each order's outcome, in request order", b.BatchResponse),),
        (*ORDER, 404),
        {
            "type": "object",
            "properties": {"orders": {"type": "array", "minItems": 1, "maxItems": 1000}},
            "required": ["orders"],
        },
        path={"channel": {"description": CHANNEL_PATH}},
    ),
    ("POST", "/v1/webhooks/shopify"): Op(
        "Shopify's orders/create webhook (queued like POST /v1/orders) or orders/cancelled (cancels), signed",
        "shopify",
        (
            (202, "queued, or a cancel under way", (b.Accepted, b.Cancelled)),
            (200, "a replay of a known order (nothing queued), or cancelled", (b.Accepted, b.Cancelled)),
        ),
        (*BODY, 401, 404, 409, 422, 429, 503),
        AnyJson,
        headers=(
            ("X-Shopify-Topic", "another topic is refused (422)", {"enum": ["orders/create", "orders/cancelled"]}),
            ("X-Shopify-Webhook-Id", "a redelivery of a known id is a duplicate", {"type": "string", "maxLength": 128}),
        ),
    ),
    ("POST", "/v1/orders/{channel}/{order_id}/cancel"): Op(
        "Cancel an order (once shipped: 409 too_late, a return is the way)",
        "channel_or_admin",
        ((200, "cancelled", b.Cancelled), (202, "intercepting, or waiting for the order", b.Cancelled)),
        (*ADMIN, *BODY, 404, 409, 422),
        b.CancelRequest,
    ),
    ("POST", "/v1/orders/{channel}/{order_id}/events"): Op(
        "An order event from a downstream system (idempotent by source, status and tracking number)",
        "source_or_admin",
        ((202, "the order's public status after it", b.EventTaken),),
        (*ADMIN, *BODY, 404, 422),
        b.OrderEvent,
    ),
    ("GET", "/v1/stats"): Op("Backlog, depth, rates, totals, workers", "admin", ((200, "stats", b.Stats),), ADMIN),
    ("POST", "/v1/admin/pause"): Op(
        "Stop a stage taking new work",
        "admin",
        ((200, "paused", b.PauseResponse),),
        (*ADMIN, *BODY, 422),
        b.PauseRequest,
    ),
    ("POST", "/v1/admin/resume"): Op(
        "Let a stage take work again",
        "admin",
        ((200, "resumed", b.PauseResponse),),
        (*ADMIN, *BODY, 422),
        b.PauseRequest,
    ),
    ("PUT", "/v1/admin/stock"): Op(
        "Set physical stock (a warehouse's count needs the warehouse to exist: else 422)",
        "admin",
        ((200, "stock now", b.StockViews),),
        (*ADMIN, *BODY, 422),
        b.StockRequest,
    ),
    ("GET", "/v1/admin/stock/{sku}"): Op("A SKU's stock", "admin", ((200, "stock now", b.StockView),), (*ADMIN, 404)),
    ("PUT", "/v1/admin/warehouses"): Op(
        "Set the warehouses (the whole set; ids unique)",
        "admin",
        ((200, "warehouses now", b.Warehouses),),
        (*ADMIN, *BODY, 409, 422),
        b.Warehouses,
    ),
    ("GET", "/v1/admin/warehouses"): Op("The warehouses", "admin", ((200, "warehouses", b.Warehouses),), ADMIN),
    ("PUT", "/v1/admin/coupons"): Op(
        "Create or update coupons",
        "admin",
        ((200, "coupons written", b.CouponsWritten),),
        (*ADMIN, *BODY, 422),
        b.CouponsRequest,
    ),
    ("POST", "/v1/admin/holds"): Op(
        "Hold shipping to a province", "admin", ((201, "the hold", b.Hold),), (*ADMIN, *BODY, 422), b.HoldRequest
    ),
    ("GET", "/v1/admin/holds"): Op("Region holds in force", "admin", ((200, "holds", b.Holds),), ADMIN),
    ("DELETE", "/v1/admin/holds/{province}"): Op(
        "Lift a region hold", "admin", ((200, "lifted; held orders sent on", b.HoldLifted),), (*ADMIN, 404)
    ),
    ("GET", "/v1/review"): Op(
        "Orders waiting for manual review",
        "admin",
        ((200, "oldest first", b.ReviewList),),
        (*ADMIN, 422),
        query=(("limit", "how many, oldest first", {**LIMIT, "maximum": review.MAX_LIST}),),
    ),
    ("POST", "/v1/review/{channel}/{order_id}/approve"): Op(
        "Approve: send the order on to execution",
        "admin",
        ((200, "the status record", b.StatusRecord),),
        (*ADMIN, 404, 409),
    ),
    ("POST", "/v1/review/{channel}/{order_id}/reject"): Op(
        "Reject: release the order's stock",
        "admin",
        ((200, "the status record", b.StatusRecord),),
        (*ADMIN, 404, 409),
    ),
    ("GET", "/v1/admin/dead-letters"): Op(
        "Unresolved dead letters, oldest first",
        "admin",
        ((200, "a page of dead letters", b.DeadLetterList),),
        (*ADMIN, 422),
        query=(
            ("stage", "only this stage's (empty: every stage)", {"type": "string", "enum": ["", *deadletters.STAGES]}),
            ("limit", "how many", {**LIMIT, "maximum": deadletters.MAX_LIST}),
            ("after", "the next of the page before", {"type": "string"}),  # pattern: _constrain
        ),
    ),
    ("POST", "/v1/admin/dead-letters/{id}/replay"): Op(
        "Put a dead letter back where it failed (once in effect)",
        "admin",
        ((200, "replayed", b.DeadLetterResolved),),
        (*ADMIN, 404, 409),
    ),
    ("POST", "/v1/admin/dead-letters/{id}/discard"): Op(
        "Resolve a dead letter for good: the order rejected (discarded, its holds released) or the action failed",
        "admin",
        ((200, "discarded", b.DeadLetterResolved),),
        (*ADMIN, *BODY, 404, 409, 422),
        b.DiscardRequest,
    ),
    ("GET", "/v1/admin/connectors"): Op(
        "Each pull connector's cursor, lag, last error and counts",
        "admin",
        ((200, "the connectors", b.Connectors),),
        ADMIN,
    ),
    ("GET", "/metrics"): Op("Prometheus metrics", None, ((200, "text exposition format", "text/plain"),), (503,)),
    ("GET", "/healthz"): Op("Liveness", None, ((200, "alive", b.Health),)),
    ("GET", "/readyz"): Op(
        "Readiness: Redis reachable, and not refusing every order (VIP included)",
        None,
        ((200, "ready", b.Ready),),
        (503,),
    ),
    ("GET", "/dashboard"): Op(
        "The operators' live page",
        "dashboard",
        ((200, "the page", HTML), (303, "token accepted: cookie set, redirect to /dashboard", None)),
        (401, 403),
        query=(("token", "the admin token, once; kept as an HttpOnly cookie", {"type": "string"}),),
    ),
    ("GET", "/dashboard/data"): Op(
        "The dashboard's data",
        "dashboard",
        ((200, "cached stats and history", b.DashboardData),),
        (401, 403, 422, 503),
        query=(("since", "only samples newer than this time (s since the epoch)", {"type": "number"}),),
    ),
    ("GET", "/openapi.json"): Op("This document", None, ((200, "OpenAPI 3.1", {"type": "object"}),)),
    ("GET", "/static/dashboard.css"): Op("The dashboard's stylesheet", None, ((200, "CSS", "text/css"),)),
    ("GET", "/static/dashboard.js"): Op("The dashboard's script", None, ((200, "JavaScript", "text/javascript"),)),
}

ERRORS = {
    400: "not JSON",
    401: "no token, or a wrong one",
    403: "a token that may not do this (another channel's, or not the admin token)",
    404: "unknown",
    408: "the body did not arrive within ORDERQ_READ_DEADLINE_S",
    409: "not in a state that allows this",
    413: "body too large (ORDERQ_MAX_BODY_BYTES)",
    415: "Content-Type is not application/json",
    422: "fails the schema: every failing path in details",
    429: "over the channel's ORDERQ_CHANNEL_RATE; see Retry-After",
    503: "shedding load, overloaded or Redis unavailable; see Retry-After",
}
INTEGER = {"type": "integer"}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": INTEGER}}
LOCATION = {"Location": {"description": "/dashboard", "schema": {"type": "string"}}}

SECURITY_SCHEMES = {
    "channelToken": {"type": "http", "scheme": "bearer", "description": "the order's channel token"},
    "adminToken": {"type": "http", "scheme": "bearer", "description": "ORDERQ_ADMIN_TOKEN"},
    "dashboardCookie": {
        "type": "apiKey",
        "in": "cookie",
        "name": "orderq_dashboard",
        "description": "set by /dashboard?token=<ORDERQ_ADMIN_TOKEN>",
    },
    "sourceToken": {"type": "http", "scheme": "bearer", "description": "a source's ORDERQ_SOURCE_TOKENS token"},
    "shopifyHmac": {
        "type": "apiKey",
        "in": "header",
        "name": "X-Shopify-Hmac-Sha256",
        "description": "base64 HMAC-SHA256 of the raw body under ORDERQ_SHOPIFY_SECRET",
    },
}
SECURITY: dict[str | None, list[dict[str, list[str]]]] = {
    None: [],
    "channel": [{"channelToken": []}],
    "admin": [{"adminToken": []}],
    "channel_or_admin": [{"channelToken": []}, {"adminToken": []}],
    "dashboard": [{"adminToken": []}, {"dashboardCookie": []}],
    "shopify": [{"shopifyHmac": []}],
    "source_or_admin": [{"sourceToken": []}, {"adminToken": []}],
}
_PARAM = re.compile(r"{(\w+)(?::\w+)?}")


def _schema_of(t: Any) -> dict[str, Any]:
    """A Struct type -> its ``$ref``; several (a tuple) -> any of them; a schema (dict) as it is."""
    if isinstance(t, tuple):
        return {"anyOf": [_schema_of(one) for one in t]}
    return t if isinstance(t, dict) else {"$ref": f"#/components/schemas/{t.__name__}"}


def _content(t: Any) -> dict[str, Any] | None:
    if t is None:
        return None
    if isinstance(t, str):  # a media type of its own
        return {t: {"schema": {"type": "string"}}}
    return {JSON: {"schema": _schema_of(t)}}


def _error(status: int, op: Op) -> dict[str, Any]:
    content: dict[str, Any] = {JSON: {"schema": _schema_of(b.ErrorBody)}}
    if op.auth == "dashboard" and status == 401:  # a browser (Accept: text/html) gets a page saying how
        content[HTML] = {"schema": {"type": "string"}}
    out: dict[str, Any] = {"description": ERRORS[status], "content": content}
    if status in (429, 503):
        out["headers"] = RETRY_AFTER
    return out


def _operation(method: str, path: str, route: Route, op: Op | None) -> dict[str, Any]:
    if op is None:  # a route with no entry yet: still listed, honestly generic
        admin = path.startswith(("/v1/admin", "/v1/review"))
        doc = (getattr(route.endpoint, "__doc__", None) or "").strip().split("\n")[0]
        op = Op(doc or f"{method} {path}", "admin" if admin else None, ((200, "OK", AnyJson),), ADMIN if admin else ())
    out: dict[str, Any] = {
        "summary": op.summary,
        "operationId": f"{method.lower()}_{re.sub(r'[^a-z0-9]+', '_', path.lower()).strip('_')}",
        "security": SECURITY[op.auth],
    }
    params = [
        {"name": n, "in": "path", "required": True, "schema": {"type": "string", **op.path.get(n, {})}}
        for n in _PARAM.findall(route.path)
    ]
    params += [{"name": n, "in": "query", "required": False, "description": d, "schema": s} for n, d, s in op.query]
    params += [{"name": n, "in": "header", "required": False, "description": d, "schema": s} for n, d, s in op.headers]
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
        if status == 303:
            resp["headers"] = LOCATION
        responses[str(status)] = resp
    for status in op.errors:
        responses[str(status)] = _error(status, op)
    out["responses"] = responses
    return out


def _dead_letter_id(partitions: int) -> str:
    """The ids ``deadletters.parse_id`` takes: a stage letter, a partition index that exists
    (up to 4 digits, leading zeros allowed), then a stream id; or empty (the first page)."""
    index = "|".join(f"0{{0,{4 - len(str(i))}}}{i}" for i in range(partitions))
    return f"^(?:[ved](?:{index})-[0-9]{{1,20}}-[0-9]{{1,20}})?$"


def _money_at_most(cents: int) -> str:
    """Money's pattern, bounded (``cents`` a power of ten yuan): what ``validation_details`` takes."""
    top = str(cents // 100)
    return f"^(?:(?:0|[1-9][0-9]{{0,{len(top) - 2}}})(?:\\.[0-9]{{1,2}})?|{top}(?:\\.0{{1,2}})?)$"


def _constrain(schemas: dict[str, Any], paths: dict[str, Any], settings: Settings) -> None:
    """What the handlers check beyond the Structs' own constraints."""
    channels = {"type": "string", "enum": list(settings.channels)}
    schemas["Order"]["properties"]["channel"] = channels  # the configured channel set
    # the money bounds of one field (those across fields, e.g. the goods total, are the handler's)
    schemas["Order"]["properties"]["paid_amount"]["pattern"] = _money_at_most(schema.ORDER_MAX_CENTS)
    for name in ("unit_price", "paid_price"):
        schemas["Line"]["properties"][name]["anyOf"][0]["pattern"] = _money_at_most(schema.PRICE_MAX_CENTS)
    schemas["CouponRecord"]["properties"]["platform"] = channels
    schemas["BatchRequest"]["properties"]["orders"]["maxItems"] = settings.batch_max
    warehouse = schemas["Warehouse"]
    warehouse["properties"]["id"]["not"] = {"const": keys.DEFAULT_WAREHOUSE}  # names stock put without one
    # lat and lng together; without them, a province orderq/geo.py can locate
    warehouse["anyOf"] = [
        {"properties": {"lat": {"type": "number"}, "lng": {"type": "number"}}, "required": ["lat", "lng"]},
        {
            "properties": {
                "lat": {"type": "null"},
                "lng": {"type": "null"},
                "province": {"enum": sorted(n for names in geo.PROVINCES for n in names.split("|"))},
            }
        },
    ]
    for path, item in paths.items():
        for op in item.values():
            for p in op.get("parameters", ()):
                if path.startswith("/v1/channels/") and p["name"] == "channel":
                    p["schema"]["enum"] = list(settings.channels)
                if path == "/v1/admin/dead-letters" and p["name"] == "after":
                    p["schema"]["pattern"] = _dead_letter_id(settings.partitions)
            body = op.get("requestBody", {}).get("content", {}).get(JSON, {}).get("schema", {})
            if "orders" in body.get("properties", {}):  # a channel batch: its own size bound
                body["properties"]["orders"]["maxItems"] = settings.batch_max


def build(routes: list[BaseRoute], settings: Settings) -> dict[str, Any]:
    """The OpenAPI document for ``routes`` (the app's own route list)."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route) or not route.methods:
            continue
        path = _PARAM.sub(r"{\1}", route.path)
        for method in sorted(route.methods - {"HEAD"}):
            paths.setdefault(path, {})[method.lower()] = _operation(method, path, route, OPERATIONS.get((method, path)))
    types: set[type] = {b.ErrorBody}
    for op in OPERATIONS.values():
        for t in (op.body, *(t for _, _, t in op.ok)):
            types.update(one for one in (t if isinstance(t, tuple) else (t,)) if isinstance(one, type))
    _, schemas = msgspec.json.schema_components(
        sorted(types, key=lambda t: t.__name__), ref_template="#/components/schemas/{name}"
    )
    _constrain(schemas, paths, settings)
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
