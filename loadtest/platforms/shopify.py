"""Shopify REST Admin: ``GET /admin/api/<version>/orders.json`` with ``updated_at_min``/
``updated_at_max`` and ``status=any``, ``limit`` 250 at most, sorted by ``updated_at`` then id;
the next page is named by the ``Link`` header's ``page_info`` (a keyset cursor; with it, only
``limit`` may be given). ``X-Shopify-Access-Token`` is checked (401); throttling is ``429`` with
``Retry-After`` (its leaky bucket)."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from loadtest.platforms.base import SECRETS, Platform, SimOrder, json_response

API = "/admin/api/{version}/orders.json"


def iso(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def parse(text: str) -> int:
    return int(dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())


class ShopifySim(Platform):
    name = "shopify"
    sample = "shopify"
    open_status = "paid"
    moved_status = "partially_refunded"
    closed_status = "refunded"

    def new_order(self, n: int, modified: int) -> SimOrder:
        t = self.template_copy()
        oid = 5_950_000_000_000 + n
        t.update(id=oid, name=f"#{10000 + n}", order_number=10000 + n, created_at=iso(modified))
        o = SimOrder(str(oid), modified, 0.0, self.open_status, t)
        self.set_status(o, self.open_status, modified)
        return o

    def set_status(self, o: SimOrder, status: str, modified: int) -> None:
        o.status, o.modified = status, modified
        o.payload["financial_status"], o.payload["updated_at"] = status, iso(modified)
        if status == "refunded":
            o.payload["cancelled_at"] = iso(modified)
            o.payload["cancel_reason"] = "customer"

    def routes(self) -> list[Route]:
        return [Route(API, self.orders_json, methods=["GET"])]

    async def orders_json(self, request: Request) -> Response:
        fault = self.gate()
        if fault == "5xx":
            return Response("service unavailable", status_code=503)
        if fault == "throttle":
            return json_response({"errors": "Exceeded 2 calls per second for api client."}, 429, {"Retry-After": "1.0"})
        if request.headers.get("x-shopify-access-token") != SECRETS["access_token"]:
            return json_response({"errors": "[API] Invalid API key or access token"}, 401)
        q = dict(request.query_params)
        try:
            limit = int(q.get("limit", "50"))
            if "page_info" in q:
                if set(q) - {"page_info", "limit", "fields"}:
                    return json_response(
                        {"errors": {"page_info": ["only limit and fields may go with page_info"]}}, 400
                    )
                cur = json.loads(base64.urlsafe_b64decode(q["page_info"]))
                lo, hi, after = cur["min"], cur["max"], (cur["u"], cur["id"])
            else:
                lo, hi, after = parse(q["updated_at_min"]), parse(q["updated_at_max"]), None
        except (KeyError, ValueError) as exc:
            return json_response({"errors": f"bad request: {exc}"}, 400)
        if not 1 <= limit <= 250:
            return json_response({"errors": {"limit": ["must be 1..250"]}}, 400)
        listed = self.window(lo, hi, desc=False)
        self.stats.pages += 1
        if after is not None:
            listed = [o for o in listed if (o.modified, int(o.id)) > (after[0], after[1])]
        page: list[SimOrder] = listed[:limit]
        headers: dict[str, str] = {}
        if len(listed) > limit:
            last = page[-1]
            info = base64.urlsafe_b64encode(
                json.dumps({"min": lo, "max": hi, "u": last.modified, "id": int(last.id)}).encode()
            )
            query = urlencode({"limit": limit, "page_info": info.decode()})
            url = f"{request.base_url}{request.url.path.lstrip('/')}?{query}"
            headers["Link"] = f'<{url}>; rel="next"'
        body: dict[str, Any] = {"orders": [o.payload for o in page]}
        out = json_response(body, 200, headers)
        self.after_page(listed)
        return out
