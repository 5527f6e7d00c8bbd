"""Taobao / Tmall TOP: ``taobao.trades.sold.increment.get`` (a window of at most a day on
``modified``, sorted newest first, 100 a page, ``total_results``) and ``taobao.trade.fullinfo.get``,
on one router URL, signed with MD5 or HMAC-MD5; throttling is TOP's code 7 with a ban in seconds."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from loadtest.platforms.base import SECRETS, Platform, SimOrder, form_or_query, json_response

BEIJING = dt.timezone(dt.timedelta(hours=8))
MAX_WINDOW_S = 24 * 3600


def beijing(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, BEIJING).strftime("%Y-%m-%d %H:%M:%S")


def parse_beijing(text: str) -> int:
    return int(dt.datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=BEIJING).timestamp())


def top_sign(params: dict[str, str], secret: str) -> str:
    text = "".join(f"{k}{params[k]}" for k in sorted(params) if k != "sign")
    if params.get("sign_method") == "hmac":
        return hmac.new(secret.encode(), text.encode(), hashlib.md5).hexdigest().upper()
    return hashlib.md5(f"{secret}{text}{secret}".encode()).hexdigest().upper()


def error(code: int, msg: str, sub_code: str = "", sub_msg: str = "") -> Response:
    return json_response({"error_response": {"code": code, "msg": msg, "sub_code": sub_code, "sub_msg": sub_msg}})


class TaobaoSim(Platform):
    name = "taobao"
    sample = "tmall"
    open_status = "WAIT_SELLER_SEND_GOODS"
    moved_status = "SELLER_CONSIGNED_PART"
    closed_status = "TRADE_CLOSED"

    def new_order(self, n: int, modified: int) -> SimOrder:
        t = self.template_copy()
        tid = 4_100_000_000_000_000_000 + n
        t.update(tid=tid, tid_str=str(tid), created=beijing(modified), pay_time=beijing(modified))
        t["buyer_open_uid"] = f"AAH-sim-{n}"
        o = SimOrder(str(tid), modified, 0.0, self.open_status, t)
        self.set_status(o, self.open_status, modified)
        return o

    def set_status(self, o: SimOrder, status: str, modified: int) -> None:
        o.status, o.modified = status, modified
        o.payload["status"], o.payload["modified"] = status, beijing(modified)

    def routes(self) -> list[Route]:
        return [Route("/router/rest", self.router, methods=["GET", "POST"])]

    async def router(self, request: Request) -> Response:
        p = await form_or_query(request)
        fault = self.gate()
        if fault == "5xx":
            return Response("bad gateway", status_code=502)
        if fault == "throttle":
            return error(
                7,
                "App Call Limited",
                "accesscontrol.limited-by-app-access-count",
                "This ban will last for 1 more seconds",
            )
        if p.get("app_key") != SECRETS["app_key"]:
            return error(29, "Invalid app Key", "isv.appkey-not-exists")
        if p.get("sign") != top_sign(p, SECRETS["app_secret"]):
            return error(25, "Invalid signature")
        if p.get("session") != SECRETS["session"]:
            return error(27, "Invalid session", "invalid-sessionkey")
        method = p.get("method")
        if method == "taobao.trades.sold.increment.get":
            return self.increment(p)
        if method == "taobao.trade.fullinfo.get":
            o = self.orders.get(p.get("tid", ""))
            if o is None:
                return error(15, "Remote service error", "isv.trade-not-exist", "no such trade")
            return json_response({"trade_fullinfo_get_response": {"trade": o.payload}})
        return error(22, "Invalid method", "isv.method-not-exist")

    def increment(self, p: dict[str, str]) -> Response:
        try:
            start, end = parse_beijing(p["start_modified"]), parse_beijing(p["end_modified"])
            page, size = int(p.get("page_no", "1")), int(p.get("page_size", "40"))
        except (KeyError, ValueError) as exc:
            return error(41, "Invalid arguments", "isv.invalid-parameter", str(exc))
        if not 0 <= end - start <= MAX_WINDOW_S:
            return error(
                41, "Invalid arguments", "isv.invalid-parameter", "start_modified to end_modified: one day at most"
            )
        if not 1 <= size <= 100 or page < 1:
            return error(41, "Invalid arguments", "isv.invalid-parameter", "page_size 1..100, page_no from 1")
        listed = self.window(start, end, desc=True)
        self.stats.pages += 1
        chunk = listed[(page - 1) * size : page * size]
        fields = p.get("fields", "tid,status,modified").split(",")
        trades: list[dict[str, Any]] = [{f: o.payload[f] for f in fields if f in o.payload} for o in chunk]
        body: dict[str, Any] = {"total_results": len(listed), "trades": {"trade": trades}}
        if p.get("use_has_next") == "true":
            body = {"has_next": page < math.ceil(len(listed) / size), "trades": body["trades"]}
        answer = json_response({"trades_sold_increment_get_response": body})
        self.after_page(listed)  # after the answer is rendered: the next page sees the change
        return answer
