"""Shopify (REST Admin API): ``GET /admin/api/<version>/orders.json?status=any&updated_at_min=…
&updated_at_max=…`` lists orders by update time, 250 a page, the next page named by the ``Link``
header (``rel="next"``, a ``page_info`` cursor: keyset paging, which an update during the read
does not shift). Authenticated by ``X-Shopify-Access-Token``; ``429`` (its leaky bucket) is
retried after ``Retry-After``, as are 5xx; other 4xx are given up.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from connect.adapters.base import Adapter, Fetched
from connect.http import call, json_of

API_VERSION = "2024-10"
_NEXT = re.compile(r'<([^>]+)>;\s*rel="next"')


def next_link(header: str) -> str | None:
    m = _NEXT.search(header or "")
    return m.group(1) if m else None


class Shopify(Adapter):
    platform = "shopify"
    url = ""  # https://<shop>.myshopify.com, from the connector's shop
    max_window_s = 7 * 24 * 3600.0
    window_s = 3600.0
    page_size = 250
    max_page_size = 250
    credentials = ("access_token",)
    open_statuses = frozenset({"paid", "partially_paid", "partially_refunded", "authorized"})
    closed_statuses = frozenset({"refunded", "voided", "cancelled"})

    def _base(self) -> str:
        shop = self.spec.shop
        return self.endpoint or f"https://{shop if '.' in shop else shop + '.myshopify.com'}"

    async def read(self, start: dt.datetime, end: dt.datetime) -> list[Fetched]:
        url: str | None = f"{self._base()}/admin/api/{API_VERSION}/orders.json"
        params: dict[str, Any] | None = {
            "status": "any",
            "updated_at_min": start.isoformat(),
            "updated_at_max": end.isoformat(),
            "limit": self.size,
            "order": "updated_at asc",
        }
        headers = {"X-Shopify-Access-Token": self.secrets["access_token"]}
        seen: dict[str, dict[str, Any]] = {}
        while url is not None:
            u, p = url, params

            async def one(u: str = u, p: dict[str, Any] | None = p) -> Any:
                return await call(self.http, "GET", u, params=p, headers=headers)

            resp = await self.call("orders.json", one)
            self.pages += 1
            for o in json_of(resp).get("orders", []):
                seen[str(o["id"])] = o
            url, params = next_link(resp.headers.get("Link", "")), None  # the next link carries its own query
        out = []
        for o in seen.values():
            status = "cancelled" if o.get("cancelled_at") else str(o.get("financial_status"))
            modified = dt.datetime.fromisoformat(o["updated_at"].replace("Z", "+00:00"))
            out.append(Fetched(str(o["id"]), status, self.kind_of(status), int(modified.timestamp() * 1000), o))
        return out
