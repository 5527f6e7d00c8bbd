"""Taobao / Tmall (TOP): ``taobao.trades.sold.increment.get`` lists the trades modified in a
window (at most a day, 30 minutes recommended), sorted by modification time descending, so its
pages are read from the last back; ``taobao.trade.fullinfo.get`` gives each trade whole (the
list leaves out ``buyer_message`` and the receiver). Requests are signed with MD5 or HMAC-MD5
over the sorted parameters; ``code`` 7 (app call limited) and ``isp.*`` sub-codes are retried,
the rest (signature, session, arguments) given up.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
from typing import Any

from connect.adapters.base import Adapter, Fetched, beijing, beijing_ms, gather_limited, give_up_or_retry, obj
from connect.errors import Retry
from connect.http import call, json_of

LIST_FIELDS = "tid,status,modified"
FULL_FIELDS = (
    "tid,tid_str,status,type,created,pay_time,modified,buyer_nick,buyer_open_uid,buyer_message,seller_memo,"
    "payment,total_fee,discount_fee,post_fee,receiver_name,receiver_mobile,receiver_phone,receiver_state,"
    "receiver_city,receiver_district,receiver_town,receiver_address,receiver_zip,orders,promotion_details"
)
_BAN = re.compile(r"(\d+) more seconds")


def sign(params: dict[str, str], secret: str, method: str = "md5") -> str:
    text = "".join(f"{k}{params[k]}" for k in sorted(params) if k != "sign")
    if method == "hmac":
        return hmac.new(secret.encode(), text.encode(), hashlib.md5).hexdigest().upper()
    return hashlib.md5(f"{secret}{text}{secret}".encode()).hexdigest().upper()


class Taobao(Adapter):
    platform = "taobao"
    url = "https://eco.taobao.com/router/rest"
    max_window_s = 24 * 3600.0
    window_s = 1800.0
    page_size = 100
    max_page_size = 100
    credentials = ("app_key", "app_secret", "session")
    open_statuses = frozenset({"WAIT_SELLER_SEND_GOODS", "SELLER_CONSIGNED_PART", "WAIT_BUYER_CONFIRM_GOODS"})
    closed_statuses = frozenset({"TRADE_CLOSED", "TRADE_CLOSED_BY_TAOBAO"})

    async def _top(self, method: str, **biz: str) -> dict[str, Any]:
        params = {
            "method": method,
            "app_key": self.secrets["app_key"],
            "session": self.secrets["session"],
            "timestamp": beijing(dt.datetime.now(dt.UTC)),
            "format": "json",
            "v": "2.0",
            "sign_method": "md5",
            **biz,
        }
        params["sign"] = sign(params, self.secrets["app_secret"])
        doc = json_of(await call(self.http, "POST", self.endpoint, data=params))
        err = doc.get("error_response")
        if err is not None:
            code, sub = str(err.get("code", "")), str(err.get("sub_code", ""))
            reason = f"{method}: {code} {err.get('msg', '')} {sub} {err.get('sub_msg', '')}".strip()
            m = _BAN.search(str(err.get("sub_msg", "")))
            if sub.startswith("isp."):
                raise Retry(reason, code)
            raise give_up_or_retry(code, reason, frozenset({"7", "520"}), float(m.group(1)) if m else None)
        name = method.removeprefix("taobao.").replace(".", "_") + "_response"
        return obj(doc.get(name))

    async def _page(self, start: dt.datetime, end: dt.datetime, page: int) -> tuple[list[dict[str, Any]], int]:
        async def one() -> dict[str, Any]:
            return await self._top(
                "taobao.trades.sold.increment.get",
                fields=LIST_FIELDS,
                start_modified=beijing(start),
                end_modified=beijing(end),
                page_no=str(page),
                page_size=str(self.size),
                use_has_next="false",
            )

        r = await self.call("trades.sold.increment.get", one)
        return (r.get("trades") or {}).get("trade", []), int(r.get("total_results", 0))

    async def _full(self, tid: str) -> dict[str, Any]:
        async def one() -> dict[str, Any]:
            return await self._top("taobao.trade.fullinfo.get", fields=FULL_FIELDS, tid=tid)

        return obj((await self.call("trade.fullinfo.get", one)).get("trade"))

    async def read(self, start: dt.datetime, end: dt.datetime) -> list[Fetched]:
        listed = await self.paged_from_last(lambda p: self._page(start, end, p), 1, lambda t: str(t["tid"]))
        out: list[Fetched] = []
        wanted = []
        for t in listed:
            kind = self.kind_of(t["status"])
            f = Fetched(str(t["tid"]), t["status"], kind, beijing_ms(t["modified"]), t)
            out.append(f)
            if kind == "open" and self.fresh(f):
                wanted.append(f)
        fulls = await gather_limited(self.DETAIL_IN_FLIGHT, [self._full(f.order_id) for f in wanted])
        for f, full in zip(wanted, fulls, strict=True):
            f.payload = full
            f.status, f.kind = full["status"], self.kind_of(full["status"])  # the newer word
        return out
